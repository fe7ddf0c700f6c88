"""Linear self-speculation: draft a block bidirectionally, verify it causally, keep the agreeing prefix + 1.

Greedy output is AR's exactly: every emitted token is the causal model's choice given the tokens before it,
because a draft token is only kept while it equals that choice. With temperature > 0 the verify pass samples
each position from the causal distribution and a draft is kept while it equals the sample, which is again
exactly AR sampling. The cache is rolled back per sequence by moving its length; nothing is copied.
"""

from __future__ import annotations

import torch

from ..backends.torch_engine import StepEngine
from ..model.kv_cache import KVCache
from .ar import prefill_first_tokens
from .sampling import pick_tokens
from .sequence import CancelCheck, Sequence, TokenCallback, still_running


def fill_draft(block: torch.Tensor, logits: torch.Tensor, mask_id: int, threshold: float | None) -> None:
    """One draft pass: every mask takes its argmax (threshold 0), or only confident ones (at least one)."""
    masked = block == mask_id
    x0 = logits.argmax(-1).cpu()
    if not threshold:
        block[masked] = x0[masked]
        return
    confidence = torch.softmax(logits.float().cpu(), dim=-1).gather(-1, x0[:, None])[:, 0]
    select = masked & (confidence >= threshold)
    if not bool(select.any()):
        best = torch.where(masked, confidence, torch.tensor(-1.0)).argmax()
        select[int(best)] = True
    block[select] = x0[select]


def accepted_length(block: torch.Tensor, verified: torch.Tensor) -> int:
    """c = length of the longest run with verified[i] == block[i + 1]."""
    agree = (verified[:-1] == block[1:]).int()
    return int(agree.cumprod(0).sum())


def run_spec(engine: StepEngine, cache: KVCache, sequences: list[Sequence], block_length: int,
             threshold: float | None, temperature: float, use_lora: bool, on_tokens: TokenCallback | None,
             is_cancelled: CancelCheck | None) -> None:
    mask_id, length = engine.config.mask_token_id, block_length
    lora = use_lora and engine.has_lora
    prefill_first_tokens(engine, cache, sequences, temperature, on_tokens)
    while True:
        running = still_running(sequences, is_cancelled)
        if not running:
            return
        blocks = {s.index: torch.full((length,), mask_id, dtype=torch.long) for s in running}
        for seq in running:
            blocks[seq.index][0] = seq.tokens[-1]
        drafting, passes = list(running), 0
        while drafting and passes < length:  # bounded: a predicted mask id keeps its slot masked
            logits = engine.draft(cache, [s.slot for s in drafting],
                                  torch.stack([blocks[s.index] for s in drafting]), lora=lora)
            for row, seq in enumerate(drafting):
                seq.forwards += 1
                fill_draft(blocks[seq.index], logits[row], mask_id, threshold)
            passes += 1
            drafting = [s for s in drafting if bool((blocks[s.index] == mask_id).any())]
        old_lens = [cache.length(s.slot) for s in running]
        logits = engine.verify(cache, [s.slot for s in running], torch.stack([blocks[s.index] for s in running]))
        for row, seq in enumerate(running):
            seq.forwards += 1
            verified = pick_tokens(logits[row], temperature, seq.generator).cpu()
            accepted = accepted_length(blocks[seq.index], verified)
            seq.emit(verified[: accepted + 1].tolist(), on_tokens)
            cache.rollback([seq.slot], [old_lens[row] + accepted + 1])
