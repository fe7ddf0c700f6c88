"""Turning one step's logits into every row's tokens on the device, with ONE transfer to the host.

The vocabulary-sized work - argmax, softmax confidences, sampling (per-sequence generators, top-k/top-p),
diffusion's Gumbel-max - happens on the engine's device for the whole step. What the host needs is one
token (and one confidence) per requested logit, packed into a single float64 tensor and copied once; the
O(block length) logic on those numbers (acceptance, commits, rollback lengths) then runs in the modes on
host integers, which costs no device round trip.
"""

from __future__ import annotations

import numpy as np
import torch

from ..modes.base import ARGMAX, DENOISE, SAMPLE, Decided, RowPlan
from ..modes.sampling import confidence_of, denoise_tokens, sample_tokens
from ..modes.sequence import Sequence


def decide(logits: torch.Tensor, plans: list[RowPlan], sequences: list[Sequence]) -> list[Decided]:
    """Per plan, its tokens and confidences for the logits it asked for (in the step's logit order)."""
    spans, start = [], 0
    for plan in plans:
        spans.append((start, start + len(plan.row.logit_offsets)))
        start = spans[-1][1]
    if start == 0:
        return [Decided(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in plans]
    logits = _mixed(logits, plans, spans)
    tokens = logits.argmax(-1)
    confidence = torch.zeros(start, dtype=torch.float32, device=logits.device)
    for plan, seq, (a, b) in zip(plans, sequences, spans, strict=True):
        if a == b:
            continue
        config = seq.config
        kinds = plan.pick.kinds or [plan.pick.kind] * (b - a)
        if config.temperature > 0:
            for kind in (SAMPLE, DENOISE):
                index = [a + i for i, k in enumerate(kinds) if k == kind]
                if not index:
                    continue
                rows = logits[a:b] if len(index) == b - a else logits[torch.tensor(index, device=logits.device)]
                pick = sample_tokens if kind == SAMPLE else denoise_tokens
                chosen = pick(rows, config.temperature, seq.generator, config.top_k, config.top_p)
                if len(index) == b - a:
                    tokens[a:b] = chosen
                else:
                    tokens[torch.tensor(index, device=logits.device)] = chosen
        if plan.pick.confidence:
            confidence[a:b] = confidence_of(logits[a:b], tokens[a:b])
    host = np.array(torch.stack([tokens.double(), confidence.double()]).tolist())  # the step's one transfer
    return [Decided(host[0, a:b].astype(np.int64), host[1, a:b].astype(np.float32)) for a, b in spans]


def _mixed(logits: torch.Tensor, plans: list[RowPlan], spans: list[tuple[int, int]]) -> torch.Tensor:
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


__all__ = ["decide", "ARGMAX", "SAMPLE", "DENOISE"]
