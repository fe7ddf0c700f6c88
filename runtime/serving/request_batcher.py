"""Grouping requests that arrive together into shared `generate()` calls, on one background thread.

Triton hands a decoupled Python model its requests and lets `execute()` return at once; the responses may be
sent later from any thread. The batcher owns that later: a worker thread takes the first waiting job, waits a
short window for companions, groups the jobs whose `GenerationConfig` is equal (the modes run a batch only with
one mode and one set of parameters) and runs each group, at most the engine's batch size at a time, as one
`generate()` call. Jobs that arrive while a batch runs wait for the next round. Committed tokens, the final
result, errors and cancellation travel through each job's `ResponseSink`, so this module knows nothing of
Triton and is tested with plain Python sinks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..backends.torch_engine import StepEngine
from ..generate import GenerationConfig, RequestError, generate, validate_request
from ..modes.sequence import SequenceResult

LOG = logging.getLogger("trimode.batcher")


class ResponseSink(Protocol):
    """Where one request's output goes. Implementations must not raise (a dead client is not our failure)."""

    def tokens(self, ids: list[int]) -> None:
        """Tokens just committed for this request, in order."""

    def finish(self, result: SequenceResult) -> None:
        """The request is done (finish_reason eos, length or cancelled); send the final response."""

    def fail(self, message: str) -> None:
        """The request cannot be completed; send an error as the final response."""

    def cancelled(self) -> bool:
        """True once the client has given up on the request."""


@dataclass
class Job:
    prompt: list[int]
    config: GenerationConfig
    sink: ResponseSink
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchRecord:
    """One `generate()` call the worker made (kept for logs and tests)."""

    mode: str
    size: int
    seconds: float


_STOP = object()


class RequestBatcher:
    """Runs submitted jobs on a worker thread, batching compatible ones; see the module docstring."""

    def __init__(self, engine: StepEngine, window_s: float = 0.005, max_batch_size: int | None = None,
                 on_batch: Callable[[BatchRecord], None] | None = None) -> None:
        self.engine = engine
        self.window_s = max(0.0, window_s)
        self.max_batch_size = max(1, min(max_batch_size or engine.max_batch_size, engine.max_batch_size))
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="trimode-batcher", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            job.sink.fail("the model is shutting down")
            return
        self._queue.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the batch in flight at its next step, fail whatever still waits, and end the worker."""
        self._stopping.set()
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                item.sink.fail("the model is shutting down")

    # -- worker ---------------------------------------------------------------------------------------------

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        """The first job plus everything that arrives within the window (and whatever already waits)."""
        jobs = [first]
        deadline = time.monotonic() + self.window_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                return jobs, False
            if item is _STOP:
                return jobs, True
            jobs.append(item)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs, stop = self._collect(first)
            for group in group_jobs(jobs, self.max_batch_size):
                try:
                    self.run_group(group)
                except Exception:  # a misbehaving sink: keep the worker alive for everyone else
                    LOG.exception("a batch of %d requests failed outside generate()", len(group))
                    for job in group:
                        _safe_fail(job.sink, "internal error while sending the response")
            if stop:
                return

    def run_group(self, jobs: list[Job]) -> None:
        """One `generate()` call for jobs sharing a config; every job gets exactly one finish or fail."""
        live: list[Job] = []
        for job in jobs:
            try:  # one bad request must not fail its companions (Triton's model validates earlier, too)
                validate_request(self.engine, [job.prompt], job.config)
            except RequestError as exc:
                job.sink.fail(str(exc))
                continue
            if _safe_cancelled(job.sink):
                job.sink.finish(SequenceResult([], 0, "cancelled", len(job.prompt)))
            else:
                live.append(job)
        if not live:
            return
        config = live[0].config

        def on_tokens(index: int, ids: list[int]) -> None:
            live[index].sink.tokens(ids)

        def is_cancelled(index: int) -> bool:  # shutting down cancels the batch in flight too
            return self._stopping.is_set() or _safe_cancelled(live[index].sink)

        start = time.perf_counter()
        try:
            results = generate(self.engine, [job.prompt for job in live], config, on_tokens, is_cancelled)
        except Exception as exc:  # one bad batch must not take the server down; each client hears why
            LOG.exception("generate() failed for a batch of %d %s requests", len(live), config.mode)
            for job in live:
                job.sink.fail(f"generation failed: {type(exc).__name__}: {exc}")
            return
        record = BatchRecord(config.mode, len(live), time.perf_counter() - start)
        if self.on_batch is not None:
            self.on_batch(record)
        for job, result in zip(live, results, strict=True):
            job.sink.finish(result)


def group_jobs(jobs: list[Job], max_batch_size: int) -> list[list[Job]]:
    """Jobs with equal configs together, in order of first arrival, split at `max_batch_size`."""
    groups: dict[GenerationConfig, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.config, []).append(job)
    batches = []
    for members in groups.values():
        for start in range(0, len(members), max_batch_size):
            batches.append(members[start : start + max_batch_size])
    return batches


def _safe_fail(sink: ResponseSink, message: str) -> None:
    try:
        sink.fail(message)
    except Exception:
        LOG.exception("could not report a failure to a client")


def _safe_cancelled(sink: ResponseSink) -> bool:
    try:
        return bool(sink.cancelled())
    except Exception:  # asking a vanished client counts as "gone"
        return True
