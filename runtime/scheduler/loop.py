"""The serving loop: one background thread owns the scheduler; front ends submit jobs from any thread.

Triton's model, the OpenAI server and the Python API's streaming all hand requests to an `EngineLoop`.
A job joins the running batch at the next step, whatever its mode and settings; its committed tokens,
its final result, an error and cancellation travel through its `ResponseSink`, so this module knows
nothing of any protocol and is tested with plain Python sinks.

The queue is bounded when `max_queued_jobs` is set: a submission whose jobs would make more than that many
wait for admission is refused whole (`OverloadedError`, which servers answer with 429 / UNAVAILABLE), so a
flood of work cannot make every later request wait without end. `drain()` is the graceful half of a shutdown:
new jobs are refused, running ones may finish for a while, then what is left is cancelled (each job still gets
its final response).
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
from ..errors import OverloadedError, RequestError, ShuttingDownError
from ..modes.sequence import Sequence, SequenceResult, TokenLogprob
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

    def tokens(self, ids: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        """Tokens just committed for this request, in order; with their logprobs when the request asked for
        them (only then is the argument passed)."""

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
                 on_step: Callable[[StepRecord], None] | None = None, policy: str = DECODE_FIRST,
                 max_row_tokens: int | None = None, max_queued_jobs: int | None = None) -> None:
        self.engine = engine
        self.scheduler = Scheduler(engine, max_batch_size, max_step_tokens, on_step, policy=policy,
                                   max_row_tokens=max_row_tokens)
        self.max_batch_size = self.scheduler.max_rows
        self.max_queued_jobs = max_queued_jobs
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._draining = threading.Event()   # new jobs are refused
        self._cancelling = threading.Event()  # every job still running is cancelled at the next step
        self._submit_lock = threading.Lock()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trimode-engine-loop", daemon=True)
            self._thread.start()
            _LIVE_LOOPS.add(self)

    def submit(self, job: Job) -> None:
        """Queue one job; when the queue is full its sink hears why (see `submit_all` to refuse instead)."""
        try:
            self.submit_all([job])
        except (OverloadedError, RequestError) as exc:
            _safe(job.sink.fail, str(exc))

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue a request's jobs together, or none of them: RequestError when one can never be served here
        (`Scheduler.check`), OverloadedError when they would make more than `max_queued_jobs` wait,
        ShuttingDownError once the loop drains or stops."""
        if self._stopping.is_set() or self._draining.is_set():
            raise ShuttingDownError("the model is shutting down")
        for job in jobs:
            self.scheduler.check(job.request)
        if self.max_queued_jobs is not None and len(jobs) > self.max_queued_jobs:
            raise RequestError(f"this request brings {len(jobs)} jobs, more than may ever wait on this server "
                               f"({self.max_queued_jobs}, --max-queued-jobs)")
        with self._submit_lock:
            if self.max_queued_jobs is not None:
                queued = self.queue_length()
                if queued + len(jobs) > self.max_queued_jobs:
                    raise OverloadedError(f"the server is busy: {queued} jobs wait for admission and this request "
                                          f"brings {len(jobs)} (at most {self.max_queued_jobs} may wait); retry "
                                          "later")
            for job in jobs:
                self._inbox.put(job)

    def drain(self, timeout_s: float) -> None:
        """Refuse new jobs from now on; cancel whatever still runs after `timeout_s` seconds (each job gets its
        final response with finish reason "cancelled"). Returns at once; see `idle`."""
        self._draining.set()
        timer = threading.Timer(timeout_s, self._cancelling.set)
        timer.daemon = True
        timer.start()

    @property
    def idle(self) -> bool:
        """Nothing queued or running (after `drain`: every job has had its final response)."""
        return not self.scheduler.has_work and self._inbox.empty()

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

        admitted: list[Sequence] = []

        def on_tokens(_index: int, ids: list[int]) -> None:
            logprobs = admitted[0].logprobs if admitted else None
            if logprobs is None:
                _safe(sink.tokens, ids)
            else:  # the request asked for logprobs: the entries of these tokens, the last ones recorded
                _safe(sink.tokens, ids, logprobs[len(logprobs) - len(ids):])

        try:
            admitted.append(self.scheduler.submit(
                job.request, on_tokens=on_tokens, on_finish=finished,
                is_cancelled=lambda _i: self._stopping.is_set() or self._cancelling.is_set() or _cancelled(sink)))
        except RequestError as exc:
            _safe(sink.fail, str(exc))
        except Exception as exc:  # a request the scheduler could not take: it alone fails
            LOG.exception("submitting a request failed")
            _safe(sink.fail, f"the request could not be started: {type(exc).__name__}: {exc}")

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
