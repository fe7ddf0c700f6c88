"""Choosing tokens from logits, exactly as the reference loops do, on the engine's device.

Greedy is argmax. AR sampling is multinomial over softmax(logits / T), optionally restricted to the top-k
tokens and to the smallest set whose probability reaches top-p (renormalised). Diffusion sampling is
Gumbel-max with the noise computed in float64 (`exp(logits) / (-log u) ** T`), and its confidence is the
softmax probability of the chosen token. Every random draw comes from a per-sequence `torch.Generator` on
the engine's device, seeded by the request's seed and consumed only by that sequence, so a sequence's output
depends only on its own seed and path, never on what else shares the step.
"""

from __future__ import annotations

import torch


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero every probability outside the top-k and the top-p nucleus (rows [..., V]); renormalised."""
    if top_k > 0 and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        ordered, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # mass strictly above each token
        keep_sorted = before < top_p * ordered.sum(-1, keepdim=True)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum(-1, keepdim=True)


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
                  top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row of logits [R, V]: argmax, or a multinomial draw at `temperature` (filtered)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k > 0 or top_p < 1.0:
        probs = filter_probs(probs, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def denoise_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
                   top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Diffusion proposals x0 [R] from logits [R, V]: argmax, or float64 Gumbel-max at `temperature`."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
    scored = logits.double().exp() / (-torch.log(noise)) ** temperature
    if top_k > 0 or top_p < 1.0:
        keep = filter_probs(torch.softmax(logits, dim=-1), top_k, top_p) > 0
        scored = torch.where(keep, scored, torch.zeros_like(scored))
    return scored.argmax(-1)


def confidence_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[token] per row, fp32."""
    return torch.softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])[:, 0]
