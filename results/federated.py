"""Federated LoRA on MiniLM + movie reviews (label-skewed), through Flower's simulation.

Ten clients each hold a Dirichlet(0.5) label-skewed share of the training split (and of the
test split, in the same proportions). Each round every client trains 20 local steps (batch 16)
from the global LoRA (r=8 on q, v, plus the classification head); the server aggregates the
LoRAs as the re-factored weighted sum of updates. After 5 rounds each client takes 20 more
local steps: its personal delta. Compared with:

- ``centralised``: the same LoRA trained on all clients' rows pooled, for as many steps as the
  clients took together (10 x 5 x 20 = 1000);
- the same federation with client updates compressed on the wire (top 10% + int8).

    OMP_NUM_THREADS=1 python results/federated.py [--clients 10 --rounds 5 --steps 20]

writes results/federated.json and results/federated.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deltatune.federated.run import federate
from deltatune.federated.work import FederateJob
from deltatune.io.atomic import write_text_atomic
from deltatune.train.job import TrainJob

HERE = Path(__file__).resolve().parent


def run(args, codec: str, centralised: bool) -> dict:
    job = TrainJob(model="minilm", data="movie-reviews", method="lora", steps=args.steps, batch_size=16, lr=args.lr,
                   max_length=64, out=str(Path(args.work) / codec.replace(":", "").replace("+", "-")), progress=False)
    fed = FederateJob(job=job, clients=args.clients, rounds=args.rounds, alpha=0.5, codec=codec,
                      personal_steps=args.steps)
    start = time.time()
    result = federate(fed, centralised=centralised)
    result["wall_seconds"] = round(time.time() - start, 1)
    return result


def table(results: dict[str, dict]) -> str:
    rows = ["| run | global acc. (all test rows) | global acc. (own rows, mean) | personal acc. (own rows, mean) "
            "| centralised acc. | bytes per round | / full model | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        s = result["summary"]

        def f(value, fmt="{:.3f}"):
            return "-" if value is None else fmt.format(value)
        rows.append(f"| {name} | {f(s['global'])} | {f(s['global_on_own_test_rows'])} | {f(s['personal_on_own_test_rows'])} "
                    f"| {f(s['centralised'])} | {f(s['bytes_per_round'], '{:,.0f}')} | {f(s['bytes_vs_full_model'], '{:.4f}')} "
                    f"| {result['wall_seconds']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--work", default="/tmp/deltatune-federated")
    args = parser.parse_args()
    results = {"none": run(args, "none", centralised=True), "topk:0.1+int8": run(args, "topk:0.1+int8", centralised=False)}
    write_text_atomic(HERE / "federated.json", json.dumps(results, indent=2) + "\n")
    per_round = ["| round | " + " | ".join(f"{name}: test acc." for name in results) + " | mean aggregation error (ours) "
                 "| same, averaging A and B separately |", "|---|" + "---:|" * (len(results) + 2)]
    first = results["none"]
    for i, row in enumerate(first["rounds"]):
        agg = row.get("aggregation") or {}
        per_round.append(f"| {row['round']} | " + " | ".join(f"{r['rounds'][i]['test']['accuracy']:.3f}" for r in results.values())
                         + f" | {agg.get('mean_error', 0):.4f} | {agg.get('naive_mean_error', 0):.4f} |")
    print(table(results))
    print("\n".join(per_round))
    write_text_atomic(HERE / "federated.table.md", table(results) + "\n\n" + "\n".join(per_round) + "\n")


if __name__ == "__main__":
    main()
