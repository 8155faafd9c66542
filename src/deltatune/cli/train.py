"""``deltatune train`` and ``deltatune eval``: flags map one to one onto ``TrainJob`` fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

# flag -> (TrainJob field, type, help)
JOB_FLAGS = {
    "--model": ("model", str, "minilm, smollm2, or a local transformers folder"),
    "--data": ("data", str, "movie-reviews, sms-spam, trec, chatterbot, or a .csv/.tsv/.jsonl file"),
    "--text-column": ("text_column", str, "text column of a CSV/JSONL file (the prompt for causal LM)"),
    "--label-column": ("label_column", str, "label column of a CSV/JSONL file"),
    "--completion-column": ("completion_column", str, "completion column: makes a causal-LM task"),
    "--limit": ("limit", int, "use at most this many examples (seeded sample)"),
    "--method": ("method", str, "lora, dora, adapter, prefix, prompt, ia3, bitfit, head or full"),
    "--rank": ("rank", int, "LoRA/DoRA rank"),
    "--alpha": ("alpha", float, "LoRA/DoRA alpha"),
    "--dropout": ("dropout", float, "LoRA/DoRA dropout"),
    "--bottleneck": ("bottleneck", int, "adapter bottleneck width"),
    "--placement": ("placement", str, "adapter placement: houlsby, pfeiffer or parallel"),
    "--num-virtual-tokens": ("num_virtual_tokens", int, "prefix/prompt length"),
    "--projection-dim": ("projection_dim", int, "prefix reparameterisation MLP width (0: none)"),
    "--epochs": ("epochs", float, "passes over the training split"),
    "--steps": ("steps", int, "optimizer steps (overrides --epochs)"),
    "--batch-size": ("batch_size", int, "global batch size"),
    "--lr": ("lr", float, "peak learning rate (default: per method)"),
    "--max-length": ("max_length", int, "tokens per example"),
    "--seed": ("seed", int, "seed for the split, initialisation, order and dropout"),
    "--eval-every": ("eval_every", int, "evaluate on validation every N steps (0: never)"),
    "--save-every": ("save_every", int, "write a resumable checkpoint every N steps (0: never)"),
    "--out": ("out", str, "output folder"),
}


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    for flag, (_, kind, text) in JOB_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--targets", nargs="+", default=None, help="module patterns to adapt (default: per model family)")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of the same options (flags win)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def job_from_args(args: argparse.Namespace, base=None):
    """A TrainJob from defaults, then ``--config``, then the flags given."""
    from ..train.job import TrainJob

    job = base or (TrainJob.from_yaml(args.config) if args.config else TrainJob())
    changes = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in JOB_FLAGS.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.targets:
        changes["targets"] = list(args.targets)
    if args.no_progress:
        changes["progress"] = False
    return dataclasses.replace(job, **changes)


def _train(args: argparse.Namespace) -> int:
    from ..train.job import TrainJob, run_train

    if args.multi:
        return _train_multi(args)
    if args.resume:
        config = Path(args.resume) / "config.yaml"
        if not config.is_file():
            from ..errors import DeltaFileError

            raise DeltaFileError(f"{config} not found; --resume takes the --out folder of an earlier run")
        job = job_from_args(args, base=TrainJob.from_yaml(config))
        job = dataclasses.replace(job, out=str(args.resume))
    else:
        job = job_from_args(args)
    metrics = run_train(job, resume=bool(args.resume))
    from ..train.distributed import is_main

    if not is_main():  # under torchrun / accelerate launch only rank 0 reports
        return 0
    print(json.dumps({k: metrics[k] for k in ("method", "test", "trainable_parameters", "percent_trainable",
                                              "train_seconds", "delta_bytes")}, indent=2))
    print(f"wrote {job.out}/")
    return 0


def _train_multi(args: argparse.Namespace) -> int:
    """``train --multi a.yaml b.yaml``: one delta per task config, trained in shared mixed batches."""
    from ..errors import ConfigError
    from ..train.job import TrainJob
    from ..train.multi import run_multi

    if args.resume or args.config or not args.out:
        raise ConfigError("--multi takes task YAML files and --out DIR; it cannot be combined with --resume or --config")
    jobs = {Path(path).stem: job_from_args(args, base=TrainJob.from_yaml(path)) for path in args.multi}
    if len(jobs) != len(args.multi):
        raise ConfigError(f"task names (the YAML files' names) repeat in {args.multi}; rename the files")
    summary = run_multi(jobs, args.out)
    print(json.dumps({name: {k: m[k] for k in ("method", "test", "trainable_parameters", "delta_bytes")}
                      for name, m in summary["tasks"].items()}, indent=2))
    print(f"wrote {args.out}/<task>/ for {', '.join(jobs)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..io.artifact import read_meta
    from ..train.job import TrainJob, run_eval

    run_config = Path(args.delta) / "config.yaml"
    if run_config.is_file():  # a training run's folder: evaluate the way it was trained
        base = TrainJob.from_yaml(run_config)
    else:  # any other delta (merged, compressed, imported): its method does not matter to evaluation
        recorded = read_meta(args.delta).get("provenance") or {}
        base = TrainJob(**{key: recorded[key] for key in ("model", "data") if isinstance(recorded.get(key), str)})
    job = job_from_args(args, base=base)
    print(json.dumps(run_eval(args.delta, job), indent=2))
    return 0


def add_parsers(commands) -> None:
    train = commands.add_parser("train", help="train a delta on a dataset and write delta, metrics and plots")
    add_job_flags(train)
    train.add_argument("--resume", default=None, metavar="DIR", help="continue an interrupted run in DIR")
    train.add_argument("--multi", nargs="+", default=None, metavar="TASK.yaml",
                       help="train one delta per task config in shared mixed batches (writes OUT/<task>/)")
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("eval", help="evaluate a saved delta on a dataset's test split")
    evaluate.add_argument("--delta", required=True, help="a delta folder (a train --out folder)")
    add_job_flags(evaluate)
    evaluate.set_defaults(run=_eval)
