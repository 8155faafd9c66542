"""``deltatune compare`` (and ``demo --compare``): every method on the same data, budget and seed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import yaml

from ..core.registry import get_method, method_specs
from ..errors import DeltaError
from ..io.atomic import write_text_atomic
from .train import add_job_flags, job_from_args

def compared_methods() -> list[str]:
    """Every method a training job builds from flags, in registration order."""
    return [spec.name for spec in method_specs() if spec.trainable_from_flags]


def run_compare(base, out: Path, results: Path, methods=None, targets=None) -> int:
    """Train each method in a fresh process (so peak memory is that method's own) and tabulate.

    ``targets`` (when given) go to every method that takes targets; the others use their own.
    """
    methods = compared_methods() if methods is None else methods
    rows = []
    for i, method in enumerate(methods, 1):
        print(f"{i}/{len(methods)}  {method}", flush=True)
        takes_targets = targets and get_method(method).targeted
        job = dataclasses.replace(base, method=method, targets=targets if takes_targets else None, out=str(out / method))
        config = out / f"{method}.yaml"
        write_text_atomic(config, yaml.safe_dump(dataclasses.asdict(job), sort_keys=False))
        done = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", "--config", str(config)])
        if done.returncode != 0:
            raise DeltaError(f"training {method} failed (exit code {done.returncode}); see the output above")
        rows.append(json.loads((out / method / "metrics.json").read_text()))
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / "compare.json", json.dumps(rows, indent=2) + "\n")
    write_text_atomic(results / "compare.md", table(rows, base))
    plot(rows, results / "compare.png")
    print(table(rows, base))
    return 0


def table(rows: list[dict], base) -> str:
    data = rows[0]["data"]
    lines = [
        f"# Methods compared: {base.model} on {base.data}",
        "",
        f"Same data, budget and seed for every method: {base.steps} steps of batch {base.batch_size}, "
        f"max length {base.max_length}, seed {base.seed}; split sizes {data['sizes']} (deduplicated, seeded). "
        f"Test-split metrics; CPU, 2 threads.",
        "",
        "| method | accuracy | macro-F1 | trainable params | % trainable | delta file | train time | peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in rows:
        lines.append(
            f"| {m['method']} | {m['test']['accuracy']:.4f} | {m['test']['macro_f1']:.4f} | {m['trainable_parameters']:,} | "
            f"{m['percent_trainable']:.3f}% | {m['delta_bytes'] / 1024:,.0f} KiB | {m['train_seconds']:.0f} s | "
            f"{m['peak_memory_mb']:,.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for m in rows:
        axis.scatter(m["trainable_parameters"], m["test"]["accuracy"], s=40)
        axis.annotate(m["method"], (m["trainable_parameters"], m["test"]["accuracy"]), textcoords="offset points", xytext=(5, 4))
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (log scale)")
    axis.set_ylabel("test accuracy")
    axis.set_title("accuracy against trainable parameters")
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)


def _compare(args) -> int:
    base = job_from_args(args)
    return run_compare(base, Path(args.out or base.out), Path(args.results), methods=args.methods,
                       targets=base.targets)


def add_parsers(commands) -> None:
    compare = commands.add_parser("compare", help="train several methods on the same data, budget and seed; "
                                                  "write a table and a chart of accuracy against parameters")
    add_job_flags(compare)
    compare.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                         help="methods to compare (default: every method trained from flags)")
    compare.add_argument("--results", default="results", help="where compare.md, compare.json and compare.png go")
    compare.set_defaults(run=_compare)
