"""Switching cost between deltas on one live model; prints one JSON object.

``python -m deltatune.bench.swap [minilm|tiny] [repeats]``. Two LoRA deltas (r=8 on the
attention projections, plus a classifier head) live on the base; timed, in milliseconds:
``set_active`` between them, an in-place :func:`~deltatune.swap.replace` from disk,
``dt.load`` from disk (and ``dt.delete``), and :class:`~deltatune.swap.DeltaCache` hits
versus misses (a miss loads and evicts). One forward pass of one row is given for scale.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltatune.swap import DeltaCache, delta_bytes, replace

import deltatune as dt
from .cases import CASES, MODELS, build_model, delta_config, make_batch, perturbed
from .workers import setup, summary


def _timed(action: Callable[[int], Any], repeats: int, warmup: int = 2) -> dict:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        action(i)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return summary(times)


def swap_costs(name: str = "minilm", repeats: int = 20, threads: int = 2) -> dict:
    """Median (and quartile) times of each way to switch deltas, in milliseconds."""
    setup(threads)
    spec = MODELS[name]
    model = build_model(name).eval()
    config = delta_config(CASES["lora"], model, spec)
    for delta in ("d0", "d1"):
        dt.attach(model, config, name=delta)
    perturbed(model, ["d0", "d1"], seed=1)
    batch = make_batch(model, 1, spec.seq)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out: dict[str, Any] = {"model": name, "delta_bytes": delta_bytes(model, "d0"), "repeats": repeats,
                           "threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        folders = [dt.save(model, Path(tmp) / d, d) for d in ("d0", "d1")]

        def forward(_):
            with torch.no_grad():
                model(**inputs)

        out["forward_1_row_ms"] = _timed(forward, repeats)
        out["set_active_ms"] = _timed(lambda i: dt.set_active(model, ("d0", "d1")[i % 2]), repeats * 50)
        out["set_active_then_forward_ms"] = _timed(lambda i: (dt.set_active(model, ("d0", "d1")[i % 2]), forward(i)),
                                                   repeats)
        out["replace_in_place_ms"] = _timed(lambda i: replace(model, "d0", folders[i % 2]), repeats)

        def load_then_delete(i):
            start = time.perf_counter()
            dt.load(model, folders[i % 2], "fresh", activate=False)
            loads.append(time.perf_counter() - start)
            dt.delete(model, "fresh")

        loads: list[float] = []
        out["load_and_delete_ms"] = _timed(load_then_delete, repeats)
        out["load_from_disk_ms"] = summary(loads[2:])
        dt.set_active(model, None)
        cache = DeltaCache(model, max_deltas=1)
        cache_folders = {"c0": folders[0], "c1": folders[1]}
        out["cache_miss_ms"] = _timed(lambda i: cache.get(("c0", "c1")[i % 2], cache_folders[("c0", "c1")[i % 2]]),
                                      repeats)  # alternating with room for one: every get loads and evicts
        resident = cache.loaded()[-1]
        out["cache_hit_ms"] = _timed(lambda i: cache.get(resident), repeats * 50)
        stats = cache.stats()
        out["cache_stats"] = {"hits": stats.hits, "misses": stats.misses, "evictions": stats.evictions}
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "minilm"
    repeats = int(argv[1]) if len(argv) > 1 else 20
    print(json.dumps(swap_costs(name, repeats), indent=2))


if __name__ == "__main__":
    main()
