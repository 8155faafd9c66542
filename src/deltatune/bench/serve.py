"""Serving under load: concurrent clients classifying with many deltas over HTTP.

``python -m deltatune.bench.serve [minilm|<model folder>] [clients] [requests]`` starts
``deltatune serve`` on loopback with 8 LoRA deltas (r=8 on the attention projections, plus
each delta's own classifier head), runs ``clients`` concurrent clients sending ``requests``
requests each (one text, deltas in turn), and prints the benchmark rows as JSON: throughput,
p50 and p99 latency, and the mean number of requests per model batch.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import deltatune as dt
from .cases import CASES, MODELS, delta_config

TEXTS = ["the film was a delight from start to finish", "a dull plot and wooden actors", "what a great movie",
         "i would not watch it again", "nice photography but a weak story", "very good", "awful", "the actors were fine"]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, by linear interpolation."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def _client(http, deltas: list[str], texts: list[str], client: int, requests: int, out: list) -> None:
    for j in range(requests):
        number = client * requests + j
        delta, text = deltas[number % len(deltas)], texts[(number // len(deltas)) % len(texts)]
        started = time.perf_counter()
        response = await http.post("/v1/classify", json={"delta": delta, "inputs": [text]})
        out.append({"client": client, "delta": delta, "text": text, "status": response.status_code,
                    "seconds": time.perf_counter() - started, "body": response.json()})


def run_load(url: str, deltas: list[str], *, clients: int = 8, requests: int = 50,
             texts: list[str] | None = None) -> dict[str, Any]:
    """``clients`` concurrent clients each sending ``requests`` classify requests to ``url``.

    Returns:
        ``sent``, ``answers`` (one per request: delta, text, status, seconds, body), ``errors``
        (answers whose status is not 200), ``seconds``, ``throughput_rps``, ``latency_p50_ms``
        and ``latency_p99_ms``.
    """
    import httpx

    texts = texts or TEXTS
    answers: list[dict] = []

    async def main() -> float:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as http:
            started = time.perf_counter()
            await asyncio.gather(*(_client(http, deltas, texts, c, requests, answers) for c in range(clients)))
            return time.perf_counter() - started

    seconds = asyncio.run(main())
    latencies = [a["seconds"] * 1000 for a in answers]
    return {"sent": clients * requests, "answers": answers, "errors": [a for a in answers if a["status"] != 200],
            "seconds": seconds, "throughput_rps": len(answers) / seconds,
            "latency_p50_ms": percentile(latencies, 50), "latency_p99_ms": percentile(latencies, 99),
            "latency_mean_ms": statistics.fmean(latencies)}


def make_deltas(model, directory: Path, count: int, seed: int = 1) -> list[str]:
    """``count`` LoRA deltas ``d0..`` with random weights (as after training), saved under ``directory``."""
    generator = torch.Generator().manual_seed(seed)
    config = delta_config(CASES["lora"], model, MODELS["minilm"])  # a classifier: its head trains too
    names = []
    for i in range(count):
        name = f"d{i}"
        dt.attach(model, config, name=name)
        with torch.no_grad():
            for _, p in dt.delta_parameters(model, name):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        dt.save(model, directory / name, name, metrics={"labels": ["negative", "positive"]})
        dt.delete(model, name)
        names.append(name)
    return names


def serve_rows(model: str = "minilm", clients: int = 8, requests: int = 50, deltas: int = 8, threads: int = 1,
               max_batch: int = 32, max_wait_ms: float = 5.0) -> list[dict]:
    """Benchmark rows of the server under load (see the module docstring)."""
    from ..serve import DeltaLibrary, Engine, Settings, create_app, load_base
    from ..serve.background import running

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        library = DeltaLibrary(tmp)
        base, tokenizer, task = load_base(model, library, num_labels=2)
        names = make_deltas(base, Path(tmp), deltas)
        engine = Engine(base, tokenizer, task, library, max_deltas=deltas, model_name=model)
        app = create_app(engine, Settings(max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=4 * clients))
        with running(app) as url:
            run_load(url, names, clients=clients, requests=2)  # warm-up: loads every delta
            metrics = app.state.metrics

            def batches() -> tuple[float, float]:
                return (metrics.value("deltatune_serve_batch_requests_sum"),
                        metrics.value("deltatune_serve_batch_requests_count"))
            before = batches()
            result = run_load(url, names, clients=clients, requests=requests)
            after = batches()
            mean_batch = (after[0] - before[0]) / max(1, after[1] - before[1])
    if result["errors"]:
        raise RuntimeError(f"{len(result['errors'])} requests failed, first: {result['errors'][0]}")
    label = Path(model).name if model not in ("minilm", "smollm2") else model
    case = f"{clients}x{requests}_{deltas}_deltas"

    def row(metric: str, value: float, unit: str) -> dict:
        return {"model": label, "method": "serve", "metric": metric, "deltatune": round(value, 3), "peft": None,
                "ratio": None, "unit": unit, "case": case}

    return [row("throughput_rps", result["throughput_rps"], "requests/s"),
            row("latency_p50_ms", result["latency_p50_ms"], "ms"),
            row("latency_p99_ms", result["latency_p99_ms"], "ms"),
            row("mean_batch_requests", mean_batch, "requests")]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    model = args[0] if args else "minilm"
    clients = int(args[1]) if len(args) > 1 else 8
    requests = int(args[2]) if len(args) > 2 else 50
    print(json.dumps(serve_rows(model, clients, requests), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
