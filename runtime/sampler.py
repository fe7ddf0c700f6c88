"""Turning one step's logits into every row's tokens, exactly as the reference loops do, on the engine's device.

Each row says how its logits become tokens (a `Pick`): AR sampling at the request's settings, argmax (drafts)
or diffusion's Gumbel-max proposals, optionally with confidences. `decide` does the vocabulary-sized work for
the whole step on the device and copies ONE packed tensor of tokens and confidences to the host - the step's
single device-to-host transfer; the O(block length) logic on those numbers (acceptance, commits, rollback
lengths) then runs in the modes on host integers.

Greedy is argmax. AR sampling is multinomial over softmax(logits / T), optionally restricted to the top-k
tokens and to the smallest set whose probability reaches top-p (renormalised). Diffusion sampling is
Gumbel-max with the noise computed in float64 (`exp(logits) / (-log u) ** T`), and its confidence is the
softmax probability of the chosen token. Every random draw comes from a per-sequence `torch.Generator` on
the engine's device, seeded by the request's seed and consumed only by that sequence, so a sequence's output
depends only on its own seed and path, never on what else shares the step.

A fault belongs to its row alone: logits that are not finite, a sampling distribution that is not (a
temperature too small for the logits, for instance) or an error raised while picking a row marks that row's
`Decided.error` - computed on the device without a synchronisation, and a row whose distribution is bad
samples from a uniform one instead, so no device assertion fires - and every other row of the step is
decided exactly as it would have been alone. The scheduler fails the faulty request and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

SAMPLE = "sample"    # AR sampling at the request's temperature / top-k / top-p (argmax when greedy)
ARGMAX = "argmax"    # always greedy (drafts)
DENOISE = "denoise"  # diffusion proposals (Gumbel-max at the temperature)


@dataclass
class Pick:
    """How a row's logits become tokens. `kinds` gives one kind per logit (None: `kind` for all);
    `confidence` also returns softmax(logits)[token]; `mix` = (w, [(slot0, slot1), ...]) replaces each slot1
    logit (row-local logit indices) by w * slot0 + (1 - w) * slot1 before picking (quad's ar_mix_weight)."""

    kind: str = SAMPLE
    kinds: list[str] | None = None
    confidence: bool = False
    mix: tuple[float, list[tuple[int, int]]] | None = None


@dataclass
class Decided:
    """A row's picks on the host, one entry per requested logit."""

    tokens: np.ndarray      # int64
    confidence: np.ndarray  # float32 (zeros where not asked for)
    error: str | None = None  # why this row's picks are unusable (its request fails, alone)


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
                  top_k: int = 0, top_p: float = 1.0, bad: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits [R, V]: argmax, or a multinomial draw at `temperature` (filtered).

    With `bad` (a bool tensor [R]), rows whose distribution is not finite are flagged in it (in place, on the
    device) and drawn from a uniform distribution instead of raising (or asserting on a GPU)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k > 0 or top_p < 1.0:
        probs = filter_probs(probs, top_k, top_p)
    if bad is not None:
        broken = ~torch.isfinite(probs.sum(-1))
        bad |= broken
        probs = torch.where(broken[:, None], torch.ones_like(probs), probs)
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


class Picking(Protocol):
    """What `decide` needs of a row: how many logits it asked for and how to pick them."""

    pick: Pick

    @property
    def num_logits(self) -> int: ...


class Sampling(Protocol):
    """What `decide` needs of a request: its settings and its random generator."""

    config: Any
    generator: torch.Generator


def decide(logits: torch.Tensor, plans: Sequence[Picking], sequences: Sequence[Sampling]) -> list[Decided]:
    """Per plan, its tokens and confidences for the logits it asked for (in the step's logit order); a row
    whose logits or distribution are not finite, or whose picking raised, gets `error` (see the module
    docstring) and the other rows are unaffected."""
    spans, start = [], 0
    for plan in plans:
        spans.append((start, start + plan.num_logits))
        start = spans[-1][1]
    if start == 0:
        return [Decided(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in plans]
    logits = _mixed(logits, plans, spans)
    tokens = logits.argmax(-1)
    bad = ~torch.isfinite(logits.sum(-1, dtype=torch.float32))  # NaN or inf anywhere in a logit's row
    confidence = torch.zeros(start, dtype=torch.float32, device=logits.device)
    raised: dict[int, str] = {}
    for row, (plan, seq, (a, b)) in enumerate(zip(plans, sequences, spans, strict=True)):
        if a == b:
            continue
        try:
            _pick_row(logits, tokens, confidence, bad, plan, seq, a, b)
        except Exception as exc:  # this row alone; the others are decided as usual
            raised[row] = f"{type(exc).__name__}: {exc}"
    packed = torch.stack([tokens.double(), confidence.double(), bad.double()])
    host = np.array(packed.tolist())  # the step's one transfer
    decided = []
    for row, (a, b) in enumerate(spans):
        error = raised.get(row)
        if error is None and host[2, a:b].any():
            error = "the model's output for this request is not finite (NaN or infinite logits or probabilities)"
        decided.append(Decided(host[0, a:b].astype(np.int64), host[1, a:b].astype(np.float32), error))
    return decided


def _pick_row(logits: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor, bad: torch.Tensor,
              plan: Picking, seq: Sampling, a: int, b: int) -> None:
    """One row's picks into tokens[a:b] / confidence[a:b] (argmax is already there); faults into bad[a:b]."""
    config = seq.config
    kinds = plan.pick.kinds or [plan.pick.kind] * (b - a)
    if config.temperature > 0:
        for kind in (SAMPLE, DENOISE):
            index = [a + i for i, k in enumerate(kinds) if k == kind]
            if not index:
                continue
            whole = len(index) == b - a
            where = slice(a, b) if whole else torch.tensor(index, device=logits.device)
            flags = torch.zeros(len(index), dtype=torch.bool, device=logits.device)
            if kind == SAMPLE:
                chosen = sample_tokens(logits[where], config.temperature, seq.generator, config.top_k,
                                       config.top_p, flags)
            else:
                chosen = denoise_tokens(logits[where], config.temperature, seq.generator, config.top_k,
                                        config.top_p)
            tokens[where] = chosen
            bad[where] |= flags
    if plan.pick.confidence:
        confidence[a:b] = confidence_of(logits[a:b], tokens[a:b])


def _mixed(logits: torch.Tensor, plans: Sequence[Picking], spans: list[tuple[int, int]]) -> torch.Tensor:
    """Quad's ar_mix_weight: slot 1 logits replaced by w * slot 0 + (1 - w) * slot 1 (a copy, only if asked)."""
    if not any(p.pick.mix for p in plans):
        return logits
    logits = logits.clone()
    for plan, (a, _) in zip(plans, spans, strict=True):
        if plan.pick.mix is None:
            continue
        weight, pairs = plan.pick.mix
        slot0 = torch.tensor([a + i for i, _ in pairs], device=logits.device)
        slot1 = torch.tensor([a + j for _, j in pairs], device=logits.device)
        logits[slot1] = weight * logits[slot0] + (1 - weight) * logits[slot1]
    return logits
