"""``deltatune sweep``: search methods, options, learning rates and targets (see docs/SWEEP.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _sweep(args: argparse.Namespace) -> int:
    from ..tune.sweep import run_sweep  # optuna and the training stack load only for this command
    from ..tune.sweep_config import load_sweep_config

    config = load_sweep_config(args.config, out=args.out, n_trials=args.n_trials, model=args.model, data=args.data)
    result = run_sweep(config)
    print(result["markdown"])
    print(f"wrote {config.out}/ (leaderboard.md, leaderboard.json, pareto.png, trials/<number>/, study.db)")
    return 0


def add_parsers(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="search delta methods, options, learning rates and targets (optuna; resumable; prunes weak trials)",
        description="Run the search a sweep YAML describes; running it again continues it (docs/SWEEP.md).")
    sweep.add_argument("--config", type=Path, required=True, help="the sweep YAML (model, data, steps, space, ...)")
    sweep.add_argument("--out", default=None, help="output folder (overrides the YAML's out)")
    sweep.add_argument("--n-trials", type=int, default=None,
                       help="complete or pruned trials to reach (overrides the YAML's n_trials)")
    sweep.add_argument("--model", default=None, help="the base model (overrides the YAML's model)")
    sweep.add_argument("--data", default=None, help="the dataset (overrides the YAML's data)")
    sweep.set_defaults(run=_sweep)
