"""A generation request: its settings (`GenerationConfig`), the one mapping front ends use to make them, and
the one validation every request passes at submission.

Every front end - the CLI, the Python API, the OpenAI server, Triton - turns what its caller sent into a
`GenerationConfig` with `make_config` (parameters not given take the same defaults everywhere, the block
length included), then into a `Request` with `new_request`, which validates it against the engine once. The
scheduler only accepts `Request`s, so nothing is validated twice and every front end refuses the same requests
with the same words. This module imports nothing heavy (no torch), so the CLI's help stays fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

from .errors import CapacityError, RequestError

MODES = ("ar", "diffusion", "spec", "quad", "infill")
AUTO = "auto"  # block_length for spec and quad: chosen per engine from measured costs and acceptance
MAX_TEMPERATURE = 100.0
GREEDY_BELOW = 1e-5  # a temperature under this is greedy: its distribution is one-hot to float precision
SEED_RANGE = (-(2**63), 2**64)  # what a torch.Generator accepts
MAX_LOGPROBS = 20
STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")
STRUCTURED_MODES = ("ar", "spec", "quad")  # exact there; diffusion and infill commit out of order


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate one request. Every field may differ between the requests of one scheduler step.

    threshold: None means the even-split schedule (diffusion, infill) / one-pass drafts (spec).
    top_p / top_k: nucleus and top-k filtering of the sampling distribution (1.0 / 0: off); greedy ignores them.
    max_thinking_tokens / end_think_token_id: the thinking budget; once that many tokens are generated without
    the end-of-thinking token, it is forced as the next token.
    suffix: infill mode's clean tokens after the hole (the hole is max_new_tokens long).
    ar_mix_weight: quad only; None keeps slot 1 equal to slot 0 (AR-exact), w blends w*slot0 + (1-w)*slot1.
    priority: lower runs first when the engine is full (vLLM's convention); 0 by default.
    presence/frequency_penalty (OpenAI's, over generated tokens), repetition_penalty (CTRL's, over prompt and
    generated tokens), logit_bias ((token, bias) pairs), min_tokens (EOS and stop_token_ids barred before that
    many tokens), ignore_eos, stop_token_ids: see runtime/logits.py; exact in AR, spec and quad.
    structured: a grammar the output must follow, (kind, spec); see runtime/structured.py.
    logprobs / prompt_logprobs: report log-softmax of the raw model logits for each generated (prompt) token
    and the k most likely tokens (k <= MAX_LOGPROBS); None: not reported.
    """

    mode: str = "ar"
    max_new_tokens: int = 64
    block_length: int | str = 32
    threshold: float | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    use_lora: bool = True
    max_thinking_tokens: int | None = None
    end_think_token_id: int | None = None
    suffix: tuple[int, ...] = ()
    ar_mix_weight: float | None = None
    priority: int = 0
    # logits processing (runtime/logits.py): applied to the causal logit of every position a request emits
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    # structured output: (kind, spec) with kind in STRUCTURED_KINDS (runtime/structured.py compiles it)
    structured: tuple[str, str] | None = None
    # log probabilities (of the raw model logits): None off, k >= 0 the chosen token's and the top k
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


CONFIG_FIELDS = tuple(f.name for f in fields(GenerationConfig))


@dataclass(frozen=True)
class RequestDefaults:
    """What a request that does not say gets (a server's --default-mode / --default-max-tokens / --lora)."""

    mode: str = "spec"
    max_new_tokens: int = 64
    use_lora: bool = True
    #: sampling defaults of the checkpoint (its generation_config.json, see `generation_defaults`), as
    #: (field, value) pairs, used where a request leaves the field out
    sampling: tuple[tuple[str, Any], ...] = ()


class ModelShape(Protocol):
    vocab_size: int
    block_size: int


def default_block_length(model: ModelShape) -> int:
    """The block length of a request that gives none: the model's own `block_size` (the one rule)."""
    return int(model.block_size)


def make_config(model: ModelShape, defaults: RequestDefaults = RequestDefaults(), **given: Any) -> GenerationConfig:
    """The one mapping from a front end's parameters (None = not given) to a GenerationConfig.

    `given` uses GenerationConfig's field names. A request with a suffix and no mode is an infill request.
    """
    unknown = sorted(set(given) - set(CONFIG_FIELDS))
    if unknown:
        raise RequestError(f"unknown generation setting(s): {', '.join(unknown)}")
    values = {name: value for name, value in given.items() if value is not None}
    if "suffix" in values:
        values["suffix"] = tuple(values["suffix"])
    values.setdefault("mode", "infill" if values.get("suffix") else defaults.mode)
    values.setdefault("max_new_tokens", defaults.max_new_tokens)
    values.setdefault("use_lora", defaults.use_lora)
    values.setdefault("block_length", default_block_length(model))
    for name, value in defaults.sampling:
        values.setdefault(name, value)
    for name in ("logit_bias", "stop_token_ids"):
        if name in values:
            values[name] = tuple(values[name].items()) if isinstance(values[name], dict) else tuple(values[name])
    if "structured" in values:
        values["structured"] = tuple(values["structured"])
    return GenerationConfig(**values)


#: generation_config.json keys a checkpoint may set defaults for, and the GenerationConfig field of each
GENERATION_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                          "repetition_penalty": "repetition_penalty"}


def generation_defaults(directory: str | Path | None) -> tuple[tuple[str, Any], ...]:
    """The sampling defaults in `directory`/generation_config.json (transformers' file), as vLLM's
    `--generation-config auto` reads them: temperature, top_p, top_k, repetition_penalty. A file that says
    `do_sample: false` asks for greedy decoding, so its temperature is not taken. Nothing when absent."""
    if directory is None:
        return ()
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RequestError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        return ()
    found = []
    for key, name in GENERATION_CONFIG_KEYS.items():
        value = data.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key in ("temperature", "top_p", "top_k") and data.get("do_sample") is False:
            continue
        found.append((name, int(value) if key == "top_k" else float(value)))
    return tuple(found)


def engine_generation_defaults(engine: Any, generation_config: str = "auto") -> tuple[tuple[str, Any], ...]:
    """What `--generation-config` gives every front end: "auto", the sampling defaults of the
    generation_config.json beside the engine's tokenizer (`generation_defaults`); "none", nothing."""
    if generation_config not in ("auto", "none"):
        raise ValueError(f"generation_config must be 'auto' or 'none', got {generation_config!r}")
    path = getattr(engine, "tokenizer_path", None)
    if generation_config == "none" or path is None:
        return ()
    return generation_defaults(Path(path).parent)


@dataclass(frozen=True)
class Request:
    """A validated request: one prompt and its settings. Made only by `new_request`."""

    prompt: tuple[int, ...]
    config: GenerationConfig


def extra_positions(config: GenerationConfig, block_length: int) -> int:
    """Positions beyond prompt + max_new_tokens a request may touch: a verify pass writes (and a quad chunk
    places) a whole block before rolling back; infill's suffix follows the hole."""
    if config.mode == "spec":
        return block_length
    if config.mode == "quad":
        return 2 * block_length
    if config.mode == "infill":
        return len(config.suffix)
    return 0


def widest_row(config: GenerationConfig, block_length: int) -> int:
    """Tokens in the widest non-prefill row this request's mode runs (prefills are chunked to fit any step)."""
    if config.mode == "quad":
        return block_length * (block_length + 1)
    if config.mode == "infill":
        return config.max_new_tokens + len(config.suffix)
    if config.mode in ("spec", "diffusion"):
        return block_length
    return 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


class EngineShape(Protocol):
    """What validation needs of an engine: its model config and its limits."""

    config: Any
    limits: Any


def check_config(engine: EngineShape, config: GenerationConfig) -> None:
    """Raise RequestError naming the first setting the engine cannot serve (prompt-independent checks)."""
    if config.mode not in MODES:
        raise RequestError(f"unknown mode '{config.mode}' (choose {', '.join(MODES)})")
    scoring = config.prompt_logprobs is not None  # scoring a prompt may generate nothing (echo, max_tokens=0)
    if not _is_int(config.max_new_tokens) or config.max_new_tokens < (0 if scoring else 1):
        raise RequestError(f"max_new_tokens must be a positive integer{' or 0' if scoring else ''}, "
                           f"got {config.max_new_tokens!r}")
    if config.block_length == AUTO:
        if config.mode not in ("spec", "quad"):
            raise RequestError(f"block_length 'auto' is for spec and quad modes, not {config.mode}")
    elif not _is_int(config.block_length):
        raise RequestError(f"block_length must be an integer or 'auto', got {config.block_length!r}")
    else:
        least = 2 if config.mode in ("spec", "quad") else 1
        if config.block_length < least:
            raise RequestError(f"block_length must be at least {least}, got {config.block_length}")
        if config.mode != "infill":
            try:
                engine.limits.check_block_length(config.block_length)
            except CapacityError as exc:
                raise RequestError(str(exc)) from None
    if config.mode == "diffusion" and config.max_new_tokens % config.block_length:
        raise RequestError(f"in diffusion mode max_new_tokens ({config.max_new_tokens}) must be a multiple of "
                           f"block_length ({config.block_length})")
    if config.threshold is not None and not (_is_number(config.threshold) and 0.0 <= config.threshold <= 1.0):
        raise RequestError(f"threshold must be within [0, 1], got {config.threshold}")
    if not _is_number(config.temperature) or not 0 <= config.temperature <= MAX_TEMPERATURE:
        raise RequestError(f"temperature must be within [0, {MAX_TEMPERATURE:g}], got {config.temperature}")
    if not _is_number(config.top_p) or not 0.0 < config.top_p <= 1.0:
        raise RequestError(f"top_p must be within (0, 1], got {config.top_p}")
    if not _is_int(config.top_k) or config.top_k < 0:
        raise RequestError(f"top_k must be an integer >= 0 (0: off), got {config.top_k}")
    if not _is_int(config.seed) or not SEED_RANGE[0] <= config.seed < SEED_RANGE[1]:
        raise RequestError(f"seed must be an integer within [-2^63, 2^64), got {config.seed!r}")
    if config.max_thinking_tokens is not None and (not _is_int(config.max_thinking_tokens)
                                                   or config.max_thinking_tokens < 0):
        raise RequestError(f"max_thinking_tokens must be >= 0, got {config.max_thinking_tokens}")
    if config.ar_mix_weight is not None and (config.mode != "quad" or not _is_number(config.ar_mix_weight)
                                             or not 0.0 <= config.ar_mix_weight <= 1.0):
        raise RequestError("ar_mix_weight is a quad-mode weight within [0, 1]")
    if not _is_int(config.priority):
        raise RequestError(f"priority must be an integer, got {config.priority!r}")
    vocab = engine.config.vocab_size
    check_processing(config, vocab)
    if config.mode == "infill" and not config.suffix:
        raise RequestError("infill mode needs a suffix (the text after the hole)")
    if config.mode != "infill" and config.suffix:
        raise RequestError(f"a suffix is only used in infill mode, not {config.mode}")
    for name, ids in (("suffix", config.suffix), ("end_think_token_id", [config.end_think_token_id or 0])):
        bad = [t for t in ids if not _is_int(t) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"{name} has token id {bad[0]} outside the vocabulary [0, {vocab})")


def check_processing(config: GenerationConfig, vocab: int) -> None:
    """The logits-processing, structured-output and logprob settings (runtime/logits.py's rules)."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(config, name)
        if not _is_number(value) or not -2.0 <= value <= 2.0:
            raise RequestError(f"{name} must be within [-2, 2], got {value!r}")
    if not _is_number(config.repetition_penalty) or not 0.0 < config.repetition_penalty <= 100.0:
        raise RequestError(f"repetition_penalty must be within (0, 100], got {config.repetition_penalty!r}")
    if any(len(pair) != 2 for pair in config.logit_bias):
        raise RequestError("logit_bias must be (token id, bias) pairs")
    check_token_ids([token for token, _ in config.logit_bias], vocab, "logit_bias")
    for pair in config.logit_bias:
        if not _is_number(pair[1]) or not -100.0 <= pair[1] <= 100.0:
            raise RequestError(f"logit_bias values must be within [-100, 100], got {pair[1]!r} for token {pair[0]}")
    if not _is_int(config.min_tokens) or config.min_tokens < 0:
        raise RequestError(f"min_tokens must be an integer >= 0, got {config.min_tokens!r}")
    if config.min_tokens > config.max_new_tokens:
        raise RequestError(f"min_tokens ({config.min_tokens}) must not exceed max_tokens ({config.max_new_tokens})")
    if not isinstance(config.ignore_eos, bool):
        raise RequestError(f"ignore_eos must be true or false, got {config.ignore_eos!r}")
    check_token_ids(config.stop_token_ids, vocab, "stop_token_ids")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(config, name)
        if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
            raise RequestError(f"{name} must be an integer within [0, {MAX_LOGPROBS}], got {value!r}")
    if config.structured is not None:
        if (len(config.structured) != 2 or config.structured[0] not in STRUCTURED_KINDS
                or not isinstance(config.structured[1], str)):
            raise RequestError(f"structured output must be one of {', '.join(STRUCTURED_KINDS)} with its spec")
        if config.mode not in STRUCTURED_MODES:
            raise RequestError(f"structured output is supported in modes {', '.join(STRUCTURED_MODES)}, "
                               f"not {config.mode}")
        if config.max_thinking_tokens is not None:
            raise RequestError("structured output cannot be combined with a thinking budget (max_thinking_tokens): "
                               "the forced end-of-thinking token is outside the grammar")


def check_token_ids(ids: list[int] | tuple[int, ...], vocab: int, what: str = "prompt") -> None:
    """RequestError unless every id is an integer in [0, vocab) (checked before anything decodes them)."""
    bad = [t for t in ids if not _is_int(t) or not 0 <= t < vocab]
    if bad:
        shown = bad[0] if not _is_int(bad[0]) or abs(bad[0]) < 10**30 else f"{str(bad[0])[:12]}..."
        raise RequestError(f"{what} has token id {shown} outside the vocabulary [0, {vocab})")


def normalized(config: GenerationConfig) -> GenerationConfig:
    """The config as the engine runs it: a temperature below GREEDY_BELOW is greedy (0). Dividing logits by a
    temperature like 1e-40 overflows to infinity, and the draw it feeds would be argmax anyway."""
    if 0 < config.temperature < GREEDY_BELOW:
        return replace(config, temperature=0.0)
    return config


def longest_block(engine: EngineShape, config: GenerationConfig) -> int:
    """The block length capacity checks allow for: the request's own, or for "auto" the longest it may pick."""
    if config.block_length == AUTO:
        from .scheduler.auto_block import largest_candidate

        return largest_candidate(engine.limits)
    return int(config.block_length)


def new_request(engine: EngineShape, prompt: list[int] | tuple[int, ...], config: GenerationConfig,
                what: str = "prompt") -> Request:
    """Validate one prompt with its settings against the engine; a RequestError names the first problem.

    Positions are checked against the engine's longest sequence: the prompt, `max_new_tokens` and the extra
    positions of the mode (a spec verify writes a whole block before rolling back, a quad chunk places two
    blocks, infill's suffix follows the hole). The widest row of the mode must fit one step.
    """
    check_config(engine, config)
    config = normalized(config)
    if not prompt:
        raise RequestError(f"{what} is empty")
    check_token_ids(prompt, engine.config.vocab_size, what)
    block = longest_block(engine, config)
    extra = extra_positions(config, block)
    need = len(prompt) + config.max_new_tokens + extra
    counted = f"{len(prompt)} prompt + {config.max_new_tokens} new tokens"
    if extra:
        counted += f" + {extra} for the mode's last {'block' if config.mode != 'infill' else 'suffix'}"
    try:
        engine.limits.check_positions(need, f"{what} ({counted})")
        engine.limits.check_row_tokens(widest_row(config, block), f"a {config.mode} row at block length {block}")
    except CapacityError as exc:
        raise RequestError(str(exc)) from None
    return Request(tuple(int(t) for t in prompt), config)


def with_seed_offset(config: GenerationConfig, offset: int) -> GenerationConfig:
    """The config of choice `offset` of an n > 1 request (each choice samples with its own seed)."""
    return replace(config, seed=config.seed + offset) if offset else config
