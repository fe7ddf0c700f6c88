"""The Python API for embedding the engine: `from trimode import LLM, SamplingParams`.

    with LLM("path/to/engine-or-checkpoint") as llm:      # or LLM() for the shipped demo model
        params = SamplingParams(max_tokens=64, mode="spec", stop=["\\n\\n"])
        for out in llm.generate(["def add(a, b):", "import os"], params):
            print(out.text, out.finish_reason, out.forwards)
        for piece in llm.stream("class Stack:", params):      # text deltas as they are committed
            print(piece, end="", flush=True)
        [answer] = llm.chat([{"role": "user", "content": "hi"}], params)  # a list, one output per conversation

Without `with` (or `close()`), the engine loop is stopped when the program exits.

Every prompt is one request on the engine's scheduler loop (the same one `trimode serve` uses), so a batch
runs together in one forward per step and each prompt gets exactly its result alone. Stop strings, text
assembly and finish reasons are the OpenAI server's (finish_reason "stop" for EOS or a stop string, "length",
"cancelled").
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runtime.modes.sequence import TokenLogprob, tokens_per_forward
from .runtime.serving.frontend import Completion, Frontend, Prepared, Settings

Prompt = str | list[int]


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. Defaults: greedy, 64 tokens, the model's block length, self-speculation.

    mode: ar | diffusion | spec | quad | infill. block_length: int or "auto" (spec, quad). threshold: diffusion
    commit / draft confidence in [0, 1] (None: the even schedule / one-pass drafts). temperature 0 is greedy;
    top_p in (0, 1] and top_k (0: off) filter the sampling distribution. stop: strings that end the output (cut
    before them). max_thinking_tokens: force `</think>` after that many tokens (needs the token in the
    tokenizer). suffix: infill mode's text after the hole. enable_thinking: passed to the chat template.
    priority: lower runs first when the engine is full (default 0).
    """

    max_tokens: int = 64
    mode: str = "spec"
    temperature: float | None = None  # None: the checkpoint's generation_config.json default, else 0 (greedy)
    top_p: float | None = None        # None: the checkpoint's default, else 1.0
    top_k: int | None = None          # None: the checkpoint's default, else 0 (off)
    seed: int = 0
    stop: Sequence[str] = ()
    block_length: int | str | None = None
    threshold: float | None = None
    max_thinking_tokens: int | None = None
    suffix: str | None = None
    use_lora: bool | None = None
    enable_thinking: bool | None = None
    priority: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None  # None: the checkpoint's default, else 1.0 (off)
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Sequence[int] = ()
    structured: tuple[str, str] | None = None  # ("json_schema", schema text), ("regex", r"..."), ...
    logprobs: int | None = None         # report each token's logprob and the top k
    prompt_logprobs: int | None = None  # report each prompt token's logprob and the top k
    extra: dict = field(default_factory=dict)  # further GenerationConfig fields, e.g. {"ar_mix_weight": 0.5}

    def settings(self) -> Settings:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return Settings(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                        top_k=self.top_k, seed=self.seed, stop=stop, mode=self.mode, block_length=self.block_length,
                        threshold=self.threshold, max_thinking_tokens=self.max_thinking_tokens, suffix=self.suffix,
                        use_lora=self.use_lora, presence_penalty=self.presence_penalty,
                        frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                        logit_bias=self.logit_bias, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
                        stop_token_ids=tuple(self.stop_token_ids), structured=self.structured,
                        logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
                        extra={"priority": self.priority, **self.extra})


@dataclass
class RequestOutput:
    """What one prompt produced."""

    prompt: Prompt
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    forwards: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled"
    stop_string: str | None = None
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed
    block_length: int = 0   # the block length it ran with ("auto" resolved)
    logprobs: list[TokenLogprob] | None = None  # per token (SamplingParams.logprobs)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, the first None

    @property
    def tokens_per_forward(self) -> float:
        return tokens_per_forward(len(self.token_ids), self.forwards)


class GenerationFailed(RuntimeError):
    """The engine could not complete a request (the message says why)."""


class LLM:
    """An engine (or checkpoint) loaded once, serving many requests; see the module docstring."""

    def __init__(self, path: str | Path | None = None, *, device: str = "auto", threads: int | None = None,
                 dtype: str = "auto", max_batch_size: int | None = None, max_seq_len: int | None = None,
                 use_lora: bool = True, verify: bool = False, kv_cache_memory: int | str | None = None,
                 page_size: int | None = None, prefix_caching: bool = True, generation_config: str = "auto") -> None:
        """`kv_cache_memory`: bytes or a size like "4GiB" (default: see the README's KV cache section).
        `generation_config`: "auto" uses the checkpoint's generation_config.json sampling defaults for the
        SamplingParams left at None (temperature, top_p, top_k, repetition_penalty); "none" ignores it."""
        from .runtime.backends.engine_loader import open_engine

        if threads:
            import torch

            torch.set_num_threads(threads)
        if path is None:
            from .demo import demo_model_path

            path = demo_model_path()
            if path is None:
                raise FileNotFoundError("no path given and no demo model is installed")
        self.path = Path(path)
        self.engine = open_engine(self.path, dtype=dtype, use_lora=use_lora, verify=verify,
                                  device=device, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                  kv_cache_memory=kv_cache_memory, page_size=page_size,
                                  prefix_caching=prefix_caching)
        self.frontend = Frontend(self.engine, use_lora=use_lora, generation_config=generation_config)

    # -- lifecycle --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the engine loop (requests still running are cancelled)."""
        self.frontend.stop()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self) -> Any:
        return self.frontend.tokenizer

    # -- requests ---------------------------------------------------------------------------------------------

    def _ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.frontend.encode(prompt)
        return [int(t) for t in prompt]

    def _run(self, prompts: list[Prompt], ids: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        prepared = self.frontend.prepare(ids, params.settings())  # every request checked before any runs
        events: queue.Queue = queue.Queue()
        sinks = [self.frontend.submit(item, lambda event, i=i: events.put((i, event)))
                 for i, item in enumerate(prepared)]
        results: dict[int, Completion] = {}
        try:
            while len(results) < len(prepared):
                index, (kind, value) = events.get()
                if kind == "done":
                    results[index] = value
                elif kind == "error":
                    raise GenerationFailed(value)
        finally:
            for sink in sinks:  # on an error or Ctrl-C the others need not run on
                if not sink.done:
                    sink.cancel()
        return [_output(prompts[i], item, results[i]) for i, item in enumerate(prepared)]

    def generate(self, prompts: Prompt | Iterable[Prompt], params: SamplingParams | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or many (text, or lists of token ids); one output per prompt, in order."""
        params = params or SamplingParams()
        batch = [prompts] if isinstance(prompts, str) or _is_ids(prompts) else list(prompts)
        return self._run(batch, [self._ids(p) for p in batch], params)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None
             ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or several, with the chat template."""
        params = params or SamplingParams()
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [self.frontend.encode_chat(list(c), params.enable_thinking) for c in conversations]
        return self._run([self.frontend.decode(i) for i in ids], ids, params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one prompt as the engine commits them; closing the iterator early cancels it."""
        params = params or SamplingParams()
        item = self.frontend.prepare([self._ids(prompt)], params.settings())[0]
        return self._stream(item)

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None) -> Iterator[str]:
        params = params or SamplingParams()
        item = self.frontend.prepare([self.frontend.encode_chat(messages, params.enable_thinking)],
                                     params.settings())[0]
        return self._stream(item)

    def _stream(self, item: Prepared) -> Iterator[str]:
        events: queue.Queue = queue.Queue()
        sink = self.frontend.submit(item, events.put)
        self.last_stream_result: Completion | None = None
        try:
            while True:
                kind, value = events.get()
                if kind == "text":
                    yield value
                elif kind == "done":
                    self.last_stream_result = value
                    return
                elif kind == "error":
                    raise GenerationFailed(value)
        finally:
            sink.cancel()


def _is_ids(prompt: object) -> bool:
    return isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt) and len(prompt) > 0


def _output(prompt: Prompt, item: Prepared, result: Completion) -> RequestOutput:
    return RequestOutput(prompt, list(item.prompt), result.text, list(result.token_ids), result.forwards,
                         result.finish_reason, result.stop_string, result.cached_tokens, result.block_length,
                         result.logprobs, result.prompt_logprobs)
