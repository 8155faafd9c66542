"""Checking a plan against real runs: a candidate trained by ``deltatune train`` in a fresh
process, its measured parameters, peak memory and minutes set beside the predictions."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ..errors import DeltaError
from ..io.atomic import write_text_atomic
from ..train.job import TrainJob
from .plan import Row


def run_for_real(job: TrainJob, row: Row, folder: Path, timeout: float | None = None) -> dict[str, Any]:
    """Train ``row``'s candidate with ``job``'s run settings in a fresh ``deltatune train``
    process; its ``metrics.json``.

    Raises:
        DeltaError: the training process failed (the message carries its last output line).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    real = dataclasses.replace(job, method=row.candidate.method, options=dict(row.candidate.options),
                               out=str(folder / "run"), progress=False)
    config = folder / "job.yaml"
    write_text_atomic(config, yaml.safe_dump(dataclasses.asdict(real), sort_keys=False))
    child = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", "--config", str(config)],
                           capture_output=True, text=True, timeout=timeout)
    metrics = folder / "run" / "metrics.json"
    if child.returncode != 0 or not metrics.exists():
        lines = [line for line in child.stderr.splitlines() if line.strip()]
        raise DeltaError(f"training {row.candidate.label} for real failed (exit code {child.returncode}): "
                         f"{lines[-1] if lines else 'no output'}")
    return json.loads(metrics.read_text())


def side_by_side(row: Row, metrics: dict[str, Any]) -> dict[str, Any]:
    """Predicted and measured parameters, peak MiB and minutes of one candidate, with ratios."""
    minutes = metrics["train_seconds"] / 60
    return {"candidate": row.candidate.label, "rank": row.rank,
            "params_predicted": row.trainable, "params_measured": metrics["trainable_parameters"],
            "peak_mb_predicted": round(row.peak_mb, 1), "peak_mb_measured": metrics["peak_memory_mb"],
            "peak_ratio": round(row.peak_mb / metrics["peak_memory_mb"], 3),
            "minutes_predicted": round(row.minutes, 3), "minutes_measured": round(minutes, 3),
            "minutes_ratio": round(row.minutes / minutes, 3) if minutes > 0 else None,
            "accuracy": (metrics.get("test") or {}).get("accuracy")}


def check_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: predicted against measured, one line per candidate."""
    lines = ["| rank | candidate | params predicted | params measured | peak MiB predicted | peak MiB measured | "
             "ratio | minutes predicted | minutes measured | ratio |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rank'] or '-'} | {r['candidate']} | {r['params_predicted']:,} | {r['params_measured']:,} | "
                     f"{r['peak_mb_predicted']:,.0f} | {r['peak_mb_measured']:,.0f} | {r['peak_ratio']:.2f} | "
                     f"{r['minutes_predicted']:.2f} | {r['minutes_measured']:.2f} | {r['minutes_ratio']:.2f} |")
    return "\n".join(lines) + "\n"
