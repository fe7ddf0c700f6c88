"""The family's joint training objective: AR loss on a clean copy + masked block-diffusion loss on a noised copy.

One forward carries both streams, concatenated to length 2N with positions 0..N-1 each. The clean stream is
causal. Noised block b sees itself bidirectionally and the clean tokens of blocks before it - exactly what
it sees at inference time, where earlier blocks sit in the KV cache as causally computed K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def joint_attention_mask(length: int, block: int) -> torch.Tensor:
    """allowed[i, j] for the [clean ; noised] sequence of 2 * length tokens."""
    idx = torch.arange(length)
    blocks = idx // block
    clean_clean = idx[None, :] <= idx[:, None]
    noised_clean = blocks[None, :] < blocks[:, None]
    noised_noised = blocks[None, :] == blocks[:, None]
    top = torch.cat([clean_clean, torch.zeros(length, length, dtype=torch.bool)], dim=1)
    bottom = torch.cat([noised_clean, noised_noised], dim=1)
    return torch.cat([top, bottom], dim=0)


def noise_blocks(tokens: torch.Tensor, block: int, mask_id: int, generator: torch.Generator,
                 eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block a ratio t ~ U(eps, 1); each token masked with probability t. Returns (noised, masked, t)."""
    batch, length = tokens.shape
    ratio = eps + (1 - eps) * torch.rand(batch, length // block, generator=generator)
    per_token = ratio.repeat_interleave(block, dim=1)
    masked = torch.rand(batch, length, generator=generator) < per_token
    return torch.where(masked, torch.full_like(tokens, mask_id), tokens), masked, per_token


def joint_loss(model, tokens: torch.Tensor, block: int, mask_id: int, generator: torch.Generator,
               allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ar, diffusion). Diffusion CE at masked slots predicts the token AT the slot.

    The diffusion term is the plain mean over masked slots. The 1/t weighting of the ELBO was tried first: at
    batch 8 on CPU its variance (weights up to 1/eps) dominated the clipped gradient and AR learning stalled
    near the unigram loss, so the recipe uses the unweighted mean (as several block-diffusion recipes do).
    """
    batch, length = tokens.shape
    noised, masked, ratio = noise_blocks(tokens, block, mask_id, generator)
    positions = torch.arange(length).repeat(batch, 2)
    logits = model.forward_masked(torch.cat([tokens, noised], dim=1), positions, allowed.expand(batch, -1, -1))
    vocab = logits.shape[-1]
    ar = F.cross_entropy(logits[:, : length - 1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    per_slot = F.cross_entropy(logits[:, length:].reshape(-1, vocab), tokens.reshape(-1), reduction="none")
    weights = masked.reshape(-1).float()
    diffusion = (per_slot * weights).sum() / weights.sum().clamp(min=1)
    return ar + diffusion, ar, diffusion
