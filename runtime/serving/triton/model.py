"""The Triton Python-backend model behind every repository `trimode triton-repo` writes.

`execute()` never generates: it parses each request (bad ones get a `TritonError` response at once and the
model keeps serving), wraps its response sender in a `TritonSink` and queues it for the `EngineLoop`, whose
worker thread runs every request, whatever its mode and settings, in the scheduler's shared steps. With the
decoupled policy a streaming request gets one response per commit (an AR token, an accepted speculation run,
a finished diffusion block) and a last, FINAL-flagged response carrying the remaining text, the forward count
and the finish reason; a non-streaming request, or any request to the non-decoupled twin, gets one FINAL
response. A request the client cancels is dropped at the next step.

Shutdown (`trimode serve` on SIGTERM or Ctrl-C): tritonserver itself would hold in-flight decoupled requests
until its exit timeout and then drop their connections, so the model is told first, through the drain folder
named in its settings: when `STOP` appears there, new requests are refused, running ones may finish for the
time written in it, and what is left is cancelled with a final response (finish reason "cancelled", the text
so far); then the model writes `done-<instance>` and `trimode serve` stops tritonserver.

`triton_python_backend_utils` exists only inside Triton's stub process, so it is imported in `initialize`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...backends.engine_loader import open_engine
from ...errors import OverloadedError, RequestError
from ...modes.sequence import SequenceResult
from ...request import engine_generation_defaults
from ...scheduler.loop import EngineLoop, Job
from ...scheduler.scheduler import StepRecord
from ..text import TextAssembler, load_tokenizer
from .repo import ServingSettings
from .request import INPUT_NAMES, parse_request

CANCEL_POLL_S = 0.005


class TritonSink:
    """Delivers one request's tokens and result through its Triton response sender (see `ResponseSink`)."""

    def __init__(self, pb: Any, sender: Any, tokenizer: Any, stream: bool, log: Any) -> None:
        self.pb = pb
        self.sender = sender
        self.tokenizer = tokenizer
        self.stream = stream
        self.log = log
        self.text = TextAssembler(tokenizer.decode) if (stream and tokenizer is not None) else None
        self.sent_tokens = 0
        self._gone = False
        self._checked = 0.0
        self._lock = threading.Lock()

    def _tensors(self, ids: list[int], text: str | None, result: SequenceResult | None) -> list[Any]:
        tensors = [self.pb.Tensor("output_ids", np.asarray(ids, dtype=np.int32))]
        if text is not None:
            tensors.append(self.pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)))
        if result is not None:
            tensors.append(self.pb.Tensor("forwards", np.asarray([result.forwards], dtype=np.int32)))
            tensors.append(self.pb.Tensor("finish_reason",
                                          np.array([result.finish_reason.encode()], dtype=np.object_)))
            tensors.append(self.pb.Tensor("cached_tokens", np.asarray([result.cached_tokens], dtype=np.int32)))
        return tensors

    def _final(self, tensors: list[Any], result: SequenceResult) -> Any:
        """The final response. Where the Python backend supports response parameters (Triton 24.11 and later)
        they carry cached_tokens, forwards and block_length too; older ones (the one nvidia-pytriton bundles,
        Triton 2.51) have only the output tensors, which always carry them."""
        parameters = {"cached_tokens": int(result.cached_tokens), "forwards": int(result.forwards),
                      "block_length": int(result.block_length)}
        try:
            return self.pb.InferenceResponse(output_tensors=tensors, parameters=parameters)
        except TypeError:
            return self.pb.InferenceResponse(output_tensors=tensors)

    def _send(self, response: Any | None, final: bool) -> None:
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        with self._lock:
            if self._gone and not final:
                return
            try:
                if response is None:
                    self.sender.send(flags=flags)
                else:
                    self.sender.send(response, flags=flags)
            except Exception as exc:  # the client went away mid-stream: stop generating for it
                self._gone = True
                self.log(f"dropping a response: {type(exc).__name__}: {exc}")

    def tokens(self, ids: list[int]) -> None:
        self.sent_tokens += len(ids)
        if not self.stream or self._gone:
            return
        delta = self.text.add_many(ids) if self.text is not None else None
        self._send(self.pb.InferenceResponse(output_tensors=self._tensors(ids, delta, None)), final=False)

    def finish(self, result: SequenceResult) -> None:
        if result.finish_reason == "cancelled" and self.cancelled():  # the client's own cancellation
            self.log(f"request cancelled after {len(result.tokens)} tokens and {result.forwards} forwards")
            code = getattr(self.pb.TritonError, "CANCELLED", None)
            error = self.pb.TritonError("request cancelled", code) if code is not None else \
                self.pb.TritonError("request cancelled")
            self._send(self.pb.InferenceResponse(error=error), final=True)
            return
        full = self.tokenizer.decode(result.tokens) if self.tokenizer is not None else None
        if self.stream:
            tail = self.text.finish(result.tokens) if self.text is not None else full
            tensors = self._tensors([], tail, result)
        else:
            tensors = self._tensors(result.tokens, full, result)
        self._send(self._final(tensors, result), final=True)

    def fail(self, message: str, code: str = "INVALID_ARG") -> None:
        self._send(self.pb.InferenceResponse(error=_error(self.pb, message, code)), final=True)

    def cancelled(self) -> bool:
        """The sender's cancel flag (an IPC round trip, so asked at most every few milliseconds)."""
        if self._gone:
            return True
        now = time.monotonic()
        if now - self._checked < CANCEL_POLL_S:
            return False
        self._checked = now
        check = getattr(self.sender, "is_cancelled", None)
        if check is not None and check():
            self._gone = True
        return self._gone


def _error(pb: Any, message: str, code_name: str = "INVALID_ARG") -> Any:
    code = getattr(pb.TritonError, code_name, None)
    return pb.TritonError(message, code) if code is not None else pb.TritonError(message)


class TritonPythonModel:
    """Triton's entry points: initialize, execute, finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb  # only importable inside Triton's stub

        self.pb = pb
        model_config = json.loads(args["model_config"])
        self.name = model_config.get("name", "trimode")
        parameters = {key: value.get("string_value", "") for key, value in
                      model_config.get("parameters", {}).items()}
        self.settings = ServingSettings.from_parameters(parameters)
        self.decoupled = bool(pb.using_decoupled_model_transaction_policy(model_config))
        if self.settings.torch_threads > 0:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        limits = {key: value for key, value in (("max_batch_size", self.settings.max_batch_size),
                                                ("max_seq_len", self.settings.max_seq_len)) if value > 0}
        self.engine = open_engine(self.settings.engine_path, dtype=self.settings.dtype,
                                  use_lora=self.settings.use_lora, device=self.settings.device,
                                  kv_cache_memory=self.settings.kv_cache_memory or None,
                                  page_size=self.settings.page_size or None,
                                  prefix_caching=self.settings.prefix_caching, **limits)
        self.tokenizer = load_tokenizer(self.engine.tokenizer_path)
        self.sampling = engine_generation_defaults(self.engine, self.settings.generation_config)
        self._last_mix: tuple = ()
        self.loop = EngineLoop(self.engine, max_batch_size=self.settings.max_batch_size or None,
                               max_step_tokens=self.settings.max_step_tokens or None, on_step=self._on_step,
                               policy=self.settings.schedule_policy,
                               max_row_tokens=self.settings.max_row_tokens or None,
                               max_queued_jobs=self.settings.max_queued_jobs or None)
        self.loop.start()
        self.instance = f"{self.name}-{os.getpid()}-{args.get('model_instance_name', '')}".replace("/", "_")
        if self.settings.drain_dir:
            drain = Path(self.settings.drain_dir)
            drain.mkdir(parents=True, exist_ok=True)
            (drain / f"live-{self.instance}").touch()
            threading.Thread(target=self._watch_drain, args=(drain,), name="trimode-drain", daemon=True).start()
        limits = self.engine.limits
        self.log(f"serving {Path(self.settings.engine_path).name} (decoupled={self.decoupled}, "
                 f"max batch {self.loop.max_batch_size}, max sequence {limits.max_seq_len}, KV cache "
                 f"{limits.kv_pages} pages of {limits.page_size} positions, prefix cache "
                 f"{'on' if self.settings.prefix_caching else 'off'}, tokenizer {'yes' if self.tokenizer else 'no'})")

    def _watch_drain(self, drain: Path) -> None:
        """Wait for `STOP` in the drain folder (see the module docstring), drain, then report `done-...`."""
        stop = drain / "STOP"
        while not stop.exists():
            time.sleep(0.1)
        try:
            timeout_s = float(stop.read_text().strip() or 0)
        except (OSError, ValueError):
            timeout_s = 0.0
        self.log(f"shutting down: in-flight requests have {timeout_s:.1f}s to finish")
        self.loop.drain(timeout_s)
        while not self.loop.idle:
            time.sleep(0.05)
        (drain / f"done-{self.instance}").touch()

    def log(self, message: str) -> None:
        """Into Triton's log when the stub offers a logger, else stderr (which Triton also captures)."""
        logger = getattr(self.pb, "Logger", None)
        if logger is not None:
            logger.log_info(f"[{self.name}] {message}")
        else:
            print(f"[{self.name}] {message}", file=sys.stderr, flush=True)

    def _on_step(self, record: StepRecord) -> None:
        """Log whenever the mix of a step changes (how many requests, of which modes, share one forward), with
        the KV cache's state: pages in use, prefix-cache hits so far, preemptions so far."""
        mix = tuple(sorted(record.modes.items()))
        if mix != self._last_mix:
            self._last_mix = mix
            modes = ", ".join(f"{count} {mode}" for mode, count in mix)
            stats = self.loop.scheduler.pages.stats
            self.log(f"step {record.number}: {record.rows} requests in one forward ({modes}; {record.tokens} tokens); "
                     f"KV pages {record.pages_in_use}/{record.num_pages} in use, prefix cache "
                     f"{stats.hit_tokens}/{stats.queried_tokens} tokens hit, {record.preemptions} preemptions")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def execute(self, requests: list[Any]) -> None:
        """Parse and queue; all responses are sent by the engine loop's worker through each request's sender."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {}
                for name in INPUT_NAMES:
                    tensor = self.pb.get_input_tensor_by_name(request, name)
                    inputs[name] = tensor.as_numpy() if tensor is not None else None
                parsed = parse_request(inputs, self.engine, default_mode=self.settings.default_mode,
                                       default_max_tokens=self.settings.default_max_tokens,
                                       use_lora=self.settings.use_lora, allow_stream=self.decoupled,
                                       encode=self._encode if self.tokenizer is not None else None,
                                       sampling=self.sampling)
            except (RequestError, ValueError) as exc:
                sender.send(self.pb.InferenceResponse(error=_error(self.pb, str(exc))),
                            flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            sink = TritonSink(self.pb, sender, self.tokenizer, parsed.stream, self.log)
            try:
                self.loop.submit_all([Job(parsed.request, sink)])
            except RequestError as exc:  # beyond this server's limits
                sink.fail(str(exc))
            except OverloadedError as exc:  # a full queue, or shutting down
                sink.fail(str(exc), "UNAVAILABLE")
        return None

    def finalize(self) -> None:
        self.loop.stop()
