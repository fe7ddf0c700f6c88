"""Turning one step's logits into every row's tokens, exactly as the reference loops do, on the engine's device.

Each row says how its logits become tokens (a `Pick`): AR sampling at the request's settings, argmax (drafts)
or diffusion's Gumbel-max proposals, optionally with confidences. `decide` does the vocabulary-sized work for
the whole step on the device and copies ONE packed tensor of tokens and confidences to the host - the step's
single device-to-host transfer; the O(block length) logic on those numbers (acceptance, commits, rollback
lengths) then runs in the modes on host integers.

Greedy is argmax. AR sampling is multinomial over softmax(logits / T), optionally restricted to the top-k
tokens and to the smallest set whose probability reaches top-p (renormalised). Diffusion sampling is
Gumbel-max with the noise computed in float64 (`exp(logits) / (-log u) ** T`), and its confidence is the
softmax probability of the chosen token. Every random draw is the request's own: an AR draw (AR, and the
verify positions of spec and quad) comes from a generator seeded by (the request's seed, the output
position it decides), so seeded spec and quad give AR's tokens exactly; diffusion draws come from a
per-sequence `torch.Generator` seeded by the request's seed. A sequence's output depends only on its own
seed and path, never on what else shares the step.

Before the picks, a request's logits processing (penalties, logit bias, min_tokens, structured output:
runtime/logits.py) applies to the logits it names; log-probabilities (when asked for) are computed from the
raw logits and travel in the same single transfer.

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

from .logits import Context, process_logits, processes
from .modes.sequence import TokenLogprob

SAMPLE = "sample"    # AR sampling at the request's temperature / top-k / top-p (argmax when greedy)
ARGMAX = "argmax"    # always greedy (drafts)
DENOISE = "denoise"  # diffusion proposals (Gumbel-max at the temperature)


@dataclass
class Pick:
    """How a row's logits become tokens. `kinds` gives one kind per logit (None: `kind` for all);
    `confidence` also returns softmax(logits)[token]; `mix` = (w, [(slot0, slot1), ...]) replaces each slot1
    logit (row-local logit indices) by w * slot0 + (1 - w) * slot1 before picking (quad's ar_mix_weight).
    `contexts`: per logit, what it follows for the request's logits processing (runtime/logits.py), None for
    a logit that is not processed; when not given, every logit that is not ARGMAX (a draft) follows the
    request's generated tokens and nothing more. `chains` (drafts that follow each other): groups of logit
    indices in which each logit follows the group's first context plus the argmax picks of the logits before
    it in the group."""

    kind: str = SAMPLE
    kinds: list[str] | None = None
    confidence: bool = False
    mix: tuple[float, list[tuple[int, int]]] | None = None
    contexts: list[Context | None] | None = None
    chains: list[list[int]] | None = None


@dataclass
class Decided:
    """A row's picks on the host, one entry per requested logit. With logprobs asked for, `logprob` holds
    each pick's log-probability under the raw logits and `top` the most likely (token, logprob) pairs."""

    tokens: np.ndarray      # int64
    confidence: np.ndarray  # float32 (zeros where not asked for)
    error: str | None = None  # why this row's picks are unusable (its request fails, alone)
    logprob: np.ndarray | None = None  # float64 [n]
    top: list[tuple[tuple[int, float], ...]] | None = None

    def entry(self, i: int) -> TokenLogprob | None:
        """The logprob record of pick i (None when none were computed; a token emitted in place of the pick,
        forced by a rule, is recorded by `Sequence.emit`)."""
        return None if self.logprob is None else self.scored(i, int(self.tokens[i]))

    def scored(self, i: int, token: int) -> TokenLogprob:
        """The logprob record of logit i for `token` (its pick, or the prompt token a scoring logit scores:
        `logprob` holds the target's log-probability either way)."""
        return TokenLogprob(int(token), float(self.logprob[i]), self.top[i] if self.top is not None else ())

    def tail(self, start: int) -> Decided:
        """The picks from `start` on (a row's leading prompt-scoring logits split off)."""
        return Decided(self.tokens[start:], self.confidence[start:], self.error,
                       None if self.logprob is None else self.logprob[start:],
                       None if self.top is None else self.top[start:])


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """The seed of output position `position`'s AR draw: a splitmix64 mix of (seed, position), in [0, 2^64)."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def position_generator(seed: int, position: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one AR draw. Keyed by the output position, not by the order of draws, so a verify pass
    that samples position g draws exactly what AR draws at g: seeded spec and quad equal seeded AR token for
    token (a rejected round's draws at later positions are simply drawn again with the right context)."""
    return make_generator(position_seed(seed, position), device)


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
    """What `decide` needs of a row: how many logits it asked for, how to pick them, and the target tokens of
    its leading prompt-scoring logits (`scores`: their logprobs are reported for those tokens; they are
    picked by argmax and never processed)."""

    pick: Pick
    scores: list[int]

    @property
    def num_logits(self) -> int: ...


class Sampling(Protocol):
    """What `decide` needs of a request: its settings, its random generator, and for logits processing its
    prompt, generated tokens, EOS id and grammar constraint (runtime/logits.py)."""

    config: Any
    generator: torch.Generator
    constraint: Any


def decide(logits: torch.Tensor, plans: Sequence[Picking], sequences: Sequence[Sampling]) -> list[Decided]:
    """Per plan, its tokens and confidences for the logits it asked for (in the step's logit order); a row
    whose logits or distribution are not finite, or whose picking raised, gets `error` (see the module
    docstring) and the other rows are unaffected. Requests' logits processing applies before the picks;
    logprobs (raw logits) are computed for rows that ask; everything comes to the host in one transfer."""
    spans, start = [], 0
    for plan in plans:
        spans.append((start, start + plan.num_logits))
        start = spans[-1][1]
    if start == 0:
        return [Decided(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in plans]
    raw = _mixed(logits, plans, spans)
    bad = ~torch.isfinite(raw.sum(-1, dtype=torch.float32))  # NaN or inf anywhere in a logit's row
    raised: dict[int, str] = {}
    work = raw
    for row, (plan, seq, (a, b)) in enumerate(zip(plans, sequences, spans, strict=True)):
        if a == b or not processes(seq.config):
            continue
        try:
            work = _process_row(raw, work, bad, plan, seq, a)
        except Exception as exc:  # this row alone; the others are decided as usual
            raised[row] = f"{type(exc).__name__}: {exc}"
    tokens = work.argmax(-1)
    confidence = torch.zeros(start, dtype=torch.float32, device=logits.device)
    for row, (plan, seq, (a, b)) in enumerate(zip(plans, sequences, spans, strict=True)):
        if a == b or row in raised:
            continue
        try:
            _pick_row(work, tokens, confidence, bad, plan, seq, a + len(plan.scores), b)
        except Exception as exc:  # this row alone; the others are decided as usual
            raised[row] = f"{type(exc).__name__}: {exc}"
    parts = [tokens.double(), confidence.double(), bad.double()]
    wanted = _logprob_parts(raw, tokens, plans, sequences, spans, parts)
    host = np.array(torch.cat(parts).tolist())  # the step's one transfer
    table = host[: 3 * start].reshape(3, start)
    decided = []
    for row, (a, b) in enumerate(spans):
        error = raised.get(row)
        if error is None and table[2, a:b].any():
            error = ("the model's output for this request is not finite (NaN or infinite logits or probabilities), "
                     "or its options allow no token (a grammar that only allows EOS while min_tokens bars it)")
        item = Decided(table[0, a:b].astype(np.int64), table[1, a:b].astype(np.float32), error)
        if row in wanted:
            at, k = wanted[row]
            n = b - a
            item.logprob = host[at : at + n]
            ids = host[at + n : at + n + n * k].reshape(n, k).astype(np.int64)
            values = host[at + n + n * k : at + n + 2 * n * k].reshape(n, k)
            item.top = [tuple((int(t), float(v)) for t, v in zip(ids[i], values[i], strict=True)) for i in range(n)]
        decided.append(item)
    return decided


def logprob_width(plan: Picking, config: Any) -> int | None:
    """How many top logprobs a row reports (None: no logprobs for it)."""
    generated = config.logprobs
    prompt = config.prompt_logprobs if plan.scores else None
    if generated is None and prompt is None:
        return None
    return max(generated or 0, prompt or 0)


def _logprob_parts(raw: torch.Tensor, tokens: torch.Tensor, plans: Sequence[Picking], sequences: Sequence[Sampling],
                   spans: list[tuple[int, int]], parts: list[torch.Tensor]) -> dict[int, tuple[int, int]]:
    """Append each asking row's logprobs (its picks', or for scoring logits their targets') and top-k ids and
    values to `parts`; returns row -> (offset in the packed transfer, k)."""
    wanted: dict[int, tuple[int, int]] = {}
    offset = sum(p.numel() for p in parts)
    for row, (plan, seq, (a, b)) in enumerate(zip(plans, sequences, spans, strict=True)):
        k = logprob_width(plan, seq.config) if a < b else None
        if k is None:
            continue
        logprobs = torch.log_softmax(raw[a:b].float(), dim=-1)
        chosen = tokens[a:b].clone()
        if plan.scores:
            chosen[: len(plan.scores)] = torch.tensor(plan.scores, dtype=chosen.dtype, device=chosen.device)
        picked = logprobs.gather(-1, chosen[:, None])[:, 0]
        top = torch.topk(logprobs, k, dim=-1)
        parts += [picked.double(), top.indices.double().flatten(), top.values.double().flatten()]
        wanted[row] = (offset, k)
        offset += (b - a) * (1 + 2 * k)
    return wanted


def _process_row(raw: torch.Tensor, work: torch.Tensor, bad: torch.Tensor, plan: Picking, seq: Sampling,
                 a: int) -> torch.Tensor:
    """`work` with this row's processed logits written in (a copy the first time); a logit that nothing is
    allowed for is flagged in `bad`."""
    first = a + len(plan.scores)
    count = plan.num_logits - len(plan.scores)
    contexts = plan.pick.contexts
    if contexts is None:
        kinds = plan.pick.kinds or [plan.pick.kind] * count
        contexts = [None if kind == ARGMAX else Context((), len(seq.tokens)) for kind in kinds]
    index = [i for i, c in enumerate(contexts) if c is not None]
    if not index:
        return work
    if work is raw:
        work = raw.float().clone()
    chained: set[int] = set()
    # chains pay a host read and a processing call per logit: worth it where a grammar decides what a draft may
    # be (measured: under penalties alone quad lost more time than its extra accepted drafts gained)
    for group in (plan.pick.chains or ()) if seq.constraint is not None else ():
        _process_chain(raw, work, bad, seq, [first + i for i in group], [contexts[i] for i in group])
        chained.update(group)
    index = [i for i in index if i not in chained]
    if not index:
        return work
    where = torch.tensor([first + i for i in index], device=raw.device)
    processed = process_logits(raw[where], seq, [contexts[i] for i in index])
    work[where] = processed
    bad[where] |= ~torch.isfinite(processed.max(-1).values)
    return work


def _process_chain(raw: torch.Tensor, work: torch.Tensor, bad: torch.Tensor, seq: Sampling, where: list[int],
                   contexts: list[Context]) -> None:
    """Drafts that follow each other (a `Pick.chains` group): logit k is processed after the argmax picks of
    the logits before it, one at a time (a host read per logit: only drafts of requests with options)."""
    picked: list[int] = []
    start = contexts[0].after
    for at, context in zip(where, contexts, strict=True):
        row = process_logits(raw[at : at + 1], seq, [Context(start + tuple(picked), context.index)])
        work[at] = row[0]
        bad[at] |= ~torch.isfinite(row[0].max())
        picked.append(int(row[0].argmax()))


def _pick_row(logits: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor, bad: torch.Tensor,
              plan: Picking, seq: Sampling, a: int, b: int) -> None:
    """One row's picks into tokens[a:b] / confidence[a:b] (argmax is already there); faults into bad[a:b]."""
    config = seq.config
    kinds = plan.pick.kinds or [plan.pick.kind] * (b - a)
    if config.temperature > 0:
        contexts = plan.pick.contexts
        for i, kind in enumerate(kinds):  # AR draws: one per output position, from that position's stream
            if kind != SAMPLE:
                continue
            at = a + i
            position = contexts[i].index if contexts is not None and contexts[i] is not None else len(seq.tokens)
            flags = torch.zeros(1, dtype=torch.bool, device=logits.device)
            generator = position_generator(config.seed, position, logits.device)
            tokens[at : at + 1] = sample_tokens(logits[at : at + 1], config.temperature, generator, config.top_k,
                                                config.top_p, flags)
            bad[at : at + 1] |= flags
        index = [a + i for i, k in enumerate(kinds) if k == DENOISE]
        if index:
            whole = len(index) == b - a
            where = slice(a, b) if whole else torch.tensor(index, device=logits.device)
            tokens[where] = denoise_tokens(logits[where], config.temperature, seq.generator, config.top_k,
                                           config.top_p)
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
        a += len(plan.scores)
        weight, pairs = plan.pick.mix
        slot0 = torch.tensor([a + i for i, _ in pairs], device=logits.device)
        slot1 = torch.tensor([a + j for _, j in pairs], device=logits.device)
        logits[slot1] = weight * logits[slot0] + (1 - weight) * logits[slot1]
    return logits
