"""The serving loop: one background thread owns the scheduler; front ends submit jobs from any thread.

Triton's model, the OpenAI server and the Python API's streaming all hand requests to an `EngineLoop`.
A job joins the running batch at the next step, whatever its mode and settings; its committed tokens,
its final result, an error and cancellation travel through its `ResponseSink`, so this module knows
nothing of any protocol and is tested with plain Python sinks.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..backends.step import StepEngine
from ..errors import RequestError
from ..modes.sequence import Sequence, SequenceResult
from ..request import Request
from .scheduler import DECODE_FIRST, Scheduler, StepRecord

LOG = logging.getLogger("trimode.loop")
_LIVE_LOOPS: weakref.WeakSet[EngineLoop] = weakref.WeakSet()


@atexit.register
def _stop_live_loops() -> None:
    """Stop every running loop before the interpreter finalizes: a worker thread still inside torch when
    Python tears daemon threads down dies in C++ ("terminate called without an active exception", exit 134).
    Runs for programs that never call close() (the README's first LLM snippet)."""
    for loop in list(_LIVE_LOOPS):
        loop.stop(timeout=30.0)


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
    request: Request
    sink: ResponseSink
    arrived: float = field(default_factory=time.monotonic)


class EngineLoop:
    """Runs an iteration-level `Scheduler` on a worker thread; see the module docstring."""

    def __init__(self, engine: StepEngine, max_batch_size: int | None = None, max_step_tokens: int | None = None,
                 on_step: Callable[[StepRecord], None] | None = None, policy: str = DECODE_FIRST) -> None:
        self.engine = engine
        self.scheduler = Scheduler(engine, max_batch_size, max_step_tokens, on_step, policy=policy)
        self.max_batch_size = self.scheduler.max_rows
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trimode-engine-loop", daemon=True)
            self._thread.start()
            _LIVE_LOOPS.add(self)

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            _safe(job.sink.fail, "the model is shutting down")
            return
        self._inbox.put(job)

    def queue_length(self) -> int:
        """Requests waiting for admission (plus those not yet taken from the inbox)."""
        return len(self.scheduler.waiting) + self._inbox.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, cancel what runs at the next step (each gets its finish), end the worker."""
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        _LIVE_LOOPS.discard(self)
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _safe(job.sink.fail, "the model is shutting down")

    # -- worker ---------------------------------------------------------------------------------------------
    def _take(self, block: bool) -> bool:
        """Move jobs from the inbox into the scheduler; False when asked to stop."""
        while True:
            try:
                job = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return not self._stopping.is_set()
            if job is None:
                return False
            block = False
            self._admit(job)

    def _admit(self, job: Job) -> None:
        sink = job.sink

        def finished(seq: Sequence) -> None:
            if seq.finish_reason == "error":
                _safe(sink.fail, seq.error or "generation failed")
            else:
                _safe(sink.finish, seq.result())

        try:
            self.scheduler.submit(job.request, on_tokens=lambda _i, ids: _safe(sink.tokens, ids),
                                  is_cancelled=lambda _i: self._stopping.is_set() or _cancelled(sink),
                                  on_finish=finished)
        except RequestError as exc:
            _safe(sink.fail, str(exc))

    def _run(self) -> None:
        running = True
        while running or self.scheduler.has_work:
            if running:
                running = self._take(block=not self.scheduler.has_work)
            if not running:
                self.scheduler.cancel_all()
                break
            try:
                self.scheduler.step()
            except Exception as exc:  # one bad step must not take the server down; each client hears why
                LOG.exception("a scheduler step failed")
                self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")

    def _fail_all(self, message: str) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if not seq.done:
                seq.finish_reason = "error"
                seq.error = message
        self.scheduler.cancel_all()


def _cancelled(sink: ResponseSink) -> bool:
    try:
        return bool(sink.cancelled())
    except Exception:  # asking a vanished client counts as "gone"
        return True


def _safe(call: Callable, *args) -> None:
    try:
        call(*args)
    except Exception:
        LOG.exception("a response sink raised")
