"""The OpenAI request bodies the server accepts, checked strictly, and the errors it answers with.

Every field the server does not know is refused (OpenAI's own API refuses unknown parameters too), every field
it knows is type-checked without coercion (`"5"` is not a number, `true` is not an integer), and fields the
engine cannot honour (log probabilities, penalties, tools) are refused by name rather than silently ignored.
Extension fields: `mode` (ar, diffusion, spec, quad, infill), `block_length` (int or "auto"), `threshold`,
`top_k`, `priority` (lower runs first when the engine is full, as vLLM's), `enable_thinking` and
`max_thinking_tokens` (chat), documented in examples/openai/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ..http_limits import BodyError, load_json

MAX_STOP_STRINGS = 16
MAX_N = 16


class APIError(Exception):
    """An error the client sees as OpenAI's error object, `{"error": {...}}`, with an HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.kind = kind
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


Number = StrictFloat | StrictInt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # accepted only at their neutral values (clients send them by default)
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    # extensions
    mode: StrictStr | None = None
    block_length: StrictInt | StrictStr | None = None
    threshold: Number | None = None
    max_thinking_tokens: StrictInt | None = None
    priority: StrictInt | None = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    suffix: StrictStr | None = None
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    enable_thinking: StrictBool | None = None


def _describe(error: ValidationError) -> tuple[str, str | None]:
    """One line for the first problem pydantic found, and the parameter it concerns."""
    first = error.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    # unions report each alternative as a location part; keep the path the user wrote
    path = [p for p in loc if not any(c in p for c in "[]()") and p not in {"str", "int", "float", "list"}]
    param = ".".join(path) or None
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if first.get("type") == "missing":
        return f"missing required parameter: '{param}'", param
    return f"invalid value for '{param}': {first.get('msg', 'invalid')}", param


def parse_body(raw: bytes, model_class: type[_Strict]) -> Any:
    """Raw request bytes -> the validated request model, or APIError (400) naming the problem (the size limit
    is applied while reading, see runtime/serving/http_limits.py)."""
    try:
        data = load_json(raw)
    except BodyError as exc:
        raise APIError(exc.message, exc.status) from None
    if not isinstance(data, dict):
        raise APIError("request body must be a JSON object")
    try:
        return model_class.model_validate(data)
    except ValidationError as exc:
        message, param = _describe(exc)
        raise APIError(message, param=param) from None


@dataclass(frozen=True)
class Sampling:
    """The checked, engine-neutral sampling settings of one request (before the GenerationConfig is made)."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    n: int
    mode: str | None
    block_length: int | str | None
    threshold: float | None
    max_thinking_tokens: int | None
    priority: int | None = None


def _unsupported(name: str, value: object, neutral: tuple = (None,)) -> None:
    if value not in neutral:
        raise APIError(f"'{name}' is not supported by this server", param=name)


def check_sampling(request: _Sampling, max_tokens: int | None) -> Sampling:
    """Range checks of the shared fields; the engine checks the rest (lengths, vocabulary, mode rules)."""
    if max_tokens is not None and max_tokens < 1:
        raise APIError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    # unlike OpenAI's 1.0, the default is greedy, like `trimode generate` (documented)
    temperature = 0.0 if request.temperature is None else float(request.temperature)
    if not 0.0 <= temperature <= 2.0:
        raise APIError(f"temperature must be within [0, 2], got {temperature}", param="temperature")
    top_p = 1.0 if request.top_p is None else float(request.top_p)
    if not 0.0 < top_p <= 1.0:
        raise APIError(f"top_p must be within (0, 1], got {top_p}", param="top_p")
    top_k = 0 if request.top_k is None or request.top_k == -1 else request.top_k
    if top_k < 0:
        raise APIError(f"top_k must be >= 0 (or -1 for off), got {request.top_k}", param="top_k")
    seed = 0 if request.seed is None else request.seed
    if not 0 <= seed < 2**63:
        raise APIError(f"seed must be within [0, 2^63), got {seed}", param="seed")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
    if any(s == "" for s in stops):
        raise APIError("stop strings must not be empty", param="stop")
    if not 1 <= request.n <= MAX_N:
        raise APIError(f"n must be within [1, {MAX_N}], got {request.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(name, getattr(request, name), (None, 0, 0.0))
    _unsupported("logit_bias", request.logit_bias, (None, {}))
    if isinstance(request.block_length, str) and request.block_length != "auto":
        raise APIError(f"block_length must be an integer or \"auto\", got '{request.block_length}'",
                       param="block_length")
    threshold = None if request.threshold is None else float(request.threshold)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise APIError(f"threshold must be within [0, 1], got {threshold}", param="threshold")
    if request.max_thinking_tokens is not None and request.max_thinking_tokens < 0:
        raise APIError(f"max_thinking_tokens must be >= 0, got {request.max_thinking_tokens}",
                       param="max_thinking_tokens")
    mode = request.mode.strip().lower() if request.mode is not None else None
    return Sampling(max_tokens, temperature, top_p, top_k, seed, tuple(stops), request.n, mode,
                    request.block_length, threshold, request.max_thinking_tokens, request.priority)


def check_completion(request: CompletionRequest) -> Sampling:
    _unsupported("logprobs", request.logprobs, (None, 0))
    _unsupported("best_of", request.best_of, (None, 1))
    sampling = check_sampling(request, request.max_tokens)
    if request.suffix is not None and sampling.mode not in (None, "infill"):
        raise APIError(f"'suffix' needs mode 'infill', got mode '{sampling.mode}'", param="suffix")
    if request.echo and request.stream:
        raise APIError("'echo' is not supported together with 'stream'", param="echo")
    prompt = request.prompt
    if isinstance(prompt, list) and not prompt:
        raise APIError("prompt must not be an empty list", param="prompt")
    return sampling


def check_chat(request: ChatRequest) -> Sampling:
    _unsupported("logprobs", request.logprobs, (None, False))
    _unsupported("top_logprobs", request.top_logprobs, (None, 0))
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise APIError("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return check_sampling(request, limit)


def prompt_list(prompt: str | list) -> list[str | list[int]]:
    """A completion request's `prompt` as a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)
