"""Choosing tokens from logits, exactly as the reference loops do.

Greedy is argmax. AR sampling is multinomial over softmax(logits / T). Diffusion sampling is Gumbel-max with
the noise computed in float64 (`exp(logits) / (-log u) ** T`), and its confidence is the softmax probability
of the chosen token. Every random draw comes from a per-sequence generator, so a sequence's output depends
only on its own seed and its own path, never on what else shares the batch.
"""

from __future__ import annotations

import torch


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pick_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits [..., V]: argmax, or a multinomial draw at `temperature`."""
    if temperature <= 0:
        return logits.argmax(-1)
    flat = logits.reshape(-1, logits.shape[-1]).float().cpu()
    probs = torch.softmax(flat / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1]).to(logits.device)


def denoise_candidates(logits: torch.Tensor, temperature: float, generator: torch.Generator | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion proposal x0 [T] and its confidence [T] from one block's logits [T, V]."""
    logits = logits.float().cpu()
    if temperature > 0:
        noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
        scored = logits.double().exp() / (-torch.log(noise)) ** temperature
    else:
        scored = logits
    x0 = scored.argmax(-1)
    confidence = torch.softmax(logits, dim=-1).gather(-1, x0[:, None])[:, 0]
    return x0, confidence
