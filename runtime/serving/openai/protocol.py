"""The OpenAI request bodies the server accepts, checked strictly, and the errors it answers with.

Every field the server does not know is refused (OpenAI's own API refuses unknown parameters too), and every
field it knows is type-checked without coercion (`"5"` is not a number, `true` is not an integer). OpenAI's
fields: `logprobs` (completions: 0..20; chat: true, with `top_logprobs` 0..20), `echo` (with `max_tokens: 0`:
score the prompt only), `presence_penalty`, `frequency_penalty`, `logit_bias` (token id strings -> [-100, 100]),
`response_format` (`text`, `json_object`, `json_schema`), `stream_options` (`include_usage`,
`continuous_usage_stats`). Extension fields: `mode` (ar, diffusion, spec, quad, infill), `block_length` (int or
"auto"), `threshold`, `top_k`, `priority` (lower runs first when the engine is full, as vLLM's),
`enable_thinking` and `max_thinking_tokens` (chat), and vLLM's `repetition_penalty`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and
`structured_outputs` ({json | regex | choice | grammar | json_object}), documented in examples/openai/README.md.
Engine errors name the engine's fields; `api_error` rewrites them with the API's names (one place).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ..http_limits import BodyError, load_json

MAX_STOP_STRINGS = 16
MAX_N = 16
MAX_LOGPROBS = 20  # = runtime.request.MAX_LOGPROBS (OpenAI's limit too)


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

#: the engine's names for request settings (in RequestError messages) -> the API's, the one place they map
ENGINE_TO_API = {"max_new_tokens": "max_tokens", "prompt_logprobs": "logprobs",
                 "end_think_token_id": "max_thinking_tokens"}
#: API fields an engine message may concern, most specific first: the first one it names is the error's param
_PARAMS = ("min_tokens", "logit_bias", "stop_token_ids", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "max_thinking_tokens", "max_tokens", "temperature", "top_p", "top_k", "seed",
           "block_length", "threshold", "suffix", "priority", "logprobs", "structured output", "mode", "prompt",
           "messages")
_PARAM_OF = {"structured output": "response_format"}
_ENGINE_WORDS = re.compile(r"\b(" + "|".join(ENGINE_TO_API) + r")\b")


def api_error(message: str, status: int = 400, fields: dict[str, str] | None = None) -> APIError:
    """An engine error (RequestError's message) as the client's APIError: the engine's setting names become
    the API's (`max_new_tokens` -> `max_tokens`; `fields` adds per-endpoint ones, e.g. chat's
    `max_completion_tokens`), and `param` is the first API field the message names."""
    names = {**ENGINE_TO_API, **(fields or {})}
    words = _ENGINE_WORDS if not fields else re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    text = words.sub(lambda m: names[m.group(1)], message)
    param = None
    for name in (*(fields or {}).values(), *_PARAMS):
        if re.search(r"\b" + re.escape(name) + r"\b", text):
            param = _PARAM_OF.get(name, name)
            break
    return APIError(text, status, param=param)



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's: usage (so far) on every chunk, with include_usage


class JsonSchema(_Strict):
    """`response_format.json_schema`: OpenAI's wrapper around the schema itself."""

    name: StrictStr
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` (one of them)."""

    json_: dict[str, Any] | StrictStr | None = Field(default=None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None


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
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions
    repetition_penalty: Number | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[StrictInt] | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    structured_outputs: StructuredOutputs | None = None
    # trimode's extensions
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


class FunctionDefinition(_Strict):
    """A tool's function (OpenAI's shape); `parameters` is a JSON Schema object (checked in openai/tools.py)."""

    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: StrictStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Strict):
    name: StrictStr
    arguments: StrictStr


class ToolCall(_Strict):
    id: StrictStr
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None   # assistant messages (openai/tools.py checks the roles)
    tool_call_id: StrictStr | None = None      # tool messages

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
    # tools (openai/tools.py)
    tools: list[Tool] | None = Field(default=None, min_length=1)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered with the chat template."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False
    enable_thinking: StrictBool | None = None


class DetokenizeRequest(_Strict):
    model: StrictStr | None = None
    tokens: list[StrictInt]


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
    """The checked, engine-neutral settings of one request (before the GenerationConfig is made). None: the
    request did not say (the engine's default; temperature, top_p, top_k and repetition_penalty: the
    checkpoint's generation_config.json, else greedy / off)."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int
    stop: tuple[str, ...]
    n: int
    mode: str | None
    block_length: int | str | None
    threshold: float | None
    max_thinking_tokens: int | None
    priority: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: tuple[int, ...] | None = None
    structured: tuple[str, str] | None = None  # (kind, spec), see runtime/structured.py
    logprobs: int | None = None          # the top k reported with each generated token (None: no logprobs)
    prompt_logprobs: int | None = None   # the same for each prompt token (completions' echo)


def _unsupported(name: str, value: object, neutral: tuple = (None,)) -> None:
    if value not in neutral:
        raise APIError(f"'{name}' is not supported by this server", param=name)


def _number(request: Any, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = getattr(request, name)
    if value is None:
        return None
    value = float(value)
    inside = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not inside:
        raise APIError(f"{name} must be within {'(' if low_open else '['}{low:g}, {high:g}], got {value}",
                       param=name)
    return value


_TOKEN_ID = re.compile(r"-?[0-9]{1,12}")


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids as strings -> a bias in [-100, 100] (the vocabulary is checked by the
    engine)."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not _TOKEN_ID.fullmatch(key.strip()):
            raise APIError(f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                           param="logit_bias")
        value = float(value)
        if not (math.isfinite(value) and -100.0 <= value <= 100.0):
            raise APIError(f"logit_bias values must be within [-100, 100], got {value} for token {key}",
                           param="logit_bias")
        out[int(key)] = value
    return out


def _json_text(value: dict | str, param: str) -> str:
    """A JSON schema given as an object or as JSON text, as JSON text (checked to be a JSON object)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise APIError(f"{param} is not valid JSON: {exc}", param=param) from None
        if not isinstance(parsed, dict):
            raise APIError(f"{param} must be a JSON schema (an object)", param=param)
        return value
    return json.dumps(value, ensure_ascii=False)


def _choice(choices: list[str], param: str) -> tuple[str, str]:
    if not choices:
        raise APIError(f"{param} must list at least one choice", param=param)
    return "choice", json.dumps(choices, ensure_ascii=False)


def _nonempty(value: str, param: str) -> str:
    if not value:
        raise APIError(f"{param} must not be empty", param=param)
    return value


def structured(request: _Sampling) -> tuple[str, str] | None:
    """The one output constraint of a request, (kind, spec), from `response_format` or vLLM's extensions
    (`guided_*`, `structured_outputs`); None when there is none. Two of them at once are a 400."""
    found: list[tuple[str, tuple[str, str]]] = []
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", ("json_object", "")))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError("response_format of type json_schema needs json_schema.schema",
                           param="response_format.json_schema")
        found.append(("response_format", ("json_schema", _json_text(fmt.json_schema.schema_, "response_format"))))
    if request.guided_json is not None:
        found.append(("guided_json", ("json_schema", _json_text(request.guided_json, "guided_json"))))
    if request.guided_regex is not None:
        found.append(("guided_regex", ("regex", _nonempty(request.guided_regex, "guided_regex"))))
    if request.guided_choice is not None:
        found.append(("guided_choice", _choice(request.guided_choice, "guided_choice")))
    if request.guided_grammar is not None:
        found.append(("guided_grammar", ("grammar", _nonempty(request.guided_grammar, "guided_grammar"))))
    so = request.structured_outputs
    if so is not None:
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(so, name) is not None]
        given += ["json_object"] if so.json_object else []
        if len(given) != 1:
            raise APIError("structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                           param="structured_outputs")
        name = given[0]
        if name == "json_":
            found.append(("structured_outputs", ("json_schema", _json_text(so.json_, "structured_outputs.json"))))
        elif name == "choice":
            found.append(("structured_outputs", _choice(so.choice, "structured_outputs.choice")))
        elif name == "json_object":
            found.append(("structured_outputs", ("json_object", "")))
        else:
            found.append(("structured_outputs",
                          (name, _nonempty(getattr(so, name), f"structured_outputs.{name}"))))
    if len(found) > 1:
        raise APIError(f"give one output constraint, not {' and '.join(name for name, _ in found)}",
                       param=found[1][0])
    return found[0][1] if found else None


def check_sampling(request: _Sampling, max_tokens: int | None, least_tokens: int = 1) -> Sampling:
    """Range checks of the shared fields; the engine checks the rest (lengths, vocabulary, mode rules)."""
    if max_tokens is not None and max_tokens < least_tokens:
        raise APIError(f"max_tokens must be at least 1{' (or 0 with echo)' if least_tokens == 0 else ''}, got "
                       f"{max_tokens}", param="max_tokens")
    # unset: the checkpoint's generation_config.json, else greedy (unlike OpenAI's 1.0; documented)
    temperature = _number(request, "temperature", 0.0, 2.0)
    top_p = _number(request, "top_p", 0.0, 1.0, low_open=True)
    top_k = None if request.top_k is None else 0 if request.top_k == -1 else request.top_k
    if top_k is not None and top_k < 0:
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
    if isinstance(request.block_length, str) and request.block_length != "auto":
        raise APIError(f"block_length must be an integer or \"auto\", got '{request.block_length}'",
                       param="block_length")
    threshold = _number(request, "threshold", 0.0, 1.0)
    if request.max_thinking_tokens is not None and request.max_thinking_tokens < 0:
        raise APIError(f"max_thinking_tokens must be >= 0, got {request.max_thinking_tokens}",
                       param="max_thinking_tokens")
    if request.min_tokens is not None and request.min_tokens < 0:
        raise APIError(f"min_tokens must be >= 0, got {request.min_tokens}", param="min_tokens")
    stop_ids = None if request.stop_token_ids is None else tuple(request.stop_token_ids)
    if stop_ids and any(not 0 <= t < 2**63 for t in stop_ids):
        bad = next(t for t in stop_ids if not 0 <= t < 2**63)
        raise APIError(f"stop_token_ids has token id {bad} outside the vocabulary", param="stop_token_ids")
    mode = request.mode.strip().lower() if request.mode is not None else None
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                    stop=tuple(stops), n=request.n, mode=mode, block_length=request.block_length,
                    threshold=threshold, max_thinking_tokens=request.max_thinking_tokens,
                    priority=request.priority,
                    presence_penalty=_number(request, "presence_penalty", -2.0, 2.0),
                    frequency_penalty=_number(request, "frequency_penalty", -2.0, 2.0),
                    repetition_penalty=_number(request, "repetition_penalty", 0.0, 100.0, low_open=True),
                    logit_bias=_logit_bias(request.logit_bias), min_tokens=request.min_tokens,
                    ignore_eos=request.ignore_eos, stop_token_ids=stop_ids, structured=structured(request))


def _logprobs_count(value: int | None, name: str) -> int | None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise APIError(f"{name} must be within [0, {MAX_LOGPROBS}], got {value}", param=name)
    return value


def check_completion(request: CompletionRequest) -> Sampling:
    """A completion's settings. `logprobs: k` reports each token's logprob and the k most likely; `echo`
    puts the prompt in front of the text (and, with logprobs, the prompt tokens' logprobs in front of the
    output's: the first one null); `max_tokens: 0` needs echo and only scores the prompt."""
    _unsupported("best_of", request.best_of, (None, 1))
    logprobs = _logprobs_count(request.logprobs, "logprobs")
    sampling = check_sampling(request, request.max_tokens, least_tokens=0 if request.echo else 1)
    if request.suffix is not None and sampling.mode not in (None, "infill"):
        raise APIError(f"'suffix' needs mode 'infill', got mode '{sampling.mode}'", param="suffix")
    if request.echo and request.stream:
        raise APIError("'echo' is not supported together with 'stream'", param="echo")
    prompt = request.prompt
    if isinstance(prompt, list) and not prompt:
        raise APIError("prompt must not be an empty list", param="prompt")
    if request.echo and request.suffix is not None:
        raise APIError("'echo' is not supported together with 'suffix'", param="echo")
    prompt_logprobs = None
    if request.echo and (logprobs is not None or sampling.max_tokens == 0):
        prompt_logprobs = 0 if logprobs is None else logprobs  # max_tokens 0 scores the prompt: the engine's rule
    return replace(sampling, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def check_chat(request: ChatRequest) -> Sampling:
    top_logprobs = _logprobs_count(request.top_logprobs, "top_logprobs")
    if top_logprobs is not None and not request.logprobs:
        raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise APIError("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    sampling = check_sampling(request, limit)
    return replace(sampling, logprobs=(top_logprobs or 0) if request.logprobs else None)


def prompt_list(prompt: str | list) -> list[str | list[int]]:
    """A completion request's `prompt` as a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)
