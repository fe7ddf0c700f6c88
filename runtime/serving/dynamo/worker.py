"""A trimode engine as NVIDIA Dynamo workers: one engine, one scheduler, one served model per mode.

`DynamoDeployment` owns what every served model of a worker process shares: the engine, its `Frontend`
(tokenizer, the one settings mapping, the one `EngineLoop`) and the KV event relay on the engine's page
allocator. `TrimodeLLMEngine` is Dynamo's `LLMEngine` for one served model (NAME, NAME:ar, NAME:spec,
NAME:quad, NAME:diffusion): `start` registers the engine's limits (context length, KV block size = page size,
total blocks, max sequences), `generate` submits a job to the shared loop and streams its tokens,
`kv_event_sources` hands Dynamo's publisher to the relay, `cleanup` stops the loop once the last model is
done. `serve` runs one Dynamo `Worker` per served model in one process (each its own endpoint, so the
frontend sees each mode as its own model; the stock frontend refuses unknown request fields, so a mode
cannot travel in the request).

Requests need `dynamo` (`make dynamo`); docs/scale-out.md shows the deployments.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynamo._core import Context
from dynamo.common.backend import EngineConfig, LLMEngine, LlmRegistration, Worker, WorkerConfig
from dynamo.common.backend.publisher import PushSource
from dynamo.llm import ModelInput
from dynamo.llm.exceptions import EngineShutdown, HttpError, InvalidArgument, Unknown

from ...errors import OverloadedError, RequestError, ShuttingDownError
from ...modes.sequence import SequenceResult, TokenLogprob
from ...scheduler.loop import Job
from ..frontend import Frontend
from .events import KvEventRelay
from .requests import MODE_SUFFIXES, final_chunk, request_settings, served_models, token_chunk

LOG = logging.getLogger("trimode.dynamo")

#: files of the engine's tokenizer folder the Dynamo frontend reads (its tokenizer, chat template, EOS ids)
CARD_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
              "special_tokens_map.json")


class StreamSink:
    """The `ResponseSink` of one Dynamo request: hands the engine thread's calls to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancel = threading.Event()
        self.done = False

    def _put(self, event: tuple[str, Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancel.set()

    def tokens(self, ids: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        self._put(("tokens", (list(ids), logprobs)))

    def finish(self, result: SequenceResult) -> None:
        self._put(("done", result))

    def fail(self, message: str) -> None:
        self._put(("error", message))

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()


def model_card(engine_dir: Path, engine: Any) -> Path:
    """The folder Dynamo registers the model from: config.json and the tokenizer files.

    A checkpoint folder with its tokenizer is used as it is; for an engine (its config lives in
    manifest.json) a folder in the temp directory holds config.json and copies of the tokenizer files, at a
    path fixed by the engine's, so every worker of one engine registers the same card."""
    engine_dir = Path(engine_dir).resolve()
    tokenizer = getattr(engine, "tokenizer_path", None)
    if tokenizer is None:
        raise RequestError(f"{engine_dir} has no tokenizer.json: the Dynamo frontend tokenizes, it needs one")
    tokenizer_dir = Path(tokenizer).resolve().parent
    if (tokenizer_dir / "config.json").is_file():
        return tokenizer_dir
    key = hashlib.sha256(str(engine_dir).encode()).hexdigest()[:16]
    card = Path(tempfile.gettempdir()) / f"trimode-dynamo-card-{key}"
    card.mkdir(exist_ok=True)
    config = engine.config.to_hf_dict() if hasattr(engine.config, "to_hf_dict") else {}
    config["max_position_embeddings"] = int(engine.limits.max_seq_len)
    (card / "config.json").write_text(json.dumps(config, indent=2))
    for name in CARD_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, card / name)
    return card


class DynamoDeployment:
    """The engine, its Frontend and the KV relay, shared by the served models of one worker process."""

    def __init__(self, engine: Any, frontend: Frontend, engine_dir: Path, name: str, *,
                 modes: Sequence[str] = MODE_SUFFIXES, block_length: int | str | None = None,
                 threshold: float | None = None, namespace: str = "dynamo", component: str = "trimode",
                 discovery_backend: str = "file", request_plane: str = "tcp", event_plane: str | None = None,
                 kv_events: bool = True) -> None:
        self.engine = engine
        self.frontend = frontend
        self.engine_dir = Path(engine_dir)
        self.name = name
        self.models = served_models(name, modes)
        self.block_length = block_length
        self.threshold = threshold
        self.namespace = namespace
        self.component = component
        self.discovery_backend = discovery_backend
        self.request_plane = request_plane
        self.event_plane = event_plane
        pages = frontend.loop.scheduler.pages
        self.pages = pages
        self.kv_events = kv_events and pages.prefix_caching
        self.relay = KvEventRelay(pages.page_size)
        self.eos_token_ids = (int(engine.config.eos_token_id),)
        self._users = 0
        self._lock = threading.Lock()
        self._card: Path | None = None

    # -- lifecycle (every served model's start/cleanup) ---------------------------------------------------
    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                if self.kv_events:
                    self.pages.listener = self.relay
                self.frontend.start()
            self._users += 1

    def release(self) -> None:
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                self.relay.close()
                if self.pages.listener is self.relay:
                    self.pages.listener = None
                self.frontend.stop()

    def release_all(self) -> None:
        """Stop the loop whatever the served models did (the process is leaving)."""
        with self._lock:
            self._users = 1
        self.release()

    @property
    def card(self) -> Path:
        if self._card is None:
            self._card = model_card(self.engine_dir, self.engine)
        return self._card

    def registration(self) -> LlmRegistration:
        scheduler = self.frontend.loop.scheduler
        return LlmRegistration(context_length=int(self.engine.limits.max_seq_len),
                               kv_cache_block_size=int(self.pages.page_size),
                               total_kv_blocks=int(self.pages.num_pages), max_num_seqs=int(scheduler.max_rows),
                               max_num_batched_tokens=int(scheduler.max_step_tokens))

    def engines(self) -> list[tuple[TrimodeLLMEngine, WorkerConfig]]:
        """One (LLMEngine, WorkerConfig) per served model, each on its own endpoint."""
        out = []
        for served, mode in self.models:
            endpoint = "generate" if mode is None else f"generate_{mode}"
            config = WorkerConfig(namespace=self.namespace, component=self.component, endpoint=endpoint,
                                  model_name=str(self.card), served_model_name=served,
                                  model_input=ModelInput.Tokens, endpoint_types="chat,completions",
                                  discovery_backend=self.discovery_backend, request_plane=self.request_plane,
                                  event_plane=self.event_plane, enable_kv_routing=self.kv_events)
            out.append((TrimodeLLMEngine(self, served, mode), config))
        return out


class TrimodeLLMEngine(LLMEngine):
    """Dynamo's engine contract for one served model (one mode) of a `DynamoDeployment`."""

    def __init__(self, deployment: DynamoDeployment, served_name: str, mode: str | None) -> None:
        self.deployment = deployment
        self.served_name = served_name
        self.mode = mode
        self._started = False
        self._live: dict[str, StreamSink] = {}

    @classmethod
    async def from_args(cls, argv: list[str] | None = None) -> tuple[TrimodeLLMEngine, WorkerConfig]:
        """One served model from a command line (`python -m trimode.runtime.serving.dynamo ENGINE [--mode M]`,
        for Dynamo's own `run()`); `trimode serve --api dynamo` serves every mode in one process instead."""
        parser = argparse.ArgumentParser(description="trimode as a Dynamo worker (one mode)")
        parser.add_argument("engine_dir", type=Path)
        parser.add_argument("--served-model-name", default=None)
        parser.add_argument("--mode", choices=MODE_SUFFIXES, default=None)
        parser.add_argument("--namespace", default="dynamo")
        parser.add_argument("--discovery-backend", default="file", choices=["file", "etcd", "kubernetes"])
        args = parser.parse_args(argv)
        deployment = open_deployment(args.engine_dir, args.served_model_name, namespace=args.namespace,
                                     discovery_backend=args.discovery_backend,
                                     modes=() if args.mode is None else (args.mode,))
        engines = deployment.engines()
        return engines[-1]

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self, worker_id: int) -> EngineConfig:
        del worker_id  # the engine is the same whichever instance id Dynamo gave this endpoint
        try:
            self.deployment.acquire()
        except Exception as exc:
            raise EngineShutdown(f"the trimode engine could not start: {type(exc).__name__}: {exc}") from exc
        self._started = True
        return EngineConfig(model=str(self.deployment.card), served_model_name=self.served_name,
                            llm=self.deployment.registration())

    async def kv_event_sources(self) -> list[PushSource]:
        if not self.deployment.kv_events:
            return []
        return [PushSource(on_ready=self.deployment.relay.attach, dp_rank=0)]

    async def abort(self, context: Context) -> None:
        sink = self._live.get(context.id())
        if sink is not None:
            sink.cancel()

    async def cleanup(self) -> None:
        if self._started:
            self._started = False
            for sink in list(self._live.values()):
                sink.cancel()
            self.deployment.release()

    # -- requests ----------------------------------------------------------------------------------------------
    async def generate(self, request: dict, context: Context):
        deployment = self.deployment
        frontend = deployment.frontend
        prompt = [int(t) for t in request.get("token_ids") or []]
        try:
            settings = request_settings(request, self.mode, deployment.eos_token_ids, deployment.block_length,
                                        deployment.threshold)
            prepared = frontend.prepare([prompt], settings)[0]
        except RequestError as exc:
            raise InvalidArgument(str(exc)) from None
        sink = StreamSink(asyncio.get_running_loop())
        key = context.id() or str(id(sink))
        self._live[key] = sink
        wants_logprobs = prepared.config.logprobs is not None
        produced = 0
        try:
            if context.is_stopped() or context.is_killed():
                return
            try:
                frontend.start()
                frontend.loop.submit_all([Job(prepared.request, sink)])
            except ShuttingDownError as exc:  # draining (Dynamo unregisters a stopping worker first)
                raise HttpError(503, str(exc)) from None
            except OverloadedError as exc:  # the queue is full (--max-queued-jobs): 429, as the OpenAI server
                raise HttpError(429, str(exc)) from None
            except RequestError as exc:
                raise InvalidArgument(str(exc)) from None
            while True:
                kind, payload = await sink.queue.get()
                if context.is_stopped() or context.is_killed():
                    sink.cancel()
                if kind == "tokens":
                    ids, logprobs = payload
                    produced += len(ids)
                    yield token_chunk(ids, logprobs if wants_logprobs else None,
                                      frontend.decode if wants_logprobs else None)
                elif kind == "done":
                    sink.done = True
                    result: SequenceResult = payload
                    tokens = len(result.tokens)
                    if tokens > produced:  # never expected: the sink saw every committed token
                        yield token_chunk(result.tokens[produced:])
                    yield final_chunk(result.finish_reason, len(prompt), tokens, int(result.cached_tokens))
                    return
                else:
                    sink.done = True
                    raise Unknown(f"trimode: {payload}")
        finally:
            if not sink.done:
                sink.cancel()  # the client went away, or the frontend stopped the stream (a stop string)
            self._live.pop(key, None)


def open_deployment(engine_dir: Path, served_model_name: str | None = None, *, dtype: str = "auto",
                    use_lora: bool = True, device: str = "auto", max_batch_size: int | None = None,
                    max_seq_len: int | None = None, cache: dict | None = None, default_mode: str = "spec",
                    default_max_tokens: int = 64, max_step_tokens: int | None = None,
                    policy: str = "prefill-first", limits: Any = None, generation_config: str = "auto",
                    **deployment: Any) -> DynamoDeployment:
    """Open the engine and its Frontend and wrap them as a deployment (no Dynamo runtime yet)."""
    from ...backends.devices import resolve_device
    from ...backends.engine_loader import open_engine

    engine = open_engine(engine_dir, dtype=dtype, use_lora=use_lora, device=resolve_device(device),
                         max_batch_size=max_batch_size, max_seq_len=max_seq_len, **(cache or {}))
    frontend = Frontend(engine, default_mode=default_mode, default_max_tokens=default_max_tokens, use_lora=use_lora,
                        max_step_tokens=max_step_tokens, max_batch_size=max_batch_size, policy=policy,
                        limits=limits, generation_config=generation_config)
    name = served_model_name or Path(engine_dir).resolve().name
    return DynamoDeployment(engine, frontend, Path(engine_dir), name, **deployment)


async def run_workers(deployment: DynamoDeployment) -> None:
    """Serve every model of the deployment until SIGTERM / Ctrl-C (Dynamo's Worker owns the signals: it
    unregisters, lets in-flight requests finish, then calls each engine's cleanup)."""
    workers = [Worker(engine, config).run() for engine, config in deployment.engines()]
    try:
        await asyncio.gather(*workers)
    finally:
        deployment.release_all()


def serve(deployment: DynamoDeployment) -> None:
    """Run the deployment's Dynamo workers on uvloop (what Dynamo's own backends run on)."""
    import uvloop

    uvloop.run(run_workers(deployment))
