"""``deltatune plan``: which methods and sizes fit a budget of parameters, memory and minutes.

Every candidate (:mod:`.candidates`) is weighed on three counts:

- **trainable parameters**, exact: its config attached the way ``train`` attaches it, counted
  and deleted again (:mod:`.probe`);
- **peak memory** of the training process: the setup memory of a fresh process (data, model,
  tokens) plus what its family's probe steps added; a size other than the probed one adds
  16 bytes per extra trainable parameter (the float32 value, its gradient and AdamW's two
  moments);
- **minutes** of training: the family's median probe step time times the run's steps.

A candidate fits when it breaks no budget; the fits are ranked by measured quality when
``evidence`` (a ``compare.json`` of the same model and data) is given, then by trainable
parameters (the most capacity the budget allows), then by minutes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..train.job import TrainJob
from .candidates import DEFAULT_FACTORS, Candidate, all_candidates
from .probe import probe_in_fresh_process

#: bytes a float32 trainable parameter holds in training: value, gradient, AdamW's two moments
BYTES_PER_TRAINABLE = 16
MIB = 2 ** 20


class NothingFits(ConfigError):
    """No candidate fits the budget (the message names the tightest budget and what would fit)."""


@dataclass(frozen=True)
class Budget:
    """Limits a plan must respect; ``None`` is no limit.

    Args:
        max_params: trainable parameters.
        max_memory_mb: peak resident memory of the training process, in MiB.
        max_minutes: minutes of training (the optimizer steps, not loading or evaluation).
        memory_margin: the memory verdict checks the predicted peak times ``1 + memory_margin``:
            real runs peak above the prediction (on MiniLM, 50-step runs by 127-178 MiB, 9-28%
            of the prediction; docs/PLAN.md), so the verdict keeps this margin.
    """

    max_params: int | None = None
    max_memory_mb: float | None = None
    max_minutes: float | None = None
    memory_margin: float = 0.3

    def __post_init__(self) -> None:
        for name, flag in (("max_params", "--max-params"), ("max_memory_mb", "--max-memory"),
                           ("max_minutes", "--max-minutes")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{flag} must be a positive number, got {value!r}; give the most you can spend "
                                  f"(or leave it out for no limit)")
        margin = self.memory_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 10:
            raise ConfigError(f"--memory-margin must be a fraction of at least 0 (0.2 is 20%), got {margin!r}")

    def limits(self) -> list[tuple[str, str, float]]:
        """(prediction key, flag, limit) for each budget given."""
        pairs = (("trainable", "--max-params", self.max_params), ("peak_mb", "--max-memory", self.max_memory_mb),
                 ("minutes", "--max-minutes", self.max_minutes))
        return [(key, flag, limit) for key, flag, limit in pairs if limit is not None]


UNITS = {"trainable": "parameters", "peak_mb": "MiB", "minutes": "min"}


def _show(key: str, value: float) -> str:
    return f"{value:,.0f}" if key != "minutes" else f"{value:,.2f}"


@dataclass
class Row:
    """One candidate's verdict: its predictions, the budgets it breaks, and why."""

    candidate: Candidate
    trainable: int | None = None
    peak_mb: float | None = None
    minutes: float | None = None
    step_seconds: float | None = None
    refused: str = ""
    breaks: dict[str, tuple[float, float]] = field(default_factory=dict)  # flag -> (predicted, limit)
    evidence: dict[str, Any] | None = None
    rank: int | None = None

    @property
    def fits(self) -> bool:
        return not self.refused and not self.breaks

    def why(self, budget: Budget) -> str:
        """One sentence: why it fits (how much of each budget it uses) or what it breaks, by how much."""
        if self.refused:
            return f"not applicable: {self.refused}"
        if self.breaks:
            key_of = {flag: key for key, flag, _ in budget.limits()}
            return "; ".join(f"breaks {flag} by {_show(key_of[flag], used - limit)} {UNITS[key_of[flag]]} "
                             f"({_show(key_of[flag], used)}{self._margin(budget, key_of[flag])} > "
                             f"{_show(key_of[flag], limit)})" for flag, (used, limit) in self.breaks.items())
        used = [f"{100 * getattr(self, key) / limit:.0f}% of {flag}" for key, flag, limit in budget.limits()]
        if budget.memory_margin and budget.max_memory_mb is not None:
            used[[k for k, _, _ in budget.limits()].index("peak_mb")] += f" ({100 * budget.memory_margin:.0f}% margin kept)"
        text = "fits" + (f": uses {', '.join(used)}" if used else " (no budget given)")
        if self.evidence:
            text += (f"; measured {self.evidence['metric']} {self.evidence['score']:.4f} with "
                     f"{self.evidence['trainable']:,} parameters in {self.evidence['source']}")
        return text

    @staticmethod
    def _margin(budget: Budget, key: str) -> str:
        return f" with the {100 * budget.memory_margin:.0f}% margin" if key == "peak_mb" and budget.memory_margin else ""

    def to_dict(self, budget: Budget) -> dict[str, Any]:
        return {"method": self.candidate.method, "options": self.candidate.options, "label": self.candidate.label,
                "rank": self.rank, "fits": self.fits, "trainable": self.trainable, "peak_mb": self.peak_mb,
                "minutes": self.minutes, "step_seconds": self.step_seconds, "refused": self.refused or None,
                "breaks": {k: list(v) for k, v in self.breaks.items()}, "evidence": self.evidence,
                "why": self.why(budget)}


@dataclass
class Plan:
    """The verdict on every candidate, fits first in rank order."""

    job: TrainJob
    budget: Budget
    rows: list[Row]
    left_out: dict[str, str]
    probe: dict[str, Any]

    @property
    def fitting(self) -> list[Row]:
        return [r for r in self.rows if r.fits]

    def require_fit(self) -> None:
        """Raise :class:`NothingFits` when no candidate fits, naming the tightest budget and the
        nearest candidate with the limits it would need."""
        if self.fitting:
            return
        weighed = [r for r in self.rows if not r.refused]
        if not weighed:
            raise NothingFits(f"no method applies to {self.job.model}; the reasons are in the table")
        broken = {flag: sum(flag in r.breaks for r in weighed) for _, flag, _ in self.budget.limits()}
        tightest = max(broken, key=broken.get)
        nearest = min(weighed, key=lambda r: max(used / limit for used, limit in r.breaks.values()))
        key_of = {flag: key for key, flag, _ in self.budget.limits()}
        raise_to = ", ".join(f"{flag} {_show(key_of[flag], math.ceil(used * 100) / 100)}"
                             for flag, (used, _) in nearest.breaks.items())
        raise NothingFits(f"nothing fits the budget: {tightest} is the tightest ({broken[tightest]} of {len(weighed)} "
                          f"candidates break it); the nearest is {nearest.candidate.label} "
                          f"({nearest.why(self.budget)}); raise {raise_to} to fit it, or plan a shorter run "
                          f"(--steps, --batch-size, --max-length)")

    def to_dict(self) -> dict[str, Any]:
        setup = self.probe["setup"]
        return {"model": self.job.model, "data": self.job.data, "steps": self.probe["total_steps"],
                "batch_size": self.job.batch_size, "max_length": self.job.max_length,
                "budget": dataclasses.asdict(self.budget), "setup_mb": setup["peak_mb"],
                "setup_resident_mb": setup["resident_mb"], "probe_steps": self.probe["probe_steps"],
                "rows": [r.to_dict(self.budget) for r in self.rows], "left_out": self.left_out}

    def table(self) -> str:
        """The plan as Markdown: a heading, the run it plans, one line per candidate."""
        setup = self.probe["setup"]
        lines = [f"# Plan: {self.job.model} on {self.job.data}", "",
                 f"{self.probe['total_steps']} steps of batch {self.job.batch_size}, max length {self.job.max_length}; "
                 f"budget: " + (", ".join(f"{flag} {_show(key, limit)}" for key, flag, limit in self.budget.limits())
                                or "none") + ". "
                 f"Setup memory (fresh process: data, model, tokens): {setup['peak_mb']:,.0f} MiB; "
                 f"probe: {self.probe['probe_steps']} steps per method at its default size, "
                 f"{self.probe['threads']} thread(s).", "",
                 "| rank | candidate | trainable params | peak MiB | minutes | s/step | verdict |",
                 "|---:|---|---:|---:|---:|---:|---|"]
        for r in self.rows:
            cells = [str(r.rank or "-"), r.candidate.label,
                     f"{r.trainable:,}" if r.trainable is not None else "-",
                     f"{r.peak_mb:,.0f}" if r.peak_mb is not None else "-",
                     f"{r.minutes:,.2f}" if r.minutes is not None else "-",
                     f"{r.step_seconds:.3f}" if r.step_seconds is not None else "-", r.why(self.budget)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [f"Not weighed: `{name}` ({why})." for name, why in self.left_out.items()]
        return "\n".join(lines) + "\n"


def predict(candidate: Candidate, count: dict[str, Any], family: dict[str, Any] | None,
            probe: dict[str, Any]) -> Row:
    """A candidate's predictions from the probe (see the module docstring)."""
    if "refused" in count:
        return Row(candidate, refused=count["refused"])
    if family is None or "failed" in family:
        reason = family["failed"] if family else "its method could not be probed at any size"
        return Row(candidate, trainable=count["trainable"], refused=f"the probe's training steps failed: {reason}")
    setup = probe["setup"]
    extra = family["extra_mb"] + BYTES_PER_TRAINABLE * (count["trainable"] - family["trainable"]) / MIB
    peak = max(setup["peak_mb"], setup["resident_mb"] + extra)
    minutes = family["step_seconds"] * probe["total_steps"] / 60
    return Row(candidate, trainable=count["trainable"], peak_mb=peak, minutes=minutes,
               step_seconds=family["step_seconds"])


def read_evidence(path: str | Path, job: TrainJob) -> dict[str, dict[str, Any]]:
    """Measured quality per method from a ``compare.json`` of the same model and data.

    Raises:
        ConfigError: the file is missing or is not a compare.json.
    """
    try:
        rows = json.loads(Path(path).read_text())
        if not isinstance(rows, list):
            raise ValueError
    except (OSError, ValueError):
        raise ConfigError(f"--evidence {path}: not a readable compare.json (a JSON list of compare rows); "
                          f"pass the compare.json that `deltatune compare` wrote") from None
    found = {}
    for row in rows:
        if (not isinstance(row, dict) or "test" not in row or row.get("model") != job.model
                or (row.get("data") or {}).get("name") != job.data):
            continue
        test = row["test"]
        metric, score = ("accuracy", test["accuracy"]) if "accuracy" in test else ("minus test loss", -test["loss"])
        found[row["method"]] = {"metric": metric, "score": score, "trainable": row.get("trainable_parameters", 0),
                                "source": f"{Path(path).name} ({row.get('steps')} steps)"}
    return found


def judge(rows: list[Row], budget: Budget, evidence: dict[str, dict[str, Any]] | None = None) -> list[Row]:
    """Mark what each row breaks and rank the fits: measured quality (when known), then
    trainable parameters, then minutes. Returns fits first, in rank order, then the rest."""
    for row in rows:
        row.breaks = {}
        if row.refused:
            continue
        for key, flag, limit in budget.limits():
            used = getattr(row, key) * (1 + budget.memory_margin if key == "peak_mb" else 1)
            if used > limit:
                row.breaks[flag] = (used, limit)
        row.evidence = (evidence or {}).get(row.candidate.method)
    fits = sorted((r for r in rows if r.fits), key=lambda r: (
        -(r.evidence["score"] if r.evidence else -math.inf), -r.trainable, r.minutes))
    for i, row in enumerate(fits, 1):
        row.rank = i
    rest = sorted((r for r in rows if not r.fits), key=lambda r: (bool(r.refused), r.candidate.method))
    return fits + rest


def make_plan(job: TrainJob, budget: Budget, *, methods: list[str] | None = None, probe_steps: int = 4,
              factors: tuple[float, ...] = DEFAULT_FACTORS, evidence: str | Path | None = None,
              probe: dict[str, Any] | None = None) -> Plan:
    """Probe this machine and weigh every candidate against ``budget`` (see the module docstring).

    Args:
        job: the run to plan (model, data, steps or epochs, batch size, max length, ...); its
            method and options are not used.
        methods: the methods to weigh (default: every method trained from flags).
        probe_steps: training steps per method in the probe (the first warms up), at least 2.
        factors: the sizes tried, as factors of each method's default size.
        evidence: a ``compare.json`` whose measured quality ranks the fits.
        probe: a probe result to reuse (from an earlier plan's ``probe``), else a fresh probe runs.

    Raises:
        ConfigError: bad budget, steps or method names; ModelError / DataError: unknown model or data.
    """
    if isinstance(probe_steps, bool) or not isinstance(probe_steps, int) or probe_steps < 2:
        raise ConfigError(f"probe steps must be an integer of at least 2 (the first warms up), got {probe_steps!r}")
    if not factors or any(not isinstance(f, (int, float)) or f <= 0 for f in factors):
        raise ConfigError(f"size factors must be positive numbers (0.5,1,2), got {factors!r}")
    candidates, left_out = all_candidates(methods, factors)
    known = read_evidence(evidence, job) if evidence is not None else None
    if probe is None:
        request = {"job": {**dataclasses.asdict(job), "progress": False, "method": "lora", "options": {}},
                   "candidates": [{"method": c.method, "options": c.options, "default": c.default} for c in candidates],
                   "steps": probe_steps}
        probe = probe_in_fresh_process(request)
    rows = [predict(c, count, probe["families"].get(c.method), probe)
            for c, count in zip(candidates, probe["counts"])]
    return Plan(job, budget, judge(rows, budget, known), left_out, probe)
