"""A bounded load test of ``deltatune serve``: 8 concurrent clients x 50 requests across 8 deltas.

Every answer is checked against the offline API (each text run alone with its delta); the
throughput and p50/p99 latency are computed by :func:`deltatune.bench.serve.run_load`.
"""

from __future__ import annotations

import pytest
from serve_helpers import reference_probabilities, save_random_deltas

import deltatune as dt
from deltatune.bench.serve import percentile, run_load
from deltatune.serve import DeltaLibrary, Settings, create_app, engine_from_options, load_base
from deltatune.serve.background import running

HEAD = {"modules_to_save": ["classifier"]}
#: mixable methods of several ranks, plus prompt and prefix tuning, which need batches of their own
DELTAS = {"lora2": dt.LoRAConfig(r=2, **HEAD), "lora4": dt.LoRAConfig(r=4, **HEAD), "lora8": dt.LoRAConfig(r=8, **HEAD),
          "dora": dt.DoRAConfig(r=4, **HEAD), "ia3": dt.IA3Config(**HEAD), "adapter": dt.AdapterConfig(bottleneck=8, **HEAD),
          "prompt": dt.PromptConfig(num_virtual_tokens=3, **HEAD), "prefix": dt.PrefixConfig(num_virtual_tokens=3, **HEAD)}
CLIENTS, REQUESTS = 8, 50


def test_percentile_interpolates_like_numpy():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == pytest.approx(4.96)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0


def test_eight_clients_times_fifty_requests_across_eight_deltas(tiny_bert, tmp_path):
    model, _, _ = load_base(str(tiny_bert), DeltaLibrary(tmp_path))
    save_random_deltas(model, tmp_path, DELTAS, seed=7, scale=0.2)
    engine = engine_from_options(str(tiny_bert), tmp_path, max_deltas=4)  # fewer slots than deltas: the cache evicts
    app = create_app(engine, Settings(max_batch=16, max_wait_ms=5, queue_size=CLIENTS))
    with running(app) as url:
        result = run_load(url, list(DELTAS), clients=CLIENTS, requests=REQUESTS)
    assert result["errors"] == []
    assert len(result["answers"]) == result["sent"] == CLIENTS * REQUESTS
    per_client = [sum(1 for a in result["answers"] if a["client"] == c) for c in range(CLIENTS)]
    assert per_client == [REQUESTS] * CLIENTS  # no lost request
    for answer in result["answers"]:
        expected = reference_probabilities(tiny_bert, tmp_path, answer["delta"], answer["text"])
        got = list(answer["body"]["results"][0]["probabilities"].values())
        assert got == pytest.approx(expected, abs=1e-5), answer["delta"]
    metrics = app.state.metrics
    batches = metrics.value("deltatune_serve_batch_requests_count")
    assert batches < CLIENTS * REQUESTS  # concurrent requests were batched
    assert result["latency_p50_ms"] <= result["latency_p99_ms"]
    print(f"\nserve load: {result['throughput_rps']:.0f} requests/s, p50 {result['latency_p50_ms']:.1f} ms, "
          f"p99 {result['latency_p99_ms']:.1f} ms, {metrics.value('deltatune_serve_batch_requests_sum') / batches:.2f} requests per batch")
