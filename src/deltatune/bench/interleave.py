"""Time several cases side by side in one process, so their ratios are honest.

Cases measured in separate processes drift apart by more than the differences being
measured (CPU frequency, other work on the machine, allocator state). Here every round runs
each case once, the order alternating between rounds (forward, then reversed), after
warm-up rounds; a ratio is the median over rounds of the per-round ratio, with its
quartiles as the spread, so a slow round slows both sides of the ratio alike.

    timings = interleaved({"merged": run_merged, "unmerged": run_unmerged}, repeats=15)
    timings.ratio("unmerged", "merged")   # {"median": 1.07, "q1": 1.05, "q3": 1.09, "n": 15}
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def spread(values: list[float]) -> dict:
    """Median, quartiles, minimum and count of ``values``."""
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "q1": q[0], "q3": q[2], "n": len(ordered)}


@dataclass
class Timings:
    """Seconds per round of each case, rounds aligned across cases."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def ms(self, case: str) -> dict:
        """The case's time per run in milliseconds: median, quartiles, minimum, count."""
        return spread([1000 * s for s in self.seconds[case]])

    def ratio(self, case: str, reference: str) -> dict:
        """``case / reference`` per round, summarised: median and quartiles over the rounds."""
        pairs = zip(self.seconds[case], self.seconds[reference])
        return spread([a / b for a, b in pairs])

    def as_dict(self) -> dict:
        return {case: self.ms(case) for case in self.seconds}


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int = 15, warmup: int = 2,
                budget_s: float | None = None, min_repeats: int = 5) -> Timings:
    """Run every case once per round for ``warmup + repeats`` rounds, alternating the order.

    Args:
        cases: name -> a callable that does one run.
        repeats: timed rounds.
        warmup: untimed rounds first (caches, allocator, lazy initialisation).
        budget_s: stop after the round in which the timed total passes this, once
            ``min_repeats`` rounds are in (a very slow case); ``None``: no limit.
        min_repeats: the fewest timed rounds kept when stopping on the budget.
    """
    names = list(cases)
    timings = Timings({name: [] for name in names})
    total = 0.0
    for round_ in range(warmup + repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            cases[name]()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                timings.seconds[name].append(elapsed)
                total += elapsed
        timed = round_ + 1 - warmup
        if budget_s is not None and timed >= min_repeats and total > budget_s:
            break
    return timings
