"""The mode factory: the state machine of one request's mode, from its (validated) settings."""

from __future__ import annotations

from ...builder.config import ModelConfig
from ..request import GenerationConfig
from .ar import ARMode
from .base import ModeState
from .diffusion import DiffusionMode
from .infill import InfillMode
from .quad import QuadMode
from .spec import RoundCallback, SpecMode


def make_mode(model: ModelConfig, config: GenerationConfig, block_length: int, has_lora: bool,
              on_round: RoundCallback | None = None) -> ModeState:
    """`block_length` is the request's, already resolved (an "auto" choice is made by the scheduler)."""
    if config.mode == "ar":
        return ARMode()
    if config.mode == "diffusion":
        # with ignore_eos an EOS does not end a block early: it is an ordinary token
        eos = None if config.ignore_eos else model.eos_token_id
        return DiffusionMode(block_length, model.mask_token_id, eos, config.threshold)
    if config.mode == "infill":
        return InfillMode(config.max_new_tokens, list(config.suffix), model.mask_token_id, config.threshold)
    if config.mode == "spec":
        return SpecMode(block_length, model.mask_token_id, config.threshold, config.use_lora and has_lora, on_round)
    if config.mode == "quad":
        return QuadMode(block_length, model.mask_token_id, config.ar_mix_weight, on_round)
    raise ValueError(f"unknown mode {config.mode!r}")
