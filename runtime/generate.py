"""The generation modes behind one call, written once against the step kinds of any backend.

`generate(engine, prompts, config)` runs a batch of prompts (of different lengths) in AR, diffusion or
self-speculation mode and returns, per prompt, the generated tokens (cut after EOS), the forwards it took
(prompt prefill included) and its tokens per forward. `validate_request` turns every bad argument into one
clear `RequestError` before any work is done.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .backends.torch_engine import StepEngine
from .modes.ar import run_ar
from .modes.diffusion import run_diffusion
from .modes.sequence import CancelCheck, SequenceResult, TokenCallback, make_sequences
from .modes.spec import run_spec

MODES = ("ar", "diffusion", "spec", "quad", "infill")
AUTO = "auto"  # block_length for spec and quad: chosen by the scheduler from measured costs and acceptance


class RequestError(ValueError):
    """A generation request that cannot be served as asked (bad argument, too long, too large)."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate one request. Every field may differ between the requests of one scheduler step.

    threshold: None means the even-split schedule (diffusion, infill) / one-pass drafts (spec).
    top_p / top_k: nucleus and top-k filtering of the sampling distribution (1.0 / 0: off); greedy ignores them.
    max_thinking_tokens / end_think_token_id: the thinking budget; once that many tokens are generated without
    the end-of-thinking token, it is forced as the next token.
    suffix: infill mode's clean tokens after the hole (the hole is max_new_tokens long).
    ar_mix_weight: quad only; None keeps slot 1 equal to slot 0 (AR-exact), w blends w*slot0 + (1-w)*slot1.
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

    def to_dict(self) -> dict:
        return asdict(self)


def required_length(prompt_length: int, config: GenerationConfig) -> int:
    """Cache positions a request may touch: a verify pass writes a whole block before rolling back."""
    extra = config.block_length if config.mode == "spec" else 0
    return prompt_length + config.max_new_tokens + extra


def validate_request(engine: StepEngine, prompts: list[list[int]], config: GenerationConfig) -> None:
    """Raise RequestError naming the first problem with this request."""
    if config.mode not in MODES:
        raise RequestError(f"unknown mode '{config.mode}' (choose ar, diffusion or spec)")
    if config.max_new_tokens <= 0:
        raise RequestError(f"max_new_tokens must be positive, got {config.max_new_tokens}")
    if config.block_length < 1 or (config.mode == "spec" and config.block_length < 2):
        raise RequestError(f"block_length must be at least {2 if config.mode == 'spec' else 1}, "
                           f"got {config.block_length}")
    if config.mode == "diffusion" and config.max_new_tokens % config.block_length:
        raise RequestError(f"in diffusion mode max_new_tokens ({config.max_new_tokens}) must be a multiple of "
                           f"block_length ({config.block_length})")
    if config.threshold is not None and not 0.0 <= config.threshold <= 1.0:
        raise RequestError(f"threshold must be within [0, 1], got {config.threshold}")
    if config.temperature < 0:
        raise RequestError(f"temperature must be >= 0, got {config.temperature}")
    if not prompts:
        raise RequestError("no prompt given")
    if len(prompts) > engine.max_batch_size:
        raise RequestError(f"batch of {len(prompts)} prompts exceeds the engine's maximum batch size "
                           f"{engine.max_batch_size}")
    vocab = engine.config.vocab_size
    for number, prompt in enumerate(prompts):
        if not prompt:
            raise RequestError(f"prompt {number} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt {number} has token id {bad[0]} outside the vocabulary [0, {vocab})")
        need = required_length(len(prompt), config)
        if need > engine.max_seq_len:
            raise RequestError(f"prompt {number} ({len(prompt)} tokens) plus {config.max_new_tokens} new tokens"
                               f"{' and a draft block' if config.mode == 'spec' else ''} needs {need} positions, "
                               f"beyond the engine's maximum sequence length {engine.max_seq_len}")


def generate(engine: StepEngine, prompts: list[list[int]], config: GenerationConfig,
             on_tokens: TokenCallback | None = None, is_cancelled: CancelCheck | None = None
             ) -> list[SequenceResult]:
    """Run one batch to completion; `on_tokens(i, ids)` streams committed tokens of prompt i in order."""
    validate_request(engine, prompts, config)
    cache = engine.new_cache(len(prompts))
    sequences = make_sequences(prompts, config.max_new_tokens, engine.config.eos_token_id, config.seed)
    if config.mode == "ar":
        run_ar(engine, cache, sequences, config.temperature, on_tokens, is_cancelled)
    elif config.mode == "diffusion":
        run_diffusion(engine, cache, sequences, config.block_length, config.threshold, config.temperature,
                      on_tokens, is_cancelled)
    else:
        run_spec(engine, cache, sequences, config.block_length, config.threshold, config.temperature,
                 config.use_lora, on_tokens, is_cancelled)
    return [s.result() for s in sequences]
