"""``deltatune train`` and ``deltatune eval``: flags map one to one onto ``TrainJob`` fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..core.options import config_options, parse_value
from ..core.registry import method_specs
from ..errors import ConfigError, DeltaFileError
from ..io.artifact import read_meta
from ..train.distributed import is_main
from ..train.job import TrainJob, run_eval, run_train
from ..train.multi import run_multi

#: TrainJob fields set by their own flags (nargs) or not from the command line
_SPECIAL = {"targets", "options", "progress"}


def _job_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainJob) if f.name not in _SPECIAL]


def _field_type(field: dataclasses.Field):
    """The flag type of a job field: its annotation without ``| None``."""
    import typing

    annotation = typing.get_type_hints(TrainJob)[field.name]
    return lambda text: parse_value(annotation, text, field.name)


def method_flags() -> dict[str, tuple[str, list[str], str]]:
    """Every trainable method's options as flags: flag -> (option name, methods, help).

    An option named like a job field (prompt tuning's ``seed``) gets the flag
    ``--<method>-<option>`` so it cannot shadow the job's flag.
    """
    job = {f.name for f in _job_fields()} | _SPECIAL
    flags: dict[str, tuple[str, list[str], str]] = {}
    for spec in method_specs():
        if not spec.trainable_from_flags:
            continue
        for option in config_options(spec.config_class):
            names = option.flags if option.name not in job else (f"--{spec.name}-{option.name.replace('_', '-')}",)
            for flag in names:
                name, methods, texts = flags.get(flag, (option.name, [], {}))
                texts.setdefault(option.help.replace("``", ""), []).append(spec.name)
                flags[flag] = (name, [*methods, spec.name], texts)
    # methods that share a flag name but mean different things by it each say what they mean
    return {flag: (name, methods, next(iter(texts)) if len(texts) == 1 else
                   " ".join(f"{', '.join(users)}: {text}" for text, users in texts.items()))
            for flag, (name, methods, texts) in flags.items()}


def _dest(flag: str) -> str:
    return "method_option_" + flag[2:].replace("-", "_")


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    for field in _job_fields():
        flag = "--" + field.name.replace("_", "-")
        text = field.metadata.get("help", "")
        if field.name == "method":
            text = "; ".join(f"{s.name}: {s.summary}" for s in method_specs() if s.trainable_from_flags)
        if field.type in (bool, "bool"):  # a switch: given means True, absent leaves the job's value
            parser.add_argument(flag, action="store_const", const=True, default=None, help=text)
        else:
            parser.add_argument(flag, type=_field_type(field), default=None, help=text)
    parser.add_argument("--targets", nargs="+", default=None, help="module patterns to adapt, or all-linear "
                        "(default: the method's roles, found in the model's structure)")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of the same options (flags win)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    options = parser.add_argument_group("method options (each applies to the methods named in brackets)")
    for flag, (_, methods, text) in method_flags().items():
        options.add_argument(flag, dest=_dest(flag), default=None, metavar="VALUE",
                             help=f"{text} [{', '.join(methods)}]")


def job_from_args(args: argparse.Namespace, base=None):
    """A TrainJob from defaults, then ``--config``, then the flags given."""
    job = base or (TrainJob.from_yaml(args.config) if args.config else TrainJob())
    changes = {f.name: getattr(args, f.name) for f in _job_fields() if getattr(args, f.name, None) is not None}
    if args.targets:
        changes["targets"] = list(args.targets)
    if args.no_progress:
        changes["progress"] = False
    options = dict(job.options)
    for flag, (name, _, _) in method_flags().items():
        value = getattr(args, _dest(flag), None)
        if value is not None:
            options[name] = value
    return dataclasses.replace(job, **changes, options=options)


def _train(args: argparse.Namespace) -> int:
    if args.multi:
        return _train_multi(args)
    if args.resume:
        config = Path(args.resume) / "config.yaml"
        if not config.is_file():
            raise DeltaFileError(f"{config} not found; --resume takes the --out folder of an earlier run")
        job = job_from_args(args, base=TrainJob.from_yaml(config))
        job = dataclasses.replace(job, out=str(args.resume))
    else:
        job = job_from_args(args)
    metrics = run_train(job, resume=bool(args.resume))

    if not is_main():  # under torchrun / accelerate launch only rank 0 reports
        return 0
    print(json.dumps({k: metrics[k] for k in ("method", "test", "trainable_parameters", "percent_trainable",
                                              "train_seconds", "delta_bytes")}, indent=2))
    print(f"wrote {job.out}/")
    return 0


def _train_multi(args: argparse.Namespace) -> int:
    """``train --multi a.yaml b.yaml``: one delta per task config, trained in shared mixed batches."""
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


def _eval_auto(args: argparse.Namespace) -> int:
    from ..library import Library, default_db
    from ..library.evaluate import evaluate_auto

    job = job_from_args(args)
    if not job.data:
        raise ConfigError("eval --delta auto needs the dataset to evaluate on: pass --data")
    library = Library(args.library or default_db())
    print(json.dumps(evaluate_auto(library, job.model, job.data, router=args.router, top_k=args.route_top_k, seed=job.seed,
                                   max_length=job.max_length, limit=job.limit, text_column=job.text_column,
                                   label_column=job.label_column), indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.delta == AUTO:
        return _eval_auto(args)
    run_config = Path(args.delta) / "config.yaml"
    if run_config.is_file():  # a training run's folder: evaluate the way it was trained
        base = TrainJob.from_yaml(run_config)
    else:  # any other delta (merged, compressed, imported): its method does not matter to evaluation
        recorded = read_meta(args.delta).get("provenance") or {}
        base = TrainJob(**{key: recorded[key] for key in ("model", "data") if isinstance(recorded.get(key), str)})
    job = job_from_args(args, base=base)
    print(json.dumps(run_eval(args.delta, job), indent=2))
    return 0


#: ``eval --delta auto``: route each row among a library's deltas
AUTO = "auto"


def add_parsers(commands) -> None:
    train = commands.add_parser("train", help="train a delta on a dataset and write delta, metrics and plots")
    add_job_flags(train)
    train.add_argument("--resume", default=None, metavar="DIR", help="continue an interrupted run in DIR")
    train.add_argument("--multi", nargs="+", default=None, metavar="TASK.yaml",
                       help="train one delta per task config in shared mixed batches (writes OUT/<task>/)")
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("eval", help="evaluate a saved delta on a dataset's test split")
    evaluate.add_argument("--delta", required=True,
                          help=f"a delta folder (a train --out folder), or {AUTO!r}: each row routed among a library's "
                               f"deltas for the base (--library, --router)")
    evaluate.add_argument("--library", default=None, metavar="DB",
                          help="with --delta auto: the library (default: $DELTATUNE_LIBRARY, else ~/.deltatune/library.db)")
    evaluate.add_argument("--router", choices=("centroid", "arrow"), default="centroid",
                          help="with --delta auto: nearest training-example centroid per row, or Arrow per token")
    evaluate.add_argument("--route-top-k", type=int, default=1,
                          help="with --delta auto --router arrow: how many LoRAs each token mixes")
    add_job_flags(evaluate)
    evaluate.set_defaults(run=_eval)
