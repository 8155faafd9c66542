"""Training tasks one after another (continual learning), two ways.

Per-task deltas: every task gets its own delta (with its own head) on one shared frozen
base; training a later task touches none of an earlier task's parameters, so its outputs
stay bit-identical. Sequential full fine-tuning: one body trained on each task in turn,
each task keeping its own head; later tasks move the shared body, so earlier tasks forget.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.inject import attach, set_active, using
from ..core.params import count_parameters, set_trainable
from ..core.slot import get_state
from ..errors import ConfigError, DeltaStateError
from .batches import Encoded
from .loop import Settings, train
from .metrics import evaluate


@dataclass
class Task:
    """One task of a sequence: its name, tokenised train and test data, and label count."""

    name: str
    train: Encoded
    test: Encoded
    num_labels: int = 2


@dataclass
class SequenceResult:
    """What training a sequence of tasks measured.

    ``after[i][name]`` holds the test metrics of task ``name`` right after stage ``i``
    (the training of ``order[i]``), for every task trained so far, scored over that task's
    own classes only.
    """

    approach: str
    order: list[str]
    after: list[dict[str, dict[str, float]]] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    trainable_parameters: list[int] = field(default_factory=list)

    def accuracy_matrix(self) -> list[list[float | None]]:
        """Row ``i``, column ``j``: accuracy on task ``j`` after stage ``i`` (``None`` before ``j`` is trained)."""
        return [[stage[name]["accuracy"] if name in stage else None for name in self.order] for stage in self.after]

    def changed_after_training(self, name: str) -> list[str]:
        """The later stages after which task ``name``'s test metrics differ from right after its own training."""
        own = self.order.index(name)
        return [self.order[i] for i in range(own + 1, len(self.after)) if self.after[i][name] != self.after[own][name]]

    def to_dict(self) -> dict[str, Any]:
        return {"approach": self.approach, "order": self.order, "after": self.after,
                "accuracy": self.accuracy_matrix(), "train_seconds": self.train_seconds,
                "trainable_parameters": self.trainable_parameters}


def _check_tasks(tasks: list[Task]) -> None:
    names = [task.name for task in tasks]
    if not names:
        raise ConfigError("no tasks given; pass at least one Task to train in sequence")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"task name(s) {repeated} appear more than once; give every task its own name")


@contextlib.contextmanager
def task_labels_only(model: nn.Module, num_labels: int) -> Iterator[None]:
    """Cut the model's logits to a task's first ``num_labels`` classes while evaluating it.

    Tasks with different label counts share one head width (the largest); a task with fewer
    labels must not be scored on classes it does not have.
    """

    def cut(module: nn.Module, args: Any, output: Any) -> Any:
        output.logits = output.logits[..., :num_labels]
        return output

    handle = model.register_forward_hook(cut)
    try:
        yield
    finally:
        handle.remove()


def _evaluate(model: nn.Module, task: Task) -> dict[str, float]:
    with task_labels_only(model, task.num_labels):
        return evaluate(model, task.test, num_labels=task.num_labels)


def train_delta(
    model: nn.Module, name: str, data: Encoded, settings: Settings, *, num_labels: int = 2
) -> dict[str, Any]:
    """Train one attached delta alone: it is made the only active delta and the only trainable one.

    Returns:
        What :func:`deltatune.train.loop.train` returns (history, steps, seconds).

    Raises:
        DeltaStateError: the model has no delta called ``name``.
    """
    set_active(model, name)
    set_trainable(model, name)
    return train(model, data, settings, num_labels=num_labels)


def deltas_in_sequence(model: nn.Module, tasks: list[Task], config: DeltaConfig, settings: Settings) -> SequenceResult:
    """Attach and train one delta per task (named after it) in order on the one frozen base.

    After each stage every task trained so far is evaluated with its own delta active.
    Each delta is initialised from ``settings.seed``, so it is the delta a fresh base would get.

    Args:
        model: the shared base; it must not already carry a delta named like a task.
        tasks: the tasks in training order.
        config: the delta of every task; a classifier needs its head in ``modules_to_save``.
        settings: the training settings of every stage.

    Raises:
        ConfigError: no tasks, or a task name given twice.
        DeltaStateError: a delta named like a task is already attached.
    """
    _check_tasks(tasks)
    result = SequenceResult("per-task deltas", [task.name for task in tasks])
    for task in tasks:
        torch.manual_seed(settings.seed)
        attach(model, config, name=task.name)
        set_trainable(model, task.name)
        result.trainable_parameters.append(count_parameters(model, trainable_only=True))
        trained = train_delta(model, task.name, task.train, settings, num_labels=task.num_labels)
        result.train_seconds.append(trained["seconds"])
        stage = {}
        for seen in tasks[:len(result.train_seconds)]:
            with using(model, seen.name):
                stage[seen.name] = _evaluate(model, seen)
        result.after.append(stage)
    return result


def full_in_sequence(
    model: nn.Module, tasks: list[Task], settings: Settings, *, head: str = "classifier"
) -> SequenceResult:
    """Fine-tune every parameter of ``model`` on each task in order, one head per task.

    Each task's head starts as a copy of the model's head at call time and is put in place
    (at path ``head``) while its task trains or is evaluated; the body is shared and updated.
    The model keeps the last task's head afterwards.

    Raises:
        ConfigError: no tasks, a task name given twice, or no module at path ``head``.
        DeltaStateError: the model carries deltas (fine-tune a plain model).
    """
    _check_tasks(tasks)
    state = get_state(model)
    if state is not None and state.configs:
        raise DeltaStateError(f"full fine-tuning needs a plain model, but deltas {sorted(state.configs)} are attached; "
                              f"load a fresh model")
    try:
        initial_head = model.get_submodule(head)
    except AttributeError:
        raise ConfigError(f"{type(model).__name__} has no module {head!r} to use as the task head; "
                          f"pass head=<path of the classifier>") from None
    heads = {task.name: copy.deepcopy(initial_head) for task in tasks}
    result = SequenceResult("sequential full fine-tuning", [task.name for task in tasks])
    for index, task in enumerate(tasks):
        model.set_submodule(head, heads[task.name])
        model.requires_grad_(True)
        result.trainable_parameters.append(count_parameters(model, trainable_only=True))
        result.train_seconds.append(train(model, task.train, settings, num_labels=task.num_labels)["seconds"])
        stage = {}
        for seen in tasks[:index + 1]:
            model.set_submodule(head, heads[seen.name])
            stage[seen.name] = _evaluate(model, seen)
        result.after.append(stage)
        model.set_submodule(head, heads[task.name])
    return result
