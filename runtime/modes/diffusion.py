"""Diffusion mode: blocks of masked tokens denoised in parallel, causal across blocks (DESIGN.md section 3).

Per block: `[seed, MASK x (L-1)]`; bidirectional passes (reading the cache, never writing it) propose x0 and
commit the most confident masked slots - by threshold, or an even split of the masked count over L steps
with the remainder front-loaded. Then one causal pass over the finished block writes its exact K/V and its
last logit seeds the next block (skipped after the last block: nothing follows it).
"""

from __future__ import annotations

import torch

from ..backends.torch_engine import StepEngine
from ..model.kv_cache import KVCache
from .sampling import denoise_candidates
from .sequence import CancelCheck, Sequence, TokenCallback, prefill_all, still_running


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """How many slots each step commits: `masked` split evenly over `steps`, remainder front-loaded."""
    base, extra = divmod(masked, steps)
    return [base + 1 if i < extra else base for i in range(steps)]


def block_finished(block: torch.Tensor, mask_id: int, eos_id: int) -> bool:
    """No mask left, or an EOS placed with no mask before it (later slots would be cut anyway)."""
    masked = block == mask_id
    if not bool(masked.any()):
        return True
    eos_at = (block == eos_id).nonzero()
    return bool(eos_at.numel()) and not bool(masked[: int(eos_at[0])].any())


def commit_step(block: torch.Tensor, x0: torch.Tensor, confidence: torch.Tensor, mask_id: int,
                threshold: float | None, count: int) -> None:
    """Write the chosen proposals into the block in place (a slot given the mask id stays masked)."""
    masked = block == mask_id
    confidence = torch.where(masked, confidence.double(), torch.tensor(float("-inf"), dtype=torch.float64))
    if threshold is None:
        chosen = torch.topk(confidence, min(count, int(masked.sum()))).indices
        select = torch.zeros_like(masked)
        select[chosen] = True
    else:
        select = masked & (confidence >= threshold)
        select[int(confidence.argmax())] = True
    block[select] = x0[select]


def run_diffusion(engine: StepEngine, cache: KVCache, sequences: list[Sequence], block_length: int,
                  threshold: float | None, temperature: float, on_tokens: TokenCallback | None,
                  is_cancelled: CancelCheck | None) -> None:
    mask_id, eos_id = engine.config.mask_token_id, engine.config.eos_token_id
    length = block_length
    logits = prefill_all(engine, cache, sequences)
    seeds: dict[int, int] = {}
    for row, seq in enumerate(sequences):
        seeds[seq.index] = int(denoise_candidates(logits[row : row + 1], temperature, seq.generator)[0][0])
    num_blocks = sequences[0].max_new_tokens // length
    for block_number in range(num_blocks):
        running = still_running(sequences, is_cancelled)
        if not running:
            return
        blocks = {s.index: torch.full((length,), mask_id, dtype=torch.long) for s in running}
        for seq in running:
            blocks[seq.index][0] = seeds[seq.index]
        schedules = {s.index: transfer_schedule(int((blocks[s.index] == mask_id).sum()), length) for s in running}
        steps = dict.fromkeys(blocks, 0)
        denoising = [s for s in running if not block_finished(blocks[s.index], mask_id, eos_id)]
        while denoising:
            logits = engine.draft(cache, [s.slot for s in denoising], torch.stack([blocks[s.index] for s in denoising]))
            for row, seq in enumerate(denoising):
                seq.forwards += 1
                x0, confidence = denoise_candidates(logits[row], temperature, seq.generator)
                step = steps[seq.index]
                commit_step(blocks[seq.index], x0, confidence, mask_id, threshold, schedules[seq.index][step])
                steps[seq.index] = step + 1
            denoising = [s for s in denoising
                         if not block_finished(blocks[s.index], mask_id, eos_id) and steps[s.index] < length]
        for seq in running:
            seq.emit(blocks[seq.index].tolist(), on_tokens)
        continuing = [s for s in running if not s.done]
        if continuing and block_number + 1 < num_blocks:
            logits = engine.verify(cache, [s.slot for s in continuing],
                                   torch.stack([blocks[s.index] for s in continuing]))
            for row, seq in enumerate(continuing):
                seq.forwards += 1
                last = logits[row, -1:]
                seeds[seq.index] = int(denoise_candidates(last, temperature, seq.generator)[0][0])
