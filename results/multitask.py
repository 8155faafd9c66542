"""Three packaged tasks trained jointly (``deltatune train --multi``) on one frozen MiniLM:
what each added task costs with a shared hypernetwork, and a mixture of LoRA experts against
a plain LoRA of the same size.

Runs four multi-task trainings with the same budget, data and seed, each in its own process
(the ``deltatune`` command a user would run), then writes ``results/multitask.md`` and
``results/multitask.json``:

- ``hyperadapter`` (the run's first task owns the hypernetwork, the others share it) against
  ``adapter --bottleneck 16`` (one adapter per task, the width the hypernetwork generates);
- ``molora`` (4 experts of rank 8, top-2) against ``lora --r 32 --alpha 64`` (the same A and B
  sizes as the four experts together, the same alpha / r scale), each task its own delta.

Each method trains at its own default learning rate. A finished run folder is reused, so the
tables can be rewritten without training again (``--fresh`` retrains).

    OMP_NUM_THREADS=2 python results/multitask.py [--steps 200 --batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from deltatune.io.atomic import write_text_atomic

HERE = Path(__file__).resolve().parent
TASKS = ("movie-reviews", "sms-spam", "trec")
HIDDEN = 384  # MiniLM's width: a two-label head is 2 x 384 + 2 parameters
RUNS = {  # run name -> the method flags of `deltatune train`
    "molora": ["--method", "molora"],
    "lora": ["--method", "lora", "--r", "32", "--alpha", "64"],
    "adapter": ["--method", "adapter", "--bottleneck", "16"],
    "hyperadapter": ["--method", "hyperadapter"],
}
PAIRS = (("hyperadapter", "adapter", "a shared hypernetwork against one adapter per task"),
         ("molora", "lora", "a mixture of LoRA experts against one LoRA of the same size per task"))


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="rows of every task per step")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/multitask", help="where the run folders go")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    parser.add_argument("--pairs", default=",".join(a for a, _, _ in PAIRS),
                        help="comma list of the comparisons to run, by their first method")
    return parser.parse_args()


def train(name: str, args: argparse.Namespace) -> dict:
    """The run's ``OUT/metrics.json``, training it first unless it finished before."""
    out = Path(args.runs) / name
    if args.fresh and out.exists():
        shutil.rmtree(out)
    if not (out / "metrics.json").exists():
        tasks = [str(HERE / "multitask" / "tasks" / f"{task}.yaml") for task in TASKS]
        command = [sys.executable, "-m", "deltatune.cli", "train", "--multi", *tasks, *RUNS[name],
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--seed", str(args.seed), "--no-progress", "--out", str(out)]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
    return json.loads((out / "metrics.json").read_text())


def task_rows(run: dict) -> list[dict]:
    return [{"task": task, "accuracy": m["test"]["accuracy"], "macro_f1": m["test"]["macro_f1"],
             "trainable": m["trainable_parameters"], "labels": len(m["data"]["labels"])}
            for task, m in run["tasks"].items()]


def pair_table(a: str, b: str, runs: dict) -> list[str]:
    rows = {name: {r["task"]: r for r in task_rows(runs[name])} for name in (a, b)}
    lines = [f"| task | {a} accuracy | {b} accuracy | {a} parameters | {b} parameters |",
             "|---|---:|---:|---:|---:|"]
    for task in TASKS:
        x, y = rows[a][task], rows[b][task]
        lines.append(f"| {task} | {x['accuracy']:.4f} | {y['accuracy']:.4f} | {x['trainable']:,} | {y['trainable']:,} |")
    total = {name: sum(r["trainable"] for r in rows[name].values()) for name in (a, b)}
    mean = {name: sum(r["accuracy"] for r in rows[name].values()) / len(TASKS) for name in (a, b)}
    lines.append(f"| **all three** | {mean[a]:.4f} (mean) | {mean[b]:.4f} (mean) | {total[a]:,} | {total[b]:,} |")
    lines.append(f"\nTrain time of the joint run: {a} {runs[a]['train_seconds']:.0f} s, "
                 f"{b} {runs[b]['train_seconds']:.0f} s (other work shared the machine, so only roughly comparable); "
                 f"peak memory {runs[a]['peak_memory_mb']:,.0f} and {runs[b]['peak_memory_mb']:,.0f} MiB.")
    return lines


def added_task_cost(rows: dict, a: str, b: str) -> str:
    """What one more two-label task costs with ``a``'s shared network against one ``b`` per task."""
    two = [task for task in TASKS if rows[a][task]["labels"] == 2]
    owner, sharer = (rows[a][task]["trainable"] for task in two[:2])
    head = 2 * HIDDEN + 2
    network, each, separate = owner - sharer, sharer - head, rows[b][two[1]]["trainable"] - head
    return (f"One more task costs {each} parameters with {a} (its task embedding; plus its head) against "
            f"{separate:,} for its own {b}; the shared network itself is {network:,} parameters, as much as "
            f"{network / separate:.1f} separate {b}s, so it is the smaller choice from {int(network // (separate - each)) + 1} "
            f"tasks on.")


def main() -> None:
    args = options()
    pairs = [pair for pair in PAIRS if pair[0] in args.pairs.split(",")]
    runs = {name: train(name, args) for a, b, _ in pairs for name in (a, b)}
    lines = ["# Three tasks trained jointly on one frozen MiniLM", "",
             f"`python results/multitask.py`: `deltatune train --multi` over {', '.join(TASKS)} "
             f"({args.steps} steps of {args.batch_size} rows of every task, max length {args.max_length}, "
             f"seed {args.seed}; each method at its default learning rate). Accuracy is on each task's test "
             "split; parameters are each task's trainable tensors, its classifier head included "
             "(hidden + 1 per label: 770 for two labels, 2,310 for TREC's six).", ""]
    for a, b, title in pairs:
        lines += [f"## {a} against {b}: {title}", "", *pair_table(a, b, runs), ""]
        if a == "hyperadapter":
            rows = {name: {r["task"]: r for r in task_rows(runs[name])} for name in (a, b)}
            lines += [added_task_cost(rows, a, b), ""]
    write_text_atomic(HERE / "multitask.md", "\n".join(lines))
    summary = {name: {"flags": RUNS[name], "train_seconds": run["train_seconds"], "tasks": task_rows(run)}
               for name, run in runs.items()}
    write_text_atomic(HERE / "multitask.json", json.dumps({"settings": vars(args), "runs": summary}, indent=2) + "\n")
    print((HERE / "multitask.md").read_text())


if __name__ == "__main__":
    main()
