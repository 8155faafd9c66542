"""The work on each side of a federation, without Flower: what a client trains and evaluates,
and how the server checks, aggregates and evaluates. :mod:`deltatune.federated.flower`
carries these between processes.

A :class:`Workspace` is one process's model with the delta attached, the task's encoded
splits and the clients' partitions. It is built once per process and job (clients on a
Flower simulation's workers share it across the partitions they serve), and every message
starts by loading the global delta into it, so nothing leaks from one client to the next.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.inject import attach
from ..errors import ConfigError, DeltaError, FederatedError
from ..io.artifact import save
from ..io.base_check import base_fingerprint
from ..train.batches import Encoded, encode
from ..train.job import TrainJob, delta_config, prepare
from ..train.loop import train
from ..train.metrics import evaluate
from .aggregate import aggregate, summary
from .split import check_clients, partition
from .wire import Codec, decode_update, delta_values, encode_update, load_values, payload_bytes

log = logging.getLogger("deltatune.federated")


@dataclass
class FederateJob:
    """A federation: ``job`` says what each client trains (model, data, method and options,
    batch size, learning rate; ``job.steps`` local steps per round; ``job.out`` the output
    folder), the rest how the federation runs."""

    job: TrainJob = field(default_factory=TrainJob)
    clients: int = 10
    rounds: int = 5
    #: Dirichlet concentration of the label skew (classification); small is skewed
    alpha: float = 0.5
    #: how client updates travel: none, int8, ternary, topk:<fraction>, or topk:<fraction>+int8
    codec: str = "none"
    #: local steps from the final global delta that make each client's personal delta
    personal_steps: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.job, dict):
            self.job = TrainJob(**self.job)
        check_clients(self.clients, self.alpha)
        for name in ("rounds", "personal_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "rounds" else 0):
                raise ConfigError(f"{name} must be a {'positive' if name == 'rounds' else 'non-negative'} integer, "
                                  f"got {value!r}")
        if self.job.steps is None or self.job.steps < 1:
            raise ConfigError(f"job.steps is each client's local steps per round and must be >= 1, got {self.job.steps!r}")
        Codec.parse(self.codec)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederateJob:
        return cls(**json.loads(text))


def subset(data: Encoded, rows: tuple[int, ...]) -> Encoded:
    return dataclasses.replace(data, input_ids=[data.input_ids[i] for i in rows], labels=[data.labels[i] for i in rows])


class Workspace:
    """One process's model with the job's delta attached, the encoded splits and the partitions."""

    def __init__(self, fed: FederateJob):
        self.fed, self.job = fed, fed.job
        self.splits, loaded = prepare(self.job)
        self.model = loaded.model
        self.name = self.job.method
        config = delta_config(self.job, self.model, self.splits.task)
        if config is None:
            raise ConfigError(f"method {self.job.method!r} trains the whole base, which federated delta tuning never "
                              f"sends; pick a delta method")
        attach(self.model, config, self.name)
        self.encoded = {part: encode(getattr(self.splits, part), loaded.tokenizer, self.splits.task, self.job.max_length,
                                     self.splits.labels) for part in ("train", "test")}
        self.partitions = partition(self.splits, fed.clients, fed.alpha, self.job.seed)
        self.num_labels = max(2, len(self.splits.labels))
        self.fingerprint = base_fingerprint(self.model, self.name)["sha256"]
        self.codec = Codec.parse(fed.codec)
        self.initial = delta_values(self.model, self.name)

    # -- client side ---------------------------------------------------------------------------
    def local_train(self, client: int, global_values: dict[str, torch.Tensor], server_round: int,
                    steps: int) -> tuple[dict[str, torch.Tensor], int, float]:
        """Train ``steps`` steps on the client's rows from ``global_values``; returns the
        encoded update, the client's example count and its last training loss."""
        data = self._rows(client, "train")
        load_values(self.model, self.name, global_values)
        settings = dataclasses.replace(self.job.settings(), steps=steps, eval_every=0, save_every=0, progress=False,
                                       seed=self.job.seed + 7919 * server_round + client)
        result = train(self.model, data, settings, num_labels=self.num_labels)
        losses = result["history"].train
        values = delta_values(self.model, self.name)
        return encode_update(values, global_values, self.codec), len(data), float(losses[-1][1]) if losses else float("nan")

    def personalise(self, client: int, global_values: dict[str, torch.Tensor], out: Path | None) -> dict[str, float]:
        """The global delta and the client's personal delta (``personal_steps`` more local
        steps) measured on the client's own test rows; the personal delta is saved in ``out``."""
        test = self._rows(client, "test")
        load_values(self.model, self.name, global_values)
        before = self._evaluate(test)
        if self.fed.personal_steps:
            settings = dataclasses.replace(self.job.settings(), steps=self.fed.personal_steps, eval_every=0,
                                           save_every=0, progress=False, seed=self.job.seed + 104729 + client)
            train(self.model, self._rows(client, "train"), settings, num_labels=self.num_labels)
        after = self._evaluate(test)
        if out is not None:
            save(self.model, out, self.name, metrics={"local_test": after}, labels=self.splits.labels or None,
                 task=self.splits.task, provenance={"federated": {"client": client, "personal_steps": self.fed.personal_steps}})
        metrics = {"num-examples": len(test), "train-rows": len(self._rows(client, "train"))}
        for prefix, values in (("global", before), ("personal", after)):
            metrics.update({f"{prefix}-{key}": float(value) for key, value in values.items() if isinstance(value, (int, float))})
        return metrics

    # -- server side ---------------------------------------------------------------------------
    def check_update(self, parts: dict[str, torch.Tensor], base: str, count: Any,
                     global_values: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """A client's delta and example count, or :class:`FederatedError` saying why it is refused."""
        if base != self.fingerprint:
            raise FederatedError(f"the update is for another base (fingerprint {str(base)[:12]}, this federation's is "
                                 f"{self.fingerprint[:12]}); the client must load the same base model")
        if isinstance(count, bool) or not isinstance(count, (int, float)) or not count > 0:
            raise FederatedError(f"the update's example count {count!r} is not a positive number")
        return decode_update(parts, global_values, self.codec), int(count)

    def aggregate(self, server_round: int, replies: list[tuple[Any, dict[str, torch.Tensor], str, Any]],
                  global_values: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Check each ``(client id, parts, base fingerprint, example count)`` reply, aggregate the
        accepted ones into the global delta; returns its values and the round's record. A refused
        reply is logged and left out; with none accepted the global delta stays as it was."""
        updates, counts, rejected, sent = [], [], [], 0
        for client, parts, base, count in replies:
            sent += payload_bytes(parts)
            try:
                update, n = self.check_update(parts, base, count, global_values)
            except (DeltaError, TypeError, RuntimeError) as error:  # a payload that cannot even be decoded
                log.warning("round %d: update of client %s refused: %s", server_round, client, error)
                rejected.append({"client": str(client), "reason": str(error)})
                continue
            updates.append(update)
            counts.append(n)
        record: dict[str, Any] = {"round": server_round, "accepted": len(updates), "rejected": rejected,
                                  "bytes_up": sent, "bytes_down": payload_bytes(global_values) * len(replies)}
        if not updates:
            log.warning("round %d: no update accepted; the global delta stays as it was", server_round)
            load_values(self.model, self.name, global_values)
            return global_values, record
        report = aggregate(self.model, self.name, updates, counts)  # writes every parameter of the delta
        record["aggregation"] = summary(report)
        return delta_values(self.model, self.name), record

    def evaluate_global(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """The delta ``values`` on the whole test split."""
        load_values(self.model, self.name, values)
        return self._evaluate(self.encoded["test"])

    def save_global(self, values: dict[str, torch.Tensor], out: Path, metrics: dict[str, Any]) -> Path:
        load_values(self.model, self.name, values)
        return save(self.model, out, self.name, metrics=metrics, labels=self.splits.labels or None,
                    task=self.splits.task, provenance={"model": self.job.model, "data": self.job.data,
                                                       "federated": {"clients": self.fed.clients, "rounds": self.fed.rounds,
                                                                     "codec": self.fed.codec, "alpha": self.fed.alpha}})

    def base_bytes(self) -> int:
        """Bytes of the whole model's tensors: what sending the full model would cost."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    # -- helpers -------------------------------------------------------------------------------
    def _rows(self, client: int, part: str) -> Encoded:
        if not 0 <= client < len(self.partitions):
            raise FederatedError(f"client {client} is not one of the {len(self.partitions)} partitions; start the "
                                 f"client with partition-id in 0..{len(self.partitions) - 1}")
        return subset(self.encoded[part], getattr(self.partitions[client], part))

    def _evaluate(self, data: Encoded) -> dict[str, float]:
        if not len(data):
            return {}
        result = evaluate(self.model, data, num_labels=self.num_labels)
        return {key: value for key, value in result.items() if isinstance(value, (int, float))}


@functools.lru_cache(maxsize=2)
def workspace(job_json: str) -> Workspace:
    """The process's workspace for a job (built once; Flower calls the client per message)."""
    return Workspace(FederateJob.from_json(job_json))
