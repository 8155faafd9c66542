"""Run a server in a background thread on loopback (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from fastapi import FastAPI

from ..errors import DeltaError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yields its base URL and stops it on exit.

    Raises:
        DeltaError: the server did not come up within ``start_timeout`` seconds.
    """
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"deltatune-serve-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise DeltaError(f"the server on {host}:{port} did not start within {start_timeout:g} s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
