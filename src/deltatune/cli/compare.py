"""``deltatune compare`` (and ``demo --compare``): every method on the same data, budget and seed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import yaml

from ..core.registry import get_method, method_specs
from ..errors import DeltaError, NotApplicableError
from ..io.atomic import write_text_atomic
from .train import add_job_flags, job_from_args


ERROR_PREFIX = "deltatune: error: "


def compared_methods() -> list[str]:
    """Every method a training job builds from flags, in registration order."""
    return [spec.name for spec in method_specs() if spec.trainable_from_flags]


def same_budget(row: dict, base) -> bool:
    """Whether a compare row was trained on ``base``'s model, data, steps, batch, length and seed."""
    settings = row.get("settings", {})
    return (row.get("model") == base.model and row.get("data", {}).get("name") == base.data
            and row.get("steps") == base.steps and row.get("seed") == base.seed
            and settings.get("batch_size") == base.batch_size and settings.get("max_length") == base.max_length)


def run_compare(base, out: Path, results: Path, methods=None, targets=None, keep: bool = False) -> int:
    """Train each method in a fresh process (so peak memory is that method's own) and tabulate.

    ``targets`` (when given) go to every method that takes targets; the others use their own.
    ``keep``: methods already in ``results/compare.json`` with the same budget (and no
    ``targets`` given) are not trained again; their rows are reused.
    """
    methods = compared_methods() if methods is None else methods
    previous = {}
    if keep and not targets and (results / "compare.json").exists():
        previous = {r["method"]: r for r in json.loads((results / "compare.json").read_text()) if same_budget(r, base)}
    rows = []
    for i, method in enumerate(methods, 1):
        if method in previous:
            print(f"{i}/{len(methods)}  {method}: kept from {results / 'compare.json'}", flush=True)
            rows.append(previous[method])
            continue
        print(f"{i}/{len(methods)}  {method}", flush=True)
        takes_targets = targets and get_method(method).targeted
        job = dataclasses.replace(base, method=method, targets=targets if takes_targets else None, out=str(out / method))
        config = out / f"{method}.yaml"
        write_text_atomic(config, yaml.safe_dump(dataclasses.asdict(job), sort_keys=False))
        code, last_error = _train(config)
        settings = {"batch_size": base.batch_size, "max_length": base.max_length}
        if code == NotApplicableError.exit_code:  # recorded with its reason; the others still run
            rows.append({"method": method, "not_applicable": last_error, "model": base.model,
                         "data": {"name": base.data}, "steps": base.steps, "seed": base.seed, "settings": settings})
        elif code != 0:
            raise DeltaError(f"training {method} failed (exit code {code}); see the output above")
        else:
            row = json.loads((out / method / "metrics.json").read_text())
            rows.append({**row, "settings": settings})
        _save_rows(results, rows + [previous[m] for m in methods[i:] if m in previous])
    _save_rows(results, rows)
    write_text_atomic(results / "compare.md", table(rows, base))
    plot(rows, results / "compare.png")
    print(table(rows, base))
    return 0


def _train(config: Path) -> tuple[int, str]:
    """Run one training job in a fresh process, its output passed through; return its exit
    code and the last ``deltatune: error:`` line it printed (without the prefix)."""
    child = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "train", "--config", str(config)],
                             stderr=subprocess.PIPE, text=True, bufsize=1)
    error = ""
    for line in child.stderr:
        sys.stderr.write(line)
        if line.startswith(ERROR_PREFIX):
            error = line.removeprefix(ERROR_PREFIX).strip()
    return child.wait(), error


def _save_rows(results: Path, rows: list[dict]) -> None:
    """Written after every method, so an interrupted compare resumes with ``--keep``."""
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / "compare.json", json.dumps(rows, indent=2) + "\n")


def _causal(rows: list[dict]) -> bool:
    return rows[0].get("task") not in (None, "classification")


def score(row: dict) -> float:
    """Higher is better: test accuracy, or minus the test loss for a causal LM."""
    test = row["test"]
    return test["accuracy"] if "accuracy" in test else -test["loss"]


def pareto_front(rows: list[dict]) -> list[str]:
    """Methods no other method beats on both counts: at least as good a score with no more
    trainable parameters, and better on one of them. Fewest parameters first."""
    def dominated(m: dict) -> bool:
        a, p = score(m), m["trainable_parameters"]
        return any(score(o) >= a and o["trainable_parameters"] <= p
                   and (score(o) > a or o["trainable_parameters"] < p) for o in rows)
    return [m["method"] for m in sorted(rows, key=lambda m: m["trainable_parameters"]) if not dominated(m)]


def _reference(rows: list[dict], kind: str) -> dict | None:
    for m in rows:
        try:
            if get_method(m["method"]).reference == kind:
                return m
        except DeltaError:  # a row of a method this installation does not have
            continue
    return None


def summary(rows: list[dict]) -> list[str]:
    """What the table says, in sentences: the Pareto front; for classification, the methods
    at or below the head-only floor and those within half a point of full fine-tuning; for a
    causal LM, the methods whose test loss is not below the base model's."""
    floor, ceiling = _reference(rows, "floor"), _reference(rows, "ceiling")
    deltas = [m for m in rows if m not in (floor, ceiling)]
    lines = [f"Pareto front ({'test loss' if _causal(rows) else 'accuracy'} against trainable parameters): "
             f"{', '.join(pareto_front(rows))}."]
    if _causal(rows):
        worse = [m["method"] for m in rows if m.get("base_test") and m["test"]["loss"] >= m["base_test"]["loss"]]
        base = next((m["base_test"]["loss"] for m in rows if m.get("base_test")), None)
        if base is not None:
            lines.append(f"Test loss not below the base model's ({base:.4f}): {', '.join(worse) or 'none'}.")
        return lines
    if floor:
        below = [m["method"] for m in deltas if m["test"]["accuracy"] <= floor["test"]["accuracy"]]
        lines.append(f"At or below the head-only floor ({floor['test']['accuracy']:.4f}): {', '.join(below) or 'none'}.")
    if ceiling:
        goal = ceiling["test"]["accuracy"] - 0.005
        reach = sorted((m for m in deltas if m["test"]["accuracy"] >= goal), key=lambda m: m["trainable_parameters"])
        lines.append(f"Within half a point of full fine-tuning ({ceiling['test']['accuracy']:.4f}): "
                     + (", ".join(f"{m['method']} ({m['trainable_parameters']:,} parameters)" for m in reach) or "none") + ".")
    return lines


def trained(rows: list[dict]) -> list[dict]:
    """The rows of methods that trained (not those recorded as not applicable to the model)."""
    return [r for r in rows if "not_applicable" not in r]


def table(rows: list[dict], base) -> str:
    refused = [r for r in rows if "not_applicable" in r]
    rows = trained(rows)
    data = rows[0]["data"]
    front = set(pareto_front(rows))
    causal = _causal(rows)
    quality = "test loss | base loss | perplexity" if causal else "accuracy | macro-F1"
    lines = [
        f"# Methods compared: {base.model} on {base.data}",
        "",
        f"Same data, budget and seed for every method: {base.steps} steps of batch {base.batch_size}, "
        f"max length {base.max_length}, seed {base.seed}; split sizes {data['sizes']} (deduplicated, seeded). "
        f"Test-split metrics; CPU, 2 threads. `*`: on the Pareto front.",
        "",
        f"| method | {quality} | trainable params | % trainable | delta file | train time | peak memory |",
        "|---|" + "---:|" * (len(quality.split("|")) + 5),
    ]
    for m in rows:
        mark = " *" if m["method"] in front else ""
        test = m["test"]
        if causal:
            base_loss = f"{m['base_test']['loss']:.4f}" if m.get("base_test") else "-"
            shown = f"{test['loss']:.4f} | {base_loss} | {test['perplexity']:.2f}"
        else:
            shown = f"{test['accuracy']:.4f} | {test['macro_f1']:.4f}"
        lines.append(
            f"| {m['method']}{mark} | {shown} | {m['trainable_parameters']:,} | "
            f"{m['percent_trainable']:.3f}% | {m['delta_bytes'] / 1024:,.0f} KiB | {m['train_seconds']:.0f} s | "
            f"{m['peak_memory_mb']:,.0f} MiB |"
        )
    lines += ["", *summary(rows)]
    lines += [f"Not applicable to {base.model}: `{r['method']}` ({r['not_applicable']})." for r in refused]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against trainable parameters (log scale), the Pareto front as a step line and
    the head-only floor and full fine-tuning as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = trained(rows)
    causal = _causal(rows)
    value = (lambda m: m["test"]["loss"]) if causal else (lambda m: m["test"]["accuracy"])
    figure, axis = plt.subplots(figsize=(8, 5))
    for m in rows:
        axis.scatter(m["trainable_parameters"], value(m), s=30)
        axis.annotate(m["method"], (m["trainable_parameters"], value(m)), textcoords="offset points",
                      xytext=(4, 3), fontsize=8)
    by_name = {m["method"]: m for m in rows}
    front = [by_name[n] for n in pareto_front(rows)]
    axis.step([m["trainable_parameters"] for m in front], [value(m) for m in front], where="post",
              color="black", alpha=0.5, label="Pareto front")
    references = [(f"{ref['method']} ({value(ref):.3f})", value(ref), style) for kind, style in (("floor", ":"), ("ceiling", "--"))
                  if (ref := _reference(rows, kind))]
    base = next((m["base_test"]["loss"] for m in rows if m.get("base_test")), None)
    if causal and base is not None:
        references.append((f"base model ({base:.3f})", base, ":"))
    for label, level, style in references:
        axis.axhline(level, linestyle=style, color="grey", label=label)
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (log scale)")
    what = "test loss" if causal else "test accuracy"
    axis.set_ylabel(what)
    axis.set_title(f"{what} against trainable parameters")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)


def _compare(args) -> int:
    base = job_from_args(args)
    return run_compare(base, Path(args.out or base.out), Path(args.results), methods=args.methods,
                       targets=base.targets, keep=args.keep)


def add_parsers(commands) -> None:
    compare = commands.add_parser("compare", help="train several methods on the same data, budget and seed; "
                                                  "write a table and a chart of accuracy against parameters")
    add_job_flags(compare)
    compare.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                         help="methods to compare (default: every method trained from flags)")
    compare.add_argument("--results", default="results", help="where compare.md, compare.json and compare.png go")
    compare.add_argument("--keep", action="store_true",
                         help="reuse rows of compare.json trained with the same model, data, steps, batch, length and seed")
    compare.set_defaults(run=_compare)
