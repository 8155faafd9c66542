"""One training run from options to files: data, model, delta, loop, metrics, plots.

The CLI's ``train``, ``eval`` and ``demo`` commands are thin shells over this module.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.config import DeltaConfig
from ..core.inject import attach, delta_stats
from ..core.params import count_parameters
from ..core.options import option_lookup
from ..core.quantized import get_format
from ..core.registry import get_method, method_specs
from ..data.datasets import DataError, Splits, load_dataset
from ..errors import ConfigError
from ..io.artifact import META_FILE, TENSORS_FILE, load, read_meta, save
from ..io.atomic import write_text_atomic
from ..methods.head import find_head
from ..models.load import base_dtype, check_model_name, load_model
from . import distributed
from .batches import encode
from .fsdp import check_method, full_parameters, is_sharded, local_parameter_mb
from .loop import Settings, train
from .metrics import evaluate
from .plot import plot_losses

def _flag(help_text: str, **kwargs: Any) -> Any:
    """A job field with its ``--flag`` help text."""
    return field(metadata={"help": help_text}, **kwargs)


@dataclass
class TrainJob:
    """Everything one run needs; written to ``config.yaml`` so ``--resume`` can rebuild it.

    ``options`` holds the method's own options by config field name (``{"r": 16}`` for
    LoRA); the CLI's method flags and the YAML keys come from the method's config class.
    """

    model: str = _flag("minilm, smollm2, or a local transformers folder", default="minilm")
    data: str = _flag("movie-reviews, sms-spam, trec, chatterbot, or a .csv/.tsv/.jsonl file", default="movie-reviews")
    method: str = _flag("the delta method (see the list below)", default="lora")
    out: str = _flag("output folder", default="runs/lora")
    text_column: str = _flag("text column of a CSV/JSONL file (the prompt for causal LM)", default="text")
    label_column: str = _flag("label column of a CSV/JSONL file", default="label")
    completion_column: str | None = _flag("completion column: makes a causal-LM task", default=None)
    limit: int | None = _flag("use at most this many examples (seeded sample)", default=None)
    targets: list[str] | None = _flag("module patterns to adapt (default: found from the model's structure)",
                                      default=None)
    options: dict[str, Any] = field(default_factory=dict)
    epochs: float = _flag("passes over the training split", default=1.0)
    steps: int | None = _flag("optimizer steps (overrides --epochs)", default=None)
    batch_size: int = _flag("global batch size", default=32)
    lr: float | None = _flag("peak learning rate (default: the method's)", default=None)
    max_length: int = _flag("tokens per example", default=64)
    seed: int = _flag("seed for the split, initialisation, order and dropout", default=0)
    eval_every: int = _flag("evaluate on validation every N steps (0: never)", default=0)
    save_every: int = _flag("write a resumable checkpoint every N steps (0: never)", default=0)
    quantize: str | None = _flag("quantise the frozen base's Linear layers: int8 or 4bit (NF4); the delta stays float32",
                                 default=None)
    dtype: str = _flag("precision of the frozen base: fp32 or bf16 (the delta and its optimizer state stay float32)",
                       default="fp32")
    sharding: str = _flag("under torchrun / accelerate launch: ddp (each rank a whole copy) or fsdp (FSDP2: each "
                          "rank a shard of the base and the delta); no effect in one process", default="ddp")
    gradient_checkpointing: bool = _flag("recompute each transformer block's activations in the backward pass "
                                         "instead of keeping them: less memory, about a third more compute",
                                         default=False)
    progress: bool = True

    def __post_init__(self) -> None:
        spec = get_method(self.method)
        if not spec.trainable_from_flags:
            trainable = ", ".join(s.name for s in method_specs() if s.trainable_from_flags)
            raise ConfigError(f"method {self.method!r} is built with the Python API, not trained from flags "
                              f"({spec.summary}); train one of {trainable}")
        self.options = dict(self.options or {})
        known = option_lookup(spec.config_class)
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            takes = ", ".join(sorted({o.name for o in known.values()})) or "no options"
            raise ConfigError(f"option(s) {unknown} are not options of {self.method}; {self.method} takes {takes}")
        self.options = {known[k].name: v for k, v in self.options.items()}
        base_dtype(self.dtype)
        if spec.trains_base and self.dtype != "fp32":
            raise ConfigError(f"--dtype {self.dtype} sets the frozen base's precision, but method {self.method!r} trains "
                              f"the base itself (in float32); drop --dtype or pick a delta method")
        if self.sharding not in distributed.SHARDINGS:
            raise ConfigError(f"--sharding {self.sharding!r} is not a sharding; use one of {', '.join(distributed.SHARDINGS)}")
        if self.sharding == "fsdp":
            check_method(self.method)
        if self.quantize is not None:
            get_format(self.quantize)
            if self.sharding == "fsdp":
                raise ConfigError(f"--sharding fsdp shards plain float tensors, and --quantize {self.quantize} makes the "
                                  f"frozen base's weights quantised tensors that FSDP cannot split; drop one of the two "
                                  f"(--sharding ddp trains a quantised base)")
            if spec.trains_base:
                raise ConfigError(f"--quantize {self.quantize} freezes a quantised base, but method {self.method!r} "
                                  f"trains the base itself; drop --quantize or pick a delta method")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method).default_lr

    def settings(self) -> Settings:
        return Settings(epochs=self.epochs, steps=self.steps, batch_size=self.batch_size, lr=self.learning_rate,
                        seed=self.seed, eval_every=self.eval_every, save_every=self.save_every, progress=self.progress,
                        sharding=self.sharding, gradient_checkpointing=self.gradient_checkpointing)

    @classmethod
    def from_yaml(cls, path: Path) -> "TrainJob":
        """A job from a YAML file of job fields; method options may sit at the top level
        (``r: 16``) or under ``options:``."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of options, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        options = dict(data.pop("options", None) or {})
        method_options = option_lookup(get_method(data.get("method", cls.method)).config_class)
        for key in [k for k in data if k not in known and k in method_options]:
            options[key] = data.pop(key)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) {unknown}; valid: {sorted(known - {'options'})} and the "
                              f"method's options {sorted(method_options)}")
        return cls(**data, options=options)


def delta_config(job: TrainJob, model: torch.nn.Module, task: str) -> DeltaConfig | None:
    """The delta config a job asks for (``None`` for a method that trains the base itself)."""
    spec = get_method(job.method)
    if spec.trains_base:
        return None
    head = find_head(model) if task == "classification" else None
    known = option_lookup(spec.config_class)
    options: dict[str, Any] = {"modules_to_save": (head,) if head else ()}
    if job.targets:
        options["targets"] = tuple(job.targets)
    for name, value in job.options.items():
        option = known[name]
        options[option.name] = option.parse(value) if isinstance(value, str) and option.annotation is not str else value
    return spec.config_class(**options)


def quantization_summary(report) -> dict[str, Any]:
    """A :class:`~deltatune.models.quantize.QuantizeReport` as ``metrics.json`` records it."""
    return {"format": report.format, "layers": len(report.quantized), "skipped": report.skipped,
            "weight_bytes_before": report.bytes_before, "weight_bytes_after": report.bytes_after}


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(job: TrainJob) -> tuple[Splits, Any]:
    check_model_name(job.model)
    splits = load_dataset(job.data, job.seed, text_column=job.text_column, label_column=job.label_column,
                          completion_column=job.completion_column, limit=job.limit)
    torch.manual_seed(job.seed)
    loaded = load_model(job.model, splits.task, len(splits.labels) or None, splits.labels or None,
                        quantize=job.quantize, dtype=job.dtype)
    return splits, loaded


def run_train(job: TrainJob, *, resume: bool = False,
              on_eval: Callable[[int, dict[str, float]], bool | None] | None = None) -> dict[str, Any]:
    """Train, evaluate on the test split, and write the run folder; returns the metrics.

    ``on_eval(step, validation metrics)``: called at each evaluation (``job.eval_every``); a true
    value stops training there, and the run is finished and written as it stands (``steps``
    records the steps done).

    Under ``torchrun`` / ``accelerate launch`` every rank trains on its share of each global
    batch; rank 0 alone evaluates and writes files, and every rank returns rank 0's metrics.
    """
    joined = distributed.init_from_environment()
    try:
        metrics = _run_train(job, resume, on_eval)
    except BaseException:
        if joined:
            distributed.finish(synchronise=False)
        raise
    if joined:
        distributed.finish()
    return metrics


def _run_train(job: TrainJob, resume: bool, on_eval=None) -> dict[str, Any]:
    out = Path(job.out)
    splits, loaded = prepare(job)
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = {name: encode(getattr(splits, name), tokenizer, splits.task, job.max_length, splits.labels)
               for name in ("train", "validation", "test")}
    num_labels = max(2, len(splits.labels))
    model.to(distributed.device())
    # a causal LM's base is already a model of the text: its test loss is what the delta must beat
    # (a classifier's base has an untrained head, so it has no such reference)
    base_test = evaluate(model, encoded["test"], num_labels=num_labels) if splits.task != "classification" else None
    config = delta_config(job, model, splits.task)
    if config is None:  # the method trains the base itself
        model.requires_grad_(True)
        trainable = count_parameters(model)
    else:
        trainable = attach(model, config, name=job.method).trainable
    model.to(distributed.device())
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", yaml.safe_dump(asdict(job), sort_keys=False))
    result = train(model, encoded["train"], job.settings(), validation=encoded["validation"], num_labels=num_labels,
                   checkpoint_dir=out / "checkpoint", resume=resume, on_eval=on_eval)
    memory = {"peak_memory_mb_per_rank": [round(m, 1) for m in distributed.every_rank(peak_memory_mb())],
              "parameter_mb_per_rank": [round(m, 3) for m in distributed.every_rank(local_parameter_mb(model))]}
    sharded = is_sharded(model)  # then every rank takes part in each forward and in gathering the weights
    if not distributed.is_main() and not sharded:  # the ranks hold the same weights; rank 0 evaluates and writes
        return distributed.from_main(None)
    evaluated = {name: evaluate(model, encoded[name], num_labels=num_labels) for name in ("test", "validation")}
    with full_parameters(model):  # under FSDP the whole weights on every rank (a gather); else a no-op
        if not distributed.is_main():
            return distributed.from_main(None)
        metrics = {
            "model": job.model, "data": splits.describe(), "method": job.method, "task": splits.task,
            "test": evaluated["test"], **({"base_test": base_test} if base_test else {}), "validation": evaluated["validation"],
            "trainable_parameters": trainable, "total_parameters": count_parameters(model),
            "percent_trainable": 100 * trainable / count_parameters(model),
            "steps": result["steps"], "seed": job.seed, "train_seconds": round(result["seconds"], 2),
            "tokens_per_second": round(result["tokens_per_second"], 1), "peak_memory_mb": round(peak_memory_mb(), 1),
            **memory, "sharding": job.sharding if distributed.rank_and_world()[1] > 1 else None,
        }
        if loaded.quantization is not None:
            metrics["quantization"] = quantization_summary(loaded.quantization)
        stats = delta_stats(model)  # methods' own statistics (a router's expert load per layer)
        if stats:
            metrics["delta_stats"] = stats
        metrics["delta_bytes"] = _write_result(model, job, out, metrics, config)
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_text_atomic(out / "history.json", json.dumps(asdict(result["history"])) + "\n")
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
    loaded = load_model(job.model, splits.task, len(labels) or None, labels or None, quantize=job.quantize,
                        dtype=job.dtype)
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
