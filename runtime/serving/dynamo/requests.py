"""Dynamo's token-in/token-out request in trimode's terms, and trimode's results as Dynamo chunks.

Dynamo's frontend tokenizes (its chat template included), and hands the worker a `PreprocessedRequest`:
`token_ids`, `sampling_options`, `stop_conditions` and `output_options`. They become the `Settings` every
trimode front end fills (runtime/serving/frontend.py), so the one mapping (`Frontend.config`, then
`make_config`) decides defaults and validation. The frontend itself applies stop strings and hides hidden
stop tokens (it detokenizes); a request it stops is cancelled here through its context.

The mode is the served model's (NAME is the engine's default mode, NAME:ar, NAME:spec, ... one mode each);
block length and threshold are the worker's flags (the frontend refuses fields it does not know).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ...errors import RequestError
from ...modes.sequence import TokenLogprob
from ..frontend import Settings

#: what a served model name may end with, and the mode it serves (NAME alone: the engine's default mode)
MODE_SUFFIXES = ("ar", "spec", "quad", "diffusion")

#: trimode's finish reasons as Dynamo's (its Rust FinishReason: eos, stop, length, cancelled, error)
FINISH_REASONS = {"eos": "eos", "stop": "stop", "length": "length", "cancelled": "cancelled", "error": "error"}


def served_models(name: str, modes: Iterable[str] = MODE_SUFFIXES) -> list[tuple[str, str | None]]:
    """(served model name, mode) pairs of one worker: NAME in the default mode (None), then NAME:mode."""
    return [(name, None)] + [(f"{name}:{mode}", mode) for mode in modes]


def _given(options: dict, key: str) -> Any:
    value = options.get(key)
    return None if value is None else value


def _structured(guided: Any) -> tuple[str, str] | None:
    """Dynamo's guided_decoding ({json | regex | choice | grammar}) as trimode's (kind, spec)."""
    if not isinstance(guided, dict):
        return None
    given = {key: value for key, value in guided.items() if value is not None and key != "backend"}
    if not given:
        return None
    if len(given) > 1:
        raise RequestError(f"guided decoding takes one constraint at a time, got {', '.join(sorted(given))}")
    (key, value), = given.items()
    if key == "json":
        if isinstance(value, dict) and value in ({"type": "object"}, {}):
            return ("json_object", "")
        return ("json_schema", value if isinstance(value, str) else json.dumps(value))
    if key == "regex":
        return ("regex", str(value))
    if key == "choice":
        return ("choice", json.dumps([str(c) for c in value]))
    if key == "grammar":
        return ("grammar", str(value))
    raise RequestError(f"guided decoding '{key}' is not supported by trimode (json, regex, choice, grammar)")


def request_settings(request: dict, mode: str | None, eos_token_ids: Sequence[int] = (),
                     block_length: int | str | None = None, threshold: float | None = None) -> Settings:
    """The `Settings` of one Dynamo request served as `mode` (None: the engine's default).

    `eos_token_ids`: the engine's own end-of-sequence tokens, which the engine stops at itself (ignore_eos
    included); the frontend's other hidden stop tokens become stop_token_ids.
    """
    sampling = request.get("sampling_options") or {}
    stop = request.get("stop_conditions") or {}
    output = request.get("output_options") or {}
    for key in ("n", "best_of"):
        if (sampling.get(key) or 1) != 1:
            raise RequestError(f"{key} > 1 is not supported by the trimode Dynamo worker (send one request per "
                               "choice)")
    if sampling.get("use_beam_search"):
        raise RequestError("beam search is not supported by trimode")
    if sampling.get("min_p"):
        raise RequestError("min_p is not supported by trimode (use top_p / top_k)")
    if output.get("prompt_logprobs") is not None:
        raise RequestError("prompt_logprobs are not supported by the trimode Dynamo worker")
    top_k = _given(sampling, "top_k")
    if top_k is not None and top_k < 0:  # vLLM's -1: off
        top_k = 0
    eos = {int(t) for t in eos_token_ids}
    stop_ids: list[int] = []
    for key in ("stop_token_ids", "stop_token_ids_visible", "stop_token_ids_hidden"):
        for token in stop.get(key) or ():
            if int(token) not in eos and int(token) not in stop_ids:
                stop_ids.append(int(token))
    seed = _given(sampling, "seed")
    return Settings(max_tokens=_given(stop, "max_tokens"), temperature=_given(sampling, "temperature"),
                    top_p=_given(sampling, "top_p"), top_k=top_k, seed=0 if seed is None else int(seed),
                    mode=mode, block_length=block_length, threshold=threshold,
                    max_thinking_tokens=_given(stop, "max_thinking_tokens"),
                    presence_penalty=_given(sampling, "presence_penalty"),
                    frequency_penalty=_given(sampling, "frequency_penalty"),
                    repetition_penalty=_given(sampling, "repetition_penalty"),
                    min_tokens=_given(stop, "min_tokens"), ignore_eos=_given(stop, "ignore_eos"),
                    stop_token_ids=tuple(stop_ids) or None,
                    structured=_structured(sampling.get("guided_decoding")),
                    logprobs=_given(output, "logprobs"))


def token_chunk(ids: Sequence[int], logprobs: Sequence[TokenLogprob] | None = None,
                decode: Callable[[list[int]], str] | None = None) -> dict:
    """One streamed chunk: the tokens just committed (and their logprobs when asked for)."""
    chunk: dict[str, Any] = {"token_ids": [int(t) for t in ids], "index": 0}
    if logprobs is not None:
        chunk["log_probs"] = [float(entry.logprob) for entry in logprobs]
        chunk["top_logprobs"] = [
            [{"rank": rank, "token_id": int(token), "token": decode([int(token)]) if decode else None,
              "logprob": float(value)} for rank, (token, value) in enumerate(entry.top, start=1)]
            for entry in logprobs]
    return chunk


def final_chunk(finish_reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """The last chunk: finish reason and usage (cached prompt tokens included)."""
    return {"token_ids": [], "index": 0, "finish_reason": FINISH_REASONS.get(finish_reason, finish_reason),
            "completion_usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens,
                                 "prompt_tokens_details": {"cached_tokens": cached_tokens}}}
