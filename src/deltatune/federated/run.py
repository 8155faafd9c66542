"""``deltatune federate``: the simulation, an optional centralised run to compare with, and
the summary written into ``federated.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..io.atomic import write_text_atomic
from ..train.job import run_train
from .flower import simulate
from .work import FederateJob


def federate(fed: FederateJob, *, centralised: bool = False, cpus_per_client: int = 1) -> dict[str, Any]:
    """Run ``fed`` in Flower's simulation; with ``centralised``, also train the same delta on
    all the clients' rows pooled (``clients x rounds x steps`` steps: as many as the clients
    took together) into ``<out>/centralised``. Returns ``federated.json``'s content."""
    result = simulate(fed, cpus_per_client=cpus_per_client)
    if centralised:
        job = dataclasses.replace(fed.job, steps=fed.clients * fed.rounds * fed.job.steps,
                                  out=str(Path(fed.job.out) / "centralised"), progress=False)
        metrics = run_train(job)
        result["centralised"] = {"steps": job.steps, "test": metrics["test"], "train_seconds": metrics["train_seconds"]}
    result["summary"] = summarise(result)
    write_text_atomic(Path(fed.job.out) / "federated.json", json.dumps(result, indent=2) + "\n")
    return result


def _mean(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
    return sum(values) / len(values) if values else None


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: global, personal and centralised scores; bytes against the full model."""
    metric = "accuracy" if (result.get("final_test") or {}).get("accuracy") is not None else "loss"
    rounds = result["rounds"]
    up = result["bytes_up_per_round"]
    full = result["full_model_bytes_per_round"]
    sent = [u + d for u, d in zip(up, result["bytes_down_per_round"])]
    return {
        "metric": metric,
        "initial": (result.get("initial_test") or {}).get(metric),
        "global": (result.get("final_test") or {}).get(metric),
        "global_on_own_test_rows": _mean(result["personal"], f"global-{metric}"),
        "personal_on_own_test_rows": _mean(result["personal"], f"personal-{metric}"),
        "centralised": (result.get("centralised") or {}).get("test", {}).get(metric),
        "rejected_updates": sum(len(r["rejected"]) for r in rounds),
        "bytes_per_round": sum(sent) / len(sent) if sent else None,
        "full_model_bytes_per_round": full,
        "bytes_vs_full_model": (sum(sent) / len(sent)) / full if sent else None,
    }
