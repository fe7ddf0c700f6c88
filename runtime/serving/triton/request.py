"""Turning the input tensors of one Triton request into a prompt and a `GenerationConfig`.

Kept free of `triton_python_backend_utils` (plain numpy in, dataclass out) so every rule is testable without a
server. Triton itself already rejects tensors whose dtype or rank contradict config.pbtxt; the checks here
repeat them (a hand-edited config must not turn into a traceback) and add what Triton cannot know: exactly one
prompt input, a known mode, ids inside the vocabulary, a prompt that fits the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ...backends.step import StepEngine
from ...errors import RequestError
from ...request import AUTO, Request, RequestDefaults, make_config, new_request

INPUT_NAMES = ("text_input", "input_ids", "max_tokens", "mode", "block_length", "threshold", "temperature", "seed",
               "stream", "top_p", "top_k", "suffix_text", "suffix_ids", "priority")


@dataclass(frozen=True)
class ParsedRequest:
    """One request, validated and ready for the scheduler loop."""

    request: Request
    stream: bool


def _scalar(inputs: Mapping[str, np.ndarray | None], name: str, kind: str) -> object | None:
    """The single value of an optional input, checked against its kind (int, float, bool, str)."""
    array = inputs.get(name)
    if array is None:
        return None
    if array.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if kind == "str":
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"input '{name}' is not valid UTF-8") from None
        if isinstance(value, str):
            return value
        raise RequestError(f"input '{name}' must be BYTES (a string), got {array.dtype}")
    if kind == "bool":
        if array.dtype != np.bool_:
            raise RequestError(f"input '{name}' must be BOOL, got {array.dtype}")
        return bool(value)
    if kind == "int":
        if not np.issubdtype(array.dtype, np.integer):
            raise RequestError(f"input '{name}' must be an integer, got {array.dtype}")
        return int(value)
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise RequestError(f"input '{name}' must be a number, got {array.dtype}")
    number = float(value)
    if not np.isfinite(number):
        raise RequestError(f"input '{name}' must be finite, got {number}")
    return number


def _tokens(inputs: Mapping[str, np.ndarray | None], encode: Callable[[str], list[int]] | None,
            text_name: str = "text_input", ids_name: str = "input_ids", required: bool = True) -> list[int]:
    """A token list given as text (encoded) or as ids, never both."""
    text = inputs.get(text_name)
    ids = inputs.get(ids_name)
    if text is None and ids is None:
        if not required:
            return []
        raise RequestError(f"missing input: give {text_name} (BYTES) or {ids_name} (INT32)")
    if text is not None and ids is not None:
        raise RequestError(f"give {text_name} or {ids_name}, not both")
    if ids is not None:
        if not np.issubdtype(ids.dtype, np.integer):
            raise RequestError(f"input '{ids_name}' must be INT32 token ids, got {ids.dtype}")
        if ids.ndim != 1:
            raise RequestError(f"input '{ids_name}' must be one-dimensional [num_tokens], got shape "
                               f"{list(ids.shape)}")
        return [int(t) for t in ids]
    value = _scalar(inputs, text_name, "str")
    if encode is None:
        raise RequestError(f"{text_name} needs a tokenizer, and this engine has none (send {ids_name})")
    return list(encode(str(value)))


def parse_request(inputs: Mapping[str, np.ndarray | None], engine: StepEngine, *, default_mode: str = "spec",
                  default_max_tokens: int = 64, use_lora: bool = True, allow_stream: bool = True,
                  encode: Callable[[str], list[int]] | None = None, sampling: tuple = ()) -> ParsedRequest:
    """Read and validate one request; every problem is a `RequestError` whose message the client sees.
    `sampling`: the checkpoint's defaults for what the request leaves out (`generation_defaults`)."""
    prompt = _tokens(inputs, encode)
    suffix = _tokens(inputs, encode, "suffix_text", "suffix_ids", required=False)
    mode = _scalar(inputs, "mode", "str")
    max_tokens = _scalar(inputs, "max_tokens", "int")
    block_length = _scalar(inputs, "block_length", "int")
    seed = _scalar(inputs, "seed", "int")
    temperature = _scalar(inputs, "temperature", "float")
    threshold = _scalar(inputs, "threshold", "float")
    stream = bool(_scalar(inputs, "stream", "bool") or False)
    top_p = _scalar(inputs, "top_p", "float")
    top_k = _scalar(inputs, "top_k", "int")
    priority = _scalar(inputs, "priority", "int")
    if max_tokens is not None and max_tokens <= 0:  # type: ignore[operator]
        raise RequestError(f"max_tokens must be positive, got {max_tokens}")
    if stream and not allow_stream:
        raise RequestError("stream=true needs the decoupled model (this one answers with a single response)")
    config = make_config(
        engine.config, RequestDefaults(default_mode, default_max_tokens, use_lora, sampling),
        mode=str(mode).strip().lower() if mode is not None else None,
        max_new_tokens=max_tokens,
        block_length=AUTO if block_length == 0 else block_length,
        threshold=threshold, temperature=temperature, seed=seed, top_p=top_p, top_k=top_k,
        suffix=tuple(suffix) or None, priority=priority)
    return ParsedRequest(new_request(engine, prompt, config), stream)
