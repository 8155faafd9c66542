"""A sweep's results: the leaderboard (Markdown and JSON), the Pareto fronts and their chart.

The rows are plain dicts read from the study's trials (see :func:`deltatune.tune.sweep.trial_row`);
everything here is a pure function of them, apart from the writers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_path, write_text_atomic

#: the order of states in the leaderboard: trained out, stopped early, then the rest
STATE_ORDER = {"complete": 0, "pruned": 1, "fail": 2, "running": 3}
#: the costs a Pareto front is drawn against: (row key, axis label)
COSTS = (("trainable_parameters", "trainable parameters"), ("train_seconds", "train seconds"))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, by cost (lower is better) then score
    (higher is better): ``j`` dominates ``i`` when it costs no more, scores no less, and is
    strictly better on one of the two. Returned cheapest first."""
    def dominated(i: int) -> bool:
        cost, score = points[i]
        return any(c <= cost and s >= score and (c < cost or s > score) for c, s in points)
    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: (points[i][0], -points[i][1]))


def score(row: dict[str, Any], maximize: bool) -> float | None:
    """A row's validation metric, turned so that higher is better (``None`` if it has none)."""
    value = row.get("value")
    return None if value is None else (value if maximize else -value)


def ranked(rows: list[dict[str, Any]], maximize: bool) -> list[dict[str, Any]]:
    """Complete trials best first (ties: fewer trainable parameters), then pruned ones by the
    value where they stopped, then failed and running ones by trial number."""
    def key(row: dict[str, Any]) -> tuple:
        value = score(row, maximize)
        return (STATE_ORDER.get(row["state"], 4), 0 if value is not None else 1, -(value or 0.0),
                row.get("trainable_parameters") or 0, row["trial"])
    return sorted(rows, key=key)


def fronts(rows: list[dict[str, Any]], maximize: bool) -> dict[str, list[int]]:
    """Per cost (:data:`COSTS`), the trial numbers on the Pareto front of the complete trials."""
    done = [r for r in rows if r["state"] == "complete" and r.get("value") is not None]
    result = {}
    for cost, _ in COSTS:
        usable = [r for r in done if r.get(cost) is not None]
        front = pareto_front([(r[cost], score(r, maximize)) for r in usable])
        result[cost] = [usable[i]["trial"] for i in front]
    return result


def _options(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in (row.get("options") or {}).items()) or "-"


def _cell(value: Any, form: str = "{}") -> str:
    return "-" if value is None else form.format(value)


def leaderboard_markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The leaderboard as a Markdown table, with the sweep's settings above and its Pareto
    fronts below."""
    maximize = summary["direction"] == "maximize"
    metric = summary["metric"]
    states = {s: sum(r["state"] == s for r in rows) for s in STATE_ORDER}
    lines = [f"# Sweep: {summary['model']} on {summary['data']}", "",
             f"{len(rows)} trials ({states['complete']} complete, {states['pruned']} pruned, {states['fail']} failed"
             + (f", {states['running']} running" if states["running"] else "") + "); "
             + (f"{summary['steps']} steps each, " if summary.get("steps") else f"{summary.get('epochs', 1):g} epochs each, ")
             + f"evaluated every {summary['eval_every']}; ranked by validation {metric} "
             f"({'higher' if maximize else 'lower'} is better); pruner: {summary['pruner']}.", "",
             f"| trial | state | method | options | lr | targets | validation {metric} | trainable parameters "
             f"| train s | steps |",
             "|---:|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in ranked(rows, maximize):
        state = r["state"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {r['trial']} | {state} | {r.get('method') or '-'} | {_options(r)} | {_cell(r.get('lr'), '{:.3g}')} "
                     f"| {r.get('targets') or '-'} | {_cell(r.get('value'), '{:.4f}')} "
                     f"| {_cell(r.get('trainable_parameters'), '{:,}')} | {_cell(r.get('train_seconds'), '{:.1f}')} "
                     f"| {_cell(r.get('steps'))} |")
    lines.append("")
    for cost, label in COSTS:
        trials = fronts(rows, maximize)[cost]
        lines.append(f"Pareto front, validation {metric} against {label}: "
                     + (", ".join(f"trial {t}" for t in trials) or "no complete trial yet") + ".")
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """``pareto.png``: the validation metric against trainable parameters and against train
    time; complete trials as dots (the front joined and ringed), pruned ones as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    maximize = summary["direction"] == "maximize"
    front = fronts(rows, maximize)
    figure, axes = plt.subplots(1, len(COSTS), figsize=(6 * len(COSTS), 4.5))
    for axis, (cost, label) in zip(axes, COSTS):
        for state, marker, colour in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:gray")):
            shown = [r for r in rows if r["state"] == state and r.get("value") is not None and r.get(cost) is not None]
            axis.scatter([r[cost] for r in shown], [r["value"] for r in shown], marker=marker, color=colour,
                         label=state)
            for r in shown:
                axis.annotate(f"{r['trial']} {r.get('method', '')}", (r[cost], r["value"]), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
        by_trial = {r["trial"]: r for r in rows}
        points = [by_trial[t] for t in front[cost]]
        if points:
            axis.plot([r[cost] for r in points], [r["value"] for r in points], "-", color="tab:red", alpha=0.6,
                      drawstyle="steps-post")  # the best value reachable at each cost
            axis.scatter([r[cost] for r in points], [r["value"] for r in points], s=120, facecolors="none",
                         edgecolors="tab:red", label="Pareto front")
        costs = [r[cost] for r in rows if r.get(cost)]
        if cost == "trainable_parameters" and costs and max(costs) >= 10 * min(costs):  # sizes over decades
            axis.set_xscale("log")
        axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
        axis.set_xlabel(label)
        axis.set_ylabel(f"validation {summary['metric']}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"sweep: {Path(str(summary['model'])).name} on {Path(str(summary['data'])).name}")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def write_report(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path, chart: bool = True) -> str:
    """Write ``leaderboard.md``, ``leaderboard.json`` and (``chart``) ``pareto.png`` in ``out``,
    each atomically; returns the Markdown."""
    maximize = summary["direction"] == "maximize"
    text = leaderboard_markdown(rows, summary)
    write_text_atomic(out / "leaderboard.md", text)
    write_text_atomic(out / "leaderboard.json", json.dumps(
        {"summary": summary, "trials": ranked(rows, maximize), "pareto_front": fronts(rows, maximize)}, indent=2) + "\n")
    if chart:
        plot_pareto(rows, summary, out / "pareto.png")
    return text
