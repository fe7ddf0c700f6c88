"""A request's settings, their validation, and `generate()`: several requests submitted together.

`generate(engine, prompts, config)` submits every prompt to a `Scheduler` (runtime/scheduler/) and steps it
until all are done; each returns its generated tokens (cut after EOS), the forwards it took (prompt prefill
counted once) and its tokens per forward. `validate_request` turns every bad argument into one clear
`RequestError` before any work is done - the scheduler calls it for every submission, so the CLI, the
Python API, Triton and the OpenAI server refuse the same requests with the same words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .backends.limits import CapacityError
from .backends.step import StepEngine
from .modes.ar import ARMode
from .modes.base import ModeState
from .modes.diffusion import DiffusionMode
from .modes.infill import InfillMode
from .modes.quad import QuadMode
from .modes.sampling import make_generator
from .modes.sequence import CancelCheck, Sequence, SequenceResult, TokenCallback
from .modes.spec import SpecMode
from .scheduler.scheduler import Scheduler, shared_scheduler

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


def resolved_block_length(engine: StepEngine, config: GenerationConfig) -> int:
    """The block length a request runs with ("auto": the scheduler's choice, see runtime/scheduler/auto_block.py)."""
    if config.block_length == AUTO:
        from .scheduler.auto_block import choose_block_length

        return choose_block_length(engine, config.mode)
    return int(config.block_length)


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


def validate_request(engine: StepEngine, prompts: list[list[int]], config: GenerationConfig) -> None:
    """Raise RequestError naming the first problem with this request."""
    if config.mode not in MODES:
        raise RequestError(f"unknown mode '{config.mode}' (choose {', '.join(MODES)})")
    if isinstance(config.max_new_tokens, bool) or not isinstance(config.max_new_tokens, int) \
            or config.max_new_tokens <= 0:
        raise RequestError(f"max_new_tokens must be a positive integer, got {config.max_new_tokens!r}")
    if config.block_length == AUTO:
        if config.mode not in ("spec", "quad"):
            raise RequestError(f"block_length 'auto' is for spec and quad modes, not {config.mode}")
    elif isinstance(config.block_length, bool) or not isinstance(config.block_length, int):
        raise RequestError(f"block_length must be an integer or 'auto', got {config.block_length!r}")
    else:
        least = 2 if config.mode in ("spec", "quad") else 1
        if config.block_length < least:
            raise RequestError(f"block_length must be at least {least}, got {config.block_length}")
        try:
            if config.mode != "infill":
                engine.limits.check_block_length(config.block_length)
        except CapacityError as exc:
            raise RequestError(str(exc)) from None
    if config.mode == "diffusion" and config.max_new_tokens % config.block_length:
        raise RequestError(f"in diffusion mode max_new_tokens ({config.max_new_tokens}) must be a multiple of "
                           f"block_length ({config.block_length})")
    if config.threshold is not None and not 0.0 <= config.threshold <= 1.0:
        raise RequestError(f"threshold must be within [0, 1], got {config.threshold}")
    if config.temperature < 0:
        raise RequestError(f"temperature must be >= 0, got {config.temperature}")
    if not 0.0 < config.top_p <= 1.0:
        raise RequestError(f"top_p must be within (0, 1], got {config.top_p}")
    if config.top_k < 0:
        raise RequestError(f"top_k must be >= 0 (0: off), got {config.top_k}")
    if config.max_thinking_tokens is not None and config.max_thinking_tokens < 0:
        raise RequestError(f"max_thinking_tokens must be >= 0, got {config.max_thinking_tokens}")
    if config.ar_mix_weight is not None and (config.mode != "quad" or not 0.0 <= config.ar_mix_weight <= 1.0):
        raise RequestError("ar_mix_weight is a quad-mode weight within [0, 1]")
    vocab = engine.config.vocab_size
    if config.mode == "infill" and not config.suffix:
        raise RequestError("infill mode needs a suffix (the text after the hole)")
    if config.mode != "infill" and config.suffix:
        raise RequestError(f"a suffix is only used in infill mode, not {config.mode}")
    for name, ids in (("suffix", config.suffix), ("end_think_token_id", [config.end_think_token_id or 0])):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"{name} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    if not prompts:
        raise RequestError("no prompt given")
    try:
        engine.limits.check_batch(len(prompts))
    except CapacityError as exc:
        raise RequestError(str(exc)) from None
    if config.block_length == AUTO:
        from .scheduler.auto_block import largest_candidate

        block = largest_candidate(engine)  # the choice is made at submission; allow for the longest
    else:
        block = int(config.block_length)
    for number, prompt in enumerate(prompts):
        if not prompt:
            raise RequestError(f"prompt {number} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt {number} has token id {bad[0]} outside the vocabulary [0, {vocab})")
        need = len(prompt) + config.max_new_tokens + extra_positions(config, block)
        try:
            engine.limits.check_positions(need, f"prompt {number} ({len(prompt)} tokens) plus "
                                                f"{config.max_new_tokens} new tokens")
        except CapacityError as exc:
            raise RequestError(str(exc)) from None


def make_mode(engine: StepEngine, config: GenerationConfig) -> ModeState:
    """The state machine of one request's mode."""
    c = engine.config
    if config.mode == "ar":
        return ARMode()
    if config.mode == "diffusion":
        return DiffusionMode(int(config.block_length), c.mask_token_id, c.eos_token_id, config.threshold)
    if config.mode == "infill":
        return InfillMode(config.max_new_tokens, list(config.suffix), c.mask_token_id, config.threshold)
    from .scheduler.auto_block import stats_for

    block = resolved_block_length(engine, config)
    on_round = stats_for(engine).record_round
    if config.mode == "spec":
        return SpecMode(block, c.mask_token_id, config.threshold, config.use_lora and engine.has_lora, on_round)
    return QuadMode(block, c.mask_token_id, config.ar_mix_weight, on_round)


def make_sequence(engine: StepEngine, prompt: list[int], config: GenerationConfig, index: int) -> Sequence:
    return Sequence(index, list(prompt), config, engine.config.eos_token_id,
                    make_generator(config.seed, engine.device), make_mode(engine, config))


def generate(engine: StepEngine, prompts: list[list[int]], config: GenerationConfig | list[GenerationConfig],
             on_tokens: TokenCallback | None = None, is_cancelled: CancelCheck | None = None,
             scheduler: Scheduler | None = None) -> list[SequenceResult]:
    """Run requests together to completion; `on_tokens(i, ids)` streams committed tokens of prompt i in order.

    `config` may be one config for all prompts or one per prompt (any mix of modes and settings).
    """
    configs = config if isinstance(config, list) else [config] * len(prompts)
    if len(configs) != len(prompts):
        raise RequestError(f"{len(configs)} configs for {len(prompts)} prompts")
    for prompt, cfg in zip(prompts, configs, strict=True):
        validate_request(engine, [prompt], cfg)
    if not prompts:
        raise RequestError("no prompt given")
    engine.limits.check_batch(len(prompts))
    scheduler = scheduler or shared_scheduler(engine, len(prompts))
    sequences = [scheduler.submit(p, cfg, on_tokens, is_cancelled, index=i)
                 for i, (p, cfg) in enumerate(zip(prompts, configs, strict=True))]
    while not all(s.done for s in sequences):
        scheduler.step()
    return [s.result() for s in sequences]
