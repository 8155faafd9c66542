"""One training run from options to files: data, model, delta, loop, metrics, plots.

The CLI's ``train``, ``eval`` and ``demo`` commands are thin shells over this module.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.config import DeltaConfig
from ..core.inject import attach
from ..core.params import count_parameters
from ..core.registry import get_method, method_names
from ..data.datasets import DataError, Splits, load_dataset
from ..errors import ConfigError
from ..io.artifact import META_FILE, TENSORS_FILE, load, read_meta, save
from ..io.atomic import write_text_atomic
from ..methods.head import find_head
from ..models.load import check_model_name, load_model
from . import distributed
from .batches import encode
from .loop import Settings, train
from .metrics import evaluate

#: learning rates that work for each method on MiniLM-sized models; these are the methods a
#: training job builds from flags (``dense`` and ``fusion`` deltas come from the Python API:
#: task-vector algebra, extraction and composition)
DEFAULT_LR = {"lora": 2e-3, "dora": 2e-3, "adapter": 1e-3, "prefix": 1e-2, "prompt": 3e-2, "ia3": 1e-2,
              "bitfit": 3e-3, "head": 1e-2, "full": 5e-5}
JOB_METHODS = tuple(DEFAULT_LR)


@dataclass
class TrainJob:
    """Everything one run needs; written to ``config.yaml`` so ``--resume`` can rebuild it."""

    model: str = "minilm"
    data: str = "movie-reviews"
    method: str = "lora"
    out: str = "runs/lora"
    text_column: str = "text"
    label_column: str = "label"
    completion_column: str | None = None
    limit: int | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None
    bottleneck: int = 64
    placement: str = "houlsby"
    num_virtual_tokens: int = 20
    projection_dim: int = 0
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 32
    lr: float | None = None
    max_length: int = 64
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in JOB_METHODS:
            built_elsewhere = " (it is built with the Python API, not trained from flags)" if self.method in method_names() else ""
            raise ConfigError(f"unknown method {self.method!r}{built_elsewhere}; use one of {', '.join(JOB_METHODS)}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.method, 1e-3)

    def settings(self) -> Settings:
        return Settings(epochs=self.epochs, steps=self.steps, batch_size=self.batch_size, lr=self.learning_rate,
                        seed=self.seed, eval_every=self.eval_every, save_every=self.save_every, progress=self.progress)

    @classmethod
    def from_yaml(cls, path: Path) -> "TrainJob":
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)


def delta_config(job: TrainJob, model: torch.nn.Module, task: str) -> DeltaConfig | None:
    """The delta config a job asks for (``None`` for full fine-tuning)."""
    if job.method == "full":
        return None
    head = find_head(model) if task == "classification" else None
    saved = (head,) if head else ()
    targets = tuple(job.targets) if job.targets else None
    cls = get_method(job.method).config_class
    options: dict[str, Any] = {"modules_to_save": saved}
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, value in [("r", job.rank), ("alpha", job.alpha), ("dropout", job.dropout), ("bottleneck", job.bottleneck),
                        ("placement", job.placement), ("num_virtual_tokens", job.num_virtual_tokens),
                        ("projection_dim", job.projection_dim), ("targets", targets)]:
        if name in fields:
            options[name] = value
    return cls(**options)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(job: TrainJob) -> tuple[Splits, Any]:
    check_model_name(job.model)
    splits = load_dataset(job.data, job.seed, text_column=job.text_column, label_column=job.label_column,
                          completion_column=job.completion_column, limit=job.limit)
    torch.manual_seed(job.seed)
    loaded = load_model(job.model, splits.task, len(splits.labels) or None, splits.labels or None)
    return splits, loaded


def run_train(job: TrainJob, *, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate on the test split, and write the run folder; returns the metrics.

    Under ``torchrun`` / ``accelerate launch`` every rank trains on its share of each global
    batch; rank 0 alone evaluates and writes files, and every rank returns rank 0's metrics.
    """
    joined = distributed.init_from_environment()
    try:
        metrics = _run_train(job, resume)
    except BaseException:
        if joined:
            distributed.finish(synchronise=False)
        raise
    if joined:
        distributed.finish()
    return metrics


def _run_train(job: TrainJob, resume: bool) -> dict[str, Any]:
    out = Path(job.out)
    splits, loaded = prepare(job)
    model, tokenizer = loaded.model, loaded.tokenizer
    config = delta_config(job, model, splits.task)
    if config is None:
        model.requires_grad_(True)
        trainable = count_parameters(model)
    else:
        trainable = attach(model, config, name=job.method).trainable
    model.to(distributed.device())
    encoded = {name: encode(getattr(splits, name), tokenizer, splits.task, job.max_length, splits.labels)
               for name in ("train", "validation", "test")}
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", yaml.safe_dump(asdict(job), sort_keys=False))
    num_labels = max(2, len(splits.labels))
    result = train(model, encoded["train"], job.settings(), validation=encoded["validation"], num_labels=num_labels,
                   checkpoint_dir=out / "checkpoint", resume=resume)
    if not distributed.is_main():  # the ranks hold the same weights; rank 0 evaluates and writes
        return distributed.from_main(None)
    test = evaluate(model, encoded["test"], num_labels=num_labels)
    metrics = {
        "model": job.model, "data": splits.describe(), "method": job.method, "task": splits.task,
        "test": test, "validation": evaluate(model, encoded["validation"], num_labels=num_labels),
        "trainable_parameters": trainable, "total_parameters": count_parameters(model),
        "percent_trainable": 100 * trainable / count_parameters(model),
        "steps": result["steps"], "seed": job.seed, "train_seconds": round(result["seconds"], 2),
        "tokens_per_second": round(result["tokens_per_second"], 1), "peak_memory_mb": round(peak_memory_mb(), 1),
    }
    metrics["delta_bytes"] = _write_result(model, job, out, metrics, config)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(out / "history.json", json.dumps(asdict(result["history"])) + "\n")
    from .plot import plot_losses

    plot_losses(result["history"], out / "loss.png", title=f"{job.method} on {job.model} / {job.data}")
    return distributed.from_main(metrics)


def _write_result(model, job: TrainJob, out: Path, metrics: dict, config: DeltaConfig | None) -> int:
    if config is None:
        staging = out / "model.partial"
        model.save_pretrained(staging)
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        staging.rename(out / "model")
        return sum(f.stat().st_size for f in (out / "model").glob("*.safetensors"))
    summary = {k: metrics[k] for k in ("test", "steps", "seed", "train_seconds")}
    save(model, out, job.method, metrics=summary, provenance={"model": job.model, "data": job.data},
         labels=metrics["data"]["labels"] or None, task=metrics["task"])
    return (out / TENSORS_FILE).stat().st_size


def run_eval(delta_dir: str | Path, job: TrainJob) -> dict[str, Any]:
    """Evaluate a saved delta on a dataset's test split (the same split as training with the same seed).

    Any saved delta evaluates, whatever made it (training, merging, compression, import):
    ``job.method`` is not used. The delta's recorded label names (``delta.json``) give the
    order of its head's outputs, and the dataset's labels are mapped onto them.

    Raises:
        DataError: the folder holds no delta, or the delta's task or labels do not fit the dataset.
    """
    delta_dir = Path(delta_dir)
    if not (delta_dir / META_FILE).exists() and (delta_dir / "config.yaml").exists():
        raise DataError(f"{delta_dir} holds no delta (a full fine-tune?); evaluate the model folder instead")
    meta = read_meta(delta_dir)
    check_model_name(job.model)
    splits = load_dataset(job.data, job.seed, text_column=job.text_column, label_column=job.label_column,
                          completion_column=job.completion_column, limit=job.limit)
    labels = eval_labels(meta, splits, delta_dir)
    torch.manual_seed(job.seed)
    loaded = load_model(job.model, splits.task, len(labels) or None, labels or None)
    load(loaded.model, delta_dir)
    encoded = encode(splits.test, loaded.tokenizer, splits.task, job.max_length, labels)
    return {"delta": str(delta_dir), "method": meta["method"], "data": splits.describe(),
            "test": evaluate(loaded.model, encoded, num_labels=max(2, len(labels)))}


def eval_labels(meta: dict[str, Any], splits: Splits, delta_dir: Path) -> list[str]:
    """The label names in the order of the delta's head outputs: its recorded ones, else the dataset's.

    Raises:
        DataError: the delta was made for another task, or the dataset has labels the delta does not know.
    """
    recorded_task = meta.get("task")
    if recorded_task and recorded_task != splits.task:
        raise DataError(f"delta {str(delta_dir)!r} is a {recorded_task} delta but dataset {splits.name!r} is a "
                        f"{splits.task} task; evaluate it on {recorded_task} data (--data, --completion-column)")
    recorded = meta.get("labels")
    if splits.task != "classification" or not recorded:
        return list(splits.labels)
    unknown = [label for label in splits.labels if label not in recorded]
    if unknown:
        raise DataError(f"delta {str(delta_dir)!r} was trained with labels {list(recorded)}, but dataset "
                        f"{splits.name!r} has labels {splits.labels} ({unknown} unknown to the delta); evaluate it on "
                        f"data with the delta's labels (--data, --label-column)")
    return [str(label) for label in recorded]
