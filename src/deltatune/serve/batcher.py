"""Dynamic batching: concurrent requests, for any deltas, gathered into mixed batches.

Requests wait in a bounded queue. A collector takes the first, gathers more for up to
``max_wait_ms`` or until ``max_batch`` rows, and runs them through the engine on one worker
thread (so the event loop keeps answering). A full queue answers 503 with ``Retry-After``;
a request not answered within ``timeout_s`` gets 504.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .completions import complete
from .engine import Engine, Work
from .errors import ApiError, as_api_error
from .metrics import Metrics

CLASSIFY, COMPLETE = "classify", "complete"


@dataclass
class Job:
    """One request waiting for the model."""

    kind: str
    work: Work
    future: asyncio.Future
    #: called on the event loop with ``(choice index, new text, finished Choice or None)`` while generating
    on_text: Callable[[int, str, Any], None] | None = None
    abandoned: bool = field(default=False)

    @property
    def rows(self) -> int:
        return len(self.work.texts)



class Batcher:
    """The queue between request handlers and the engine.

    Args:
        engine: the model side.
        metrics: where batch sizes are counted.
        max_batch: most rows per model batch (one request is never split).
        max_wait_ms: how long the first request of a batch waits for others.
        queue_size: most requests waiting; beyond it requests get 503.
        timeout_s: most seconds a request may wait for its answer; beyond it 504.
    """

    def __init__(self, engine: Engine, metrics: Metrics, *, max_batch: int = 32, max_wait_ms: float = 5.0,
                 queue_size: int = 256, timeout_s: float = 30.0) -> None:
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.max_wait, self.queue_size, self.timeout = max_batch, max_wait_ms / 1000, queue_size, timeout_s
        self.queue: asyncio.Queue[Job] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._collector: asyncio.Task | None = None
        self._batch_seconds = 0.05  # running mean, for Retry-After

    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltatune-serve")
        self._collector = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    # --- called by handlers -----------------------------------------------------------------

    def submit(self, kind: str, work: Work, on_text: Callable[[int, str, Any], None] | None = None) -> Job:
        """Queue a request; 503 with ``Retry-After`` when the queue is full. A job marked
        ``abandoned`` (its client went away) is skipped, or stops generating if it has started."""
        assert self.queue is not None, "the batcher is not started"
        job = Job(kind, work, asyncio.get_running_loop().create_future(), on_text)
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            wait = max(1, math.ceil(self._batch_seconds * (self.queue.qsize() / self.max_batch + 1)))
            raise ApiError(503, "queue_full", f"the server is busy: {self.queue.qsize()} requests are waiting "
                           f"(queue size {self.queue_size}); retry after {wait} s",
                           headers={"Retry-After": str(wait)}) from None
        return job

    async def result(self, job: Job, timeout: float | None = None) -> Any:
        """The job's answer; 504 when it takes longer than the timeout."""
        timeout = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            job.abandoned = True
            raise ApiError(504, "timeout", f"no answer within {timeout:g} s (the server's --timeout); "
                           f"retry, or send fewer inputs per request") from None

    async def run(self, kind: str, work: Work) -> Any:
        """Queue a request and wait for its answer."""
        return await self.result(self.submit(kind, work))

    async def call(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on the model's worker thread, between batches (loading, unloading)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, action)

    # --- the collector ----------------------------------------------------------------------

    async def _collect(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        carry: Job | None = None
        while True:
            first = carry if carry is not None else await self.queue.get()
            carry = None
            if first.abandoned:
                continue
            jobs, rows = [first], first.rows
            deadline = loop.time() + self.max_wait
            while rows < self.max_batch:
                remaining = deadline - loop.time()
                try:
                    job = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if job.abandoned:
                    continue
                if rows + job.rows > self.max_batch:
                    carry = job
                    break
                jobs.append(job)
                rows += job.rows
            groups: dict[str, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.kind, []).append(job)
            for group in groups.values():
                await self._run(group)

    async def _run(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        works = [job.work for job in jobs]
        kind = jobs[0].kind
        streaming = any(job.on_text is not None for job in jobs)

        def on_text(index: int, choice: int, piece: str, finished: Any) -> None:
            if jobs[index].on_text is not None:
                loop.call_soon_threadsafe(jobs[index].on_text, choice, piece, finished)

        def work() -> list:
            if kind == CLASSIFY:
                return self.engine.classify(works)
            return complete(self.engine, works, on_text if streaming else None, lambda i: jobs[i].abandoned)

        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, work)
        except Exception as error:  # noqa: BLE001 - every request of the batch gets the error
            results = [as_api_error(error)] * len(jobs)
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - started)
        self.metrics.batch(len(jobs), sum(job.rows for job in jobs))
        for job, result in zip(jobs, results):
            if not isinstance(result, BaseException):
                generated = sum(c.completion_tokens for c in result) if kind == COMPLETE else 0
                self.metrics.served(job.work.delta, generated)
            if job.future.done() or job.abandoned:
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
