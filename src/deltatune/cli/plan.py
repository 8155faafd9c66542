"""``deltatune plan``: the methods and sizes that fit a budget, ranked, each with why."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..io.atomic import write_text_atomic
from ..train.job import TrainJob
from .train import _field_type

#: the TrainJob fields that shape the run a plan weighs (the rest are the method's or the output's)
RUN_FIELDS = ("model", "data", "text_column", "label_column", "completion_column", "limit", "epochs", "steps",
              "batch_size", "max_length", "seed", "dtype", "quantize", "gradient_checkpointing")


def _positive(kind):
    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        return int(value) if kind is int and value.is_integer() else value
    return parse


def _factors(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes comma-separated factors such as 0.5,1,2, got {text!r}") from None


def _plan(args: argparse.Namespace) -> int:
    from ..tune.plan import Budget, make_plan

    budget = Budget(args.max_params, args.max_memory, args.max_minutes, args.memory_margin)
    changes = {name: getattr(args, name) for name in RUN_FIELDS if getattr(args, name) is not None}
    job = TrainJob(**changes, progress=False)
    plan = make_plan(job, budget, methods=args.methods, probe_steps=args.probe_steps, factors=args.sizes,
                     evidence=args.evidence)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "plan.json", json.dumps({**plan.to_dict(), "probe": plan.probe}, indent=2) + "\n")
        write_text_atomic(out / "plan.md", plan.table())
    plan.require_fit()
    return 0


def add_parsers(commands) -> None:
    plan = commands.add_parser("plan", help="recommend the methods and sizes that fit a budget of trainable parameters, "
                                            "memory and minutes, from a measured probe on this machine")
    fields = {f.name: f for f in dataclasses.fields(TrainJob)}
    for name in RUN_FIELDS:
        field = fields[name]
        flag = "--" + name.replace("_", "-")
        if field.type in (bool, "bool"):
            plan.add_argument(flag, action="store_const", const=True, default=None, help=field.metadata.get("help"))
        else:
            plan.add_argument(flag, type=_field_type(field), default=None, help=field.metadata.get("help"))
    plan.add_argument("--max-params", type=_positive(int), default=None, metavar="N",
                      help="most trainable parameters")
    plan.add_argument("--max-memory", type=_positive(float), default=None, metavar="MIB",
                      help="most peak resident memory of the training process, in MiB")
    plan.add_argument("--max-minutes", type=_positive(float), default=None, metavar="MIN",
                      help="most minutes of training for the run's steps (or epochs)")
    plan.add_argument("--memory-margin", type=float, default=0.3, metavar="FRACTION",
                      help="check the predicted peak memory times 1 + this against --max-memory (default 0.3: real "
                           "MiniLM runs peaked up to 28%% above the prediction, docs/PLAN.md)")
    plan.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                      help="methods to weigh (default: every method trained from flags)")
    plan.add_argument("--sizes", type=_factors, default=(0.5, 1.0, 2.0), metavar="FACTORS",
                      help="sizes tried per method, as factors of its size option's default (default 0.5,1,2)")
    plan.add_argument("--probe-steps", type=int, default=4,
                      help="training steps per method in the probe; the first warms up (default 4)")
    plan.add_argument("--evidence", default=None, metavar="COMPARE_JSON",
                      help="rank the fits by the accuracy a `deltatune compare` of the same model and data measured")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    plan.add_argument("--out", default=None, metavar="DIR", help="also write DIR/plan.md and DIR/plan.json (with the probe)")
    plan.set_defaults(run=_plan)
