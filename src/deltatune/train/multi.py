"""Training several deltas in one step: each task's rows run through its own delta in one
mixed batch over the shared frozen base (``model(..., delta_ids=...)``).

The step's loss is the sum over tasks of each task's mean loss over its own rows, gradients
are clipped per delta, and AdamW works per parameter, so each delta follows exactly the path
it would follow if trained alone on its rows (with dropout off). ``deltatune train --multi``
runs :func:`run_multi` on one :class:`~deltatune.train.job.TrainJob` per task.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from ..core.config import DeltaConfig
from ..core.inject import after_step, attach, loss_terms, using
from ..core.registry import get_method
from ..core.params import count_parameters, delta_parameters
from ..core.recompute import enable_gradient_checkpointing
from ..core.saved_module import SavedModule
from ..core.slot import check_delta_name, require_state, slot_sites
from ..data.datasets import Splits, load_dataset
from ..errors import ConfigError, DeltaError, DeltaStateError
from ..io.artifact import TENSORS_FILE, save
from ..io.atomic import write_text_atomic
from ..models.load import check_model_name, load_model
from . import distributed
from .batches import IGNORE, BatchPlan, Encoded, encode, to_device
from .job import TrainJob, delta_config, peak_memory_mb
from .loop import Settings, TrainingDiverged, learning_rate, total_steps
from .metrics import evaluate

#: TrainJob fields every task of one multi-delta run must share (one model, one schedule)
SHARED_FIELDS = ("model", "seed", "steps", "epochs", "lr", "quantize", "dtype", "gradient_checkpointing")


@dataclass
class Task:
    """One task of a multi-delta run: the delta it trains and that delta's data.

    Attributes:
        name: the delta's name on the model (also its output folder's name).
        train: encoded training examples.
        rows_per_step: how many of this task's rows every step's batch holds.
        validation: encoded validation examples (for ``eval_every``), if any.
        num_labels: a classification task's label count, when the shared head is wider (tasks
            with different label counts): its loss and metrics read the first ``num_labels``
            logits; ``None``: all of them.
    """

    name: str
    train: Encoded
    rows_per_step: int
    validation: Encoded | None = None
    num_labels: int | None = None


@dataclass
class MultiHistory:
    """Per step: the summed loss, and each task's own mean loss."""

    train: list[tuple[int, float]] = field(default_factory=list)
    tasks: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    validation: dict[str, list[tuple[int, dict[str, float]]]] = field(default_factory=dict)


def mixed_batch(parts: list[tuple[Task, list[int]]]) -> tuple[dict[str, torch.Tensor], list[str | None], list[tuple[str, int, int]]]:
    """One padded batch of every task's rows, back to back.

    Returns:
        the batch (``input_ids``, ``attention_mask``, ``labels``), the delta name of every row,
        and each task's ``(name, start, stop)`` span of rows.
    """
    first = parts[0][0].train
    ids, labels, names, spans = [], [], [], []
    for task, rows in parts:
        start = len(ids)
        ids += [task.train.input_ids[i] for i in rows]
        labels += [task.train.labels[i] for i in rows]
        names += [task.name] * len(rows)
        spans.append((task.name, start, len(ids)))
    joined = Encoded(ids, labels, first.task, first.pad_id)
    return joined.collate(list(range(len(ids)))), names, spans


def task_losses(logits: torch.Tensor, labels: torch.Tensor, spans: list[tuple[str, int, int]],
                task: str, widths: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Each task's mean loss over its own rows (tasks without rows are left out).

    Classification: cross-entropy per example, over the task's first ``widths[name]`` logits
    when given. Causal LM: next-token cross-entropy over the answer tokens (labels not ``-100``),
    as transformers computes a causal-LM loss.
    """
    losses = {}
    for name, start, stop in spans:
        if stop == start:
            continue
        if task == "classification":
            width = (widths or {}).get(name)
            losses[name] = F.cross_entropy(logits[start:stop, :width].float(), labels[start:stop])
            continue
        rows_labels = labels[start:stop]
        rows_logits = logits[start:stop, -rows_labels.shape[1]:]  # prompt tuning prepends virtual positions
        shifted = rows_labels[:, 1:]
        total = F.cross_entropy(rows_logits[:, :-1].float().reshape(-1, rows_logits.shape[-1]), shifted.reshape(-1),
                                ignore_index=IGNORE, reduction="sum")
        losses[name] = total / (shifted != IGNORE).sum().clamp(min=1)
    return losses


def train_tasks(model: nn.Module, tasks: list[Task], settings: Settings, *, num_labels: int = 2) -> dict[str, Any]:
    """Train every task's delta (already attached under the task's name) in shared steps.

    Step ``s`` takes rows ``BatchPlan(len(task.train), task.rows_per_step, settings.seed).rows(s)``
    of each task: what ``loop.train`` with ``batch_size=rows_per_step`` would take alone.

    Returns:
        ``{"history": MultiHistory, "steps": int, "seconds": float}``.

    Raises:
        DeltaStateError: a task's delta is not on the model, or names repeat.
        TrainingDiverged: the loss became NaN or inf.
    """
    state = require_state(model)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise DeltaStateError(f"task names repeat in {names}; every task needs its own delta")
    kinds = {t.train.task for t in tasks}
    if len(kinds) != 1:
        raise ConfigError(f"tasks mix {sorted(kinds)}; one multi-delta run trains tasks of one kind")
    kind = kinds.pop()
    groups = []
    for name in names:
        state.require(name)
        params = [p for _, p in delta_parameters(model, name)]
        if not params:
            raise DeltaError(f"delta {name!r} has no parameters to train")
        for p in params:
            p.requires_grad_(True)
        groups.append({"params": params, "name": name})
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.gradient_checkpointing:  # each recompute runs under its forward's row routing
        enable_gradient_checkpointing(model)
    total = settings.steps if settings.steps is not None else max(
        total_steps(dataclasses.replace(settings, batch_size=t.rows_per_step), len(t.train)) for t in tasks)
    plans = {t.name: BatchPlan(len(t.train), t.rows_per_step, settings.seed) for t in tasks}
    widths = {t.name: t.num_labels for t in tasks if t.num_labels}
    history = MultiHistory(tasks={n: [] for n in names}, validation={n: [] for n in names})
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    began = time.perf_counter()
    model.train()
    bar = tqdm(range(total), total=total, desc="train", disable=not settings.progress, dynamic_ncols=True)
    for step in bar:
        batch, row_names, spans = mixed_batch([(t, plans[t.name].rows(step)) for t in tasks])
        batch = to_device(batch, device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step, total)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], delta_ids=row_names).logits
        losses = task_losses(logits, batch["labels"], spans, kind, widths)
        loss = sum(losses.values())
        extra = loss_terms(model)  # methods' regularisers (AdaLoRA's orthogonality penalty)
        if extra is not None:
            loss = loss + extra
        if not torch.isfinite(loss):
            bar.close()
            raise TrainingDiverged(f"loss became {loss.item()} at step {step + 1}; training stopped. Lower --lr and restart.")
        loss.backward()
        if settings.grad_clip:
            for group in optimizer.param_groups:  # per delta, as each would be clipped training alone
                torch.nn.utils.clip_grad_norm_(group["params"], settings.grad_clip)
        optimizer.step()
        after_step(model, step + 1, total)  # before zero_grad: hooks may read the gradients
        optimizer.zero_grad(set_to_none=True)
        history.train.append((step + 1, loss.item()))
        for name, value in losses.items():
            history.tasks[name].append((step + 1, value.item()))
        bar.set_postfix(loss=f"{history.train[-1][1]:.4f}")
        if settings.eval_every and (step + 1) % settings.eval_every == 0:
            for task in tasks:
                if task.validation is not None:
                    with using(model, task.name):
                        history.validation[task.name].append((step + 1, evaluate(
                            model, task.validation, num_labels=max(2, task.num_labels or num_labels), outputs=task.num_labels)))
    bar.close()
    return {"history": history, "steps": total, "seconds": time.perf_counter() - began}


def check_jobs(jobs: dict[str, TrainJob]) -> None:
    """Refuse task sets one shared run cannot train, naming the task and the fix.

    Raises:
        ConfigError: fewer than two tasks, a bad task name, shared settings that differ,
            full fine-tuning, or checkpointing (not supported with several deltas).
    """
    if len(jobs) < 2:
        raise ConfigError(f"--multi needs at least two task configs, got {len(jobs)}")
    for name, job in jobs.items():
        try:
            check_delta_name(name)
        except DeltaStateError:
            raise ConfigError(f"task name {name!r} (the YAML file's name) must be 1-64 letters, digits, '_' or '-', "
                              f"starting with a letter; rename the file") from None
        if get_method(job.method).trains_base:
            raise ConfigError(f"task {name!r}: method {job.method!r} trains the shared base itself; pick a delta method")
        if job.save_every:
            raise ConfigError(f"task {name!r}: save_every is not supported with --multi (no checkpoints); remove it")
    for option in SHARED_FIELDS:
        values = {name: getattr(job, option) for name, job in jobs.items()}
        if len(set(map(repr, values.values()))) > 1:
            raise ConfigError(f"tasks disagree on {option}: {values}; make them equal in the YAML files or pass "
                              f"--{option.replace('_', '-')} on the command line")
    rates = {name: job.learning_rate for name, job in jobs.items()}
    if len(set(rates.values())) > 1:
        raise ConfigError(f"tasks' methods have different default learning rates {rates}; pass --lr (one optimizer "
                          f"schedule serves every delta)")


def check_label_counts(splits: dict[str, Splits]) -> None:
    """All tasks must be of one kind. Classification tasks may have different label counts: the
    shared head is as wide as the largest, each task reads its first logits, and each saved
    delta's head keeps its own (:func:`narrow_heads`).

    Raises:
        ConfigError: the kinds differ (the message lists them per task).
    """
    kinds = {name: s.task for name, s in splits.items()}
    if len(set(kinds.values())) > 1:
        raise ConfigError(f"tasks mix classification and causal LM {kinds}; train them in separate runs")


def narrow_heads(model: nn.Module, name: str, width: int, rows: int) -> None:
    """Keep the first ``rows`` outputs of the ``width``-wide linear layers in delta ``name``'s
    trained module copies (its classifier head), so the saved delta's head fits its own labels."""
    def narrowed(linear: nn.Linear) -> nn.Linear:
        out = nn.Linear(linear.in_features, rows, bias=linear.bias is not None).to(linear.weight.device)
        with torch.no_grad():
            out.weight.copy_(linear.weight[:rows])
            if linear.bias is not None:
                out.bias.copy_(linear.bias[:rows])
        return out

    for _, _, slot in slot_sites(model):
        unit = slot._modules.get(name)
        if not isinstance(unit, SavedModule):
            continue
        if isinstance(unit.copy, nn.Linear) and unit.copy.out_features == width:
            unit.copy = narrowed(unit.copy)
            continue
        for parent in list(unit.copy.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child.out_features == width:
                    setattr(parent, child_name, narrowed(child))
    require_state(model).changed()


def run_multi(jobs: dict[str, TrainJob], out: str | Path) -> dict[str, Any]:
    """Train one delta per task on one base and write ``OUT/<task>/`` for each, like ``deltatune train``.

    Args:
        jobs: task name -> its TrainJob (data, method, method options, batch_size = rows per step).
        out: the output folder; ``OUT/metrics.json`` and ``OUT/history.json`` summarise the run.

    Returns:
        the run's metrics, with ``tasks`` -> each task's metrics.
    """
    check_jobs(jobs)
    shared = next(iter(jobs.values()))
    check_model_name(shared.model)
    splits = {name: load_dataset(job.data, job.seed, text_column=job.text_column, label_column=job.label_column,
                                 completion_column=job.completion_column, limit=job.limit) for name, job in jobs.items()}
    check_label_counts(splits)
    first = next(iter(splits.values()))
    counts = {name: len(s.labels) for name, s in splits.items()}
    width = max(counts.values())
    same = all(s.labels == first.labels for s in splits.values())
    torch.manual_seed(shared.seed)
    loaded = load_model(shared.model, first.task, width or None, first.labels if same and first.labels else None,
                        quantize=shared.quantize, dtype=shared.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    configs: dict[str, DeltaConfig] = {}
    owners: dict[str, str] = {}  # method -> the run's first task of that method
    for name, job in jobs.items():
        config = delta_config(job, model, first.task)
        owner = owners.setdefault(config.method, name)
        configs[name] = config if owner == name else config.shared_with(owner)
        attach(model, configs[name], name=name, activate=False)
    model.to(distributed.device())
    encoded = {name: {part: encode(getattr(splits[name], part), tokenizer, first.task, job.max_length, splits[name].labels)
                      for part in ("train", "validation", "test")} for name, job in jobs.items()}
    narrower = {name: count for name, count in counts.items() if count and count < width}
    tasks = [Task(name, encoded[name]["train"], job.batch_size, encoded[name]["validation"], narrower.get(name))
             for name, job in jobs.items()]
    num_labels = max(2, width)
    result = train_tasks(model, tasks, shared.settings(), num_labels=num_labels)
    out = Path(out)
    summary: dict[str, Any] = {"model": shared.model, "steps": result["steps"], "seed": shared.seed,
                               "train_seconds": round(result["seconds"], 2), "total_parameters": count_parameters(model),
                               "peak_memory_mb": round(peak_memory_mb(), 1), "tasks": {}}
    for name, job in jobs.items():
        folder = out / name
        if name in narrower:
            narrow_heads(model, name, width, narrower[name])
        with using(model, name):
            test = evaluate(model, encoded[name]["test"], num_labels=max(2, counts[name]))
            validation = evaluate(model, encoded[name]["validation"], num_labels=max(2, counts[name]))
        trainable = sum(p.numel() for _, p in delta_parameters(model, name))
        metrics = {"model": shared.model, "data": splits[name].describe(), "method": job.method, "task": first.task,
                   "test": test, "validation": validation, "trainable_parameters": trainable,
                   "steps": result["steps"], "seed": shared.seed, "train_seconds": summary["train_seconds"],
                   "trained_with": sorted(jobs)}
        save(model, folder, name, metrics={k: metrics[k] for k in ("test", "steps", "seed", "train_seconds")},
             provenance={"model": shared.model, "data": job.data, "multi": sorted(jobs)},
             labels=splits[name].labels or None, task=splits[name].task)
        metrics["delta_bytes"] = (folder / TENSORS_FILE).stat().st_size
        write_text_atomic(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_text_atomic(folder / "config.yaml", yaml.safe_dump(asdict(dataclasses.replace(job, out=str(folder))),
                                                                 sort_keys=False))
        summary["tasks"][name] = metrics
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "history.json", json.dumps(asdict(result["history"])) + "\n")
    return summary
