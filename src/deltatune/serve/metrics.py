"""Prometheus metrics of the server through ``prometheus_client``, one registry per app.

A registry of its own per :class:`Metrics` keeps two apps in one process (tests, benchmarks)
from sharing counts. The names are ``deltatune_serve_*``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFIX = "deltatune_serve"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Requests, latency, batch sizes, errors, per-delta requests and tokens, loaded deltas, queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        p, r = PREFIX, self.registry
        self.requests = Counter(f"{p}_requests", "Requests answered, by endpoint and HTTP status.",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter(f"{p}_errors", "Error answers, by error type.", ["type"], registry=r)
        self.latency = Histogram(f"{p}_request_seconds", "Time from receiving a request to its answer.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram(f"{p}_batch_rows", "Rows (inputs or prompts) per model batch.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram(f"{p}_batch_requests", "Requests per model batch.", buckets=BATCH_BUCKETS,
                                        registry=r)
        self.rows = Counter(f"{p}_rows", "Rows run through the model.", registry=r)
        self.delta_requests = Counter(f"{p}_delta_requests", "Requests run, by delta ('base': none).", ["delta"],
                                      registry=r)
        self.generated = Counter(f"{p}_generated_tokens", "Tokens generated, by delta ('base': none).", ["delta"],
                                 registry=r)
        self.loaded = Gauge(f"{p}_loaded_deltas", "Deltas loaded on the base now.", registry=r)
        self.depth = Gauge(f"{p}_queue_depth", "Requests waiting for a batch.", registry=r)

    def request(self, endpoint: str, status: int, seconds: float, error_type: str | None = None) -> None:
        """Count one answered request of ``endpoint`` with its status and latency."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if error_type is not None:
            self.errors.labels(error_type).inc()

    def batch(self, requests: int, rows: int) -> None:
        """Count one model batch of ``requests`` requests and ``rows`` rows."""
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.rows.inc(rows)

    def served(self, delta: str | None, generated_tokens: int = 0) -> None:
        """Count one request run on ``delta`` (``None``: the base) and the tokens it generated."""
        name = delta or "base"
        self.delta_requests.labels(name).inc()
        if generated_tokens:
            self.generated.labels(name).inc(generated_tokens)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when it has none yet), e.g. ``value("deltatune_serve_rows_total")``."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self, loaded_deltas: int, queue_depth: int) -> bytes:
        """Every metric in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        self.loaded.set(loaded_deltas)
        self.depth.set(queue_depth)
        return generate_latest(self.registry)
