"""Prometheus metrics of the server, kept in memory and written in the text exposition format."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFIX = "deltatune_serve"


class Histogram:
    """Cumulative bucket counts, sum and count of observed values."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Requests, latency, batch sizes, errors and queue depth of one server (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.batch_requests = Histogram(BATCH_BUCKETS)
        self.rows = 0

    def request(self, endpoint: str, status: int, seconds: float, error_type: str | None = None) -> None:
        """Count one answered request of ``endpoint`` with its status and latency."""
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)
            if error_type is not None:
                self.errors[error_type] += 1

    def batch(self, requests: int, rows: int) -> None:
        """Count one model batch of ``requests`` requests and ``rows`` rows."""
        with self._lock:
            self.batch_requests.observe(requests)
            self.batch_rows.observe(rows)
            self.rows += rows

    def render(self, loaded_deltas: int, queue_depth: int) -> str:
        """The metrics in Prometheus text format (version 0.0.4)."""
        p = PREFIX
        with self._lock:
            lines = [f"# HELP {p}_requests_total Requests answered, by endpoint and HTTP status.",
                     f"# TYPE {p}_requests_total counter"]
            lines += [f'{p}_requests_total{{endpoint="{_escape(e)}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += [f"# HELP {p}_errors_total Error answers, by error type.", f"# TYPE {p}_errors_total counter"]
            lines += [f'{p}_errors_total{{type="{_escape(t)}"}} {n}' for t, n in sorted(self.errors.items())]
            lines += [f"# HELP {p}_request_seconds Time from receiving a request to its answer.",
                      f"# TYPE {p}_request_seconds histogram"]
            for endpoint, histogram in sorted(self.latency.items()):
                lines += histogram.lines(f"{p}_request_seconds", f'endpoint="{_escape(endpoint)}"')
            lines += [f"# HELP {p}_batch_rows Rows (inputs or prompts) per model batch.", f"# TYPE {p}_batch_rows histogram"]
            lines += self.batch_rows.lines(f"{p}_batch_rows", "")
            lines += [f"# HELP {p}_batch_requests Requests per model batch.", f"# TYPE {p}_batch_requests histogram"]
            lines += self.batch_requests.lines(f"{p}_batch_requests", "")
            lines += [f"# HELP {p}_rows_total Rows run through the model.", f"# TYPE {p}_rows_total counter",
                      f"{p}_rows_total {self.rows}"]
        lines += [f"# HELP {p}_loaded_deltas Deltas loaded on the base now.", f"# TYPE {p}_loaded_deltas gauge",
                  f"{p}_loaded_deltas {loaded_deltas}",
                  f"# HELP {p}_queue_depth Requests waiting for a batch.", f"# TYPE {p}_queue_depth gauge",
                  f"{p}_queue_depth {queue_depth}"]
        return "\n".join(lines) + "\n"
