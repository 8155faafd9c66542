"""``deltatune plan`` on MiniLM + movie-reviews, then its top recommendations trained for real.

Plans a short run (50 steps of batch 32, max length 48) under a budget, then trains the top
``--top`` recommendations (and the ``--also`` candidates, e.g. one that breaks the memory
budget) with ``deltatune train`` in fresh processes, and tabulates predicted against measured
trainable parameters, peak resident memory (``ru_maxrss`` of the training process) and
training minutes. Writes ``results/plan_check.md`` and ``results/plan_check.json``.

    OMP_NUM_THREADS=1 python results/plan_check.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from deltatune.io.atomic import write_text_atomic
from deltatune.train.job import TrainJob
from deltatune.tune.check import check_table, run_for_real, side_by_side
from deltatune.tune.plan import Budget, make_plan

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--max-params", type=int, default=150_000)
    parser.add_argument("--max-memory", type=float, default=1_300)
    parser.add_argument("--max-minutes", type=float, default=3.0)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--also", nargs="*", default=["head", "full"],
                        help="candidate labels also trained for real (to see the error off the top)")
    parser.add_argument("--evidence", default=str(HERE / "compare.json"))
    parser.add_argument("--probe-steps", type=int, default=4)
    parser.add_argument("--reuse", action="store_true",
                        help="re-judge the plan from plan_check.json's probe and real runs (no probing or training)")
    args = parser.parse_args()
    saved = json.loads((HERE / "plan_check.json").read_text()) if args.reuse else None

    job = TrainJob(model="minilm", data="movie-reviews", steps=args.steps, batch_size=32, max_length=48, progress=False)
    budget = Budget(args.max_params, args.max_memory, args.max_minutes)
    began = time.perf_counter()
    plan = make_plan(job, budget, probe_steps=args.probe_steps, evidence=args.evidence,
                     probe=saved["probe"] if saved else None)
    plan_seconds = saved["plan_seconds"] if saved else time.perf_counter() - began
    print(plan.table(), flush=True)
    chosen = plan.fitting[:args.top] + [r for r in plan.rows if r.candidate.label in args.also and not r.refused]
    checked = saved["checked"] if saved else []
    with tempfile.TemporaryDirectory(prefix="plan-check-") as folder:
        for i, row in enumerate(chosen if not saved else []):
            print(f"training {row.candidate.label} for real ({args.steps} steps)", flush=True)
            metrics = run_for_real(job, row, Path(folder) / str(i))
            checked.append(side_by_side(row, metrics))
            print(json.dumps(checked[-1]), flush=True)
    write_text_atomic(HERE / "plan_check.json", json.dumps(
        {"plan": plan.to_dict(), "probe": plan.probe, "plan_seconds": round(plan_seconds, 1), "checked": checked},
        indent=2) + "\n")
    top = "\n".join(plan.table().splitlines()[:6 + len(plan.fitting[:10])])
    report = (f"# deltatune plan, checked on MiniLM + movie-reviews\n\n"
              f"`python results/plan_check.py` (OMP_NUM_THREADS=1, nice 19, a shared 2-core machine). "
              f"The plan (probe and all {len(plan.rows)} candidates) took {plan_seconds:.0f} s.\n\n"
              f"{top}\n\n(top 10 fits shown; every row is in plan_check.json)\n\n"
              f"## Predicted against measured (fresh `deltatune train` processes)\n\n{check_table(checked)}")
    write_text_atomic(HERE / "plan_check.md", report)
    print(report)


if __name__ == "__main__":
    main()
