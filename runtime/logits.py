"""Request options that change the logits before a token is picked: penalties, logit bias, min_tokens,
ignore_eos's companion rules and structured output - applied exactly the same way in every mode.

The rule that makes spec and quad equal AR with these options: every processed logit carries a `Context`,
the tokens the request has generated before the position it decides. For AR that is the request's generated
tokens; for a verify position of a speculative round it is the generated tokens PLUS the drafted tokens
before that position in the round. A verify position whose drafted prefix is later accepted was therefore
processed with exactly the context AR would have had there, and one whose prefix is rejected is discarded
anyway. Draft logits (spec's bidirectional passes, quad's mask slots) are not processed: a draft is only a
guess, and the verify pass decides.

Diffusion and infill (whose slots are committed out of order) process each masked slot of a pass with the
context of everything committed so far - the generated tokens and the block's committed slots - and with the
slot's own output index for min_tokens. Structured output is not defined for them (refused at submission).

The penalties, as vLLM and transformers define them, over the context's counts:
- repetition_penalty r (CTRL): a token present in the prompt or the generated context has its logit divided by
  r when positive and multiplied by r when negative;
- frequency_penalty f and presence_penalty p (OpenAI): logit -= f * count + p * (count > 0), counting the
  generated context only;
- logit_bias: added to the logit;
- min_tokens: EOS and stop_token_ids are -inf while the output index is below min_tokens;
- structured output: tokens the grammar does not allow after the context are -inf.
Temperature, top-k and top-p then apply to the processed logits as usual. Log-probabilities are reported from
the raw logits (runtime/sampler.py), so they do not depend on these options.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Context:
    """What a processed logit follows: `after`, the tokens beyond the request's generated tokens before the
    position it decides (a drafted prefix, or a block's committed slots), and `index`, the output index of the
    token it decides (for min_tokens)."""

    after: tuple[int, ...]
    index: int


def processes(config: Any) -> bool:
    """Whether a request's logits need processing at all (most do not, and cost nothing)."""
    return bool(config.presence_penalty or config.frequency_penalty or config.repetition_penalty != 1.0
                or config.logit_bias or config.min_tokens or config.structured is not None)


def barred_before_min(config: Any, eos: int) -> list[int]:
    """The tokens min_tokens bars: EOS (unless ignore_eos: then it does not end the output) and the stop
    token ids."""
    return sorted(({eos} if not config.ignore_eos else set()) | set(config.stop_token_ids))


def process_logits(logits: torch.Tensor, seq: Any, contexts: Seq[Context]) -> torch.Tensor:
    """The processed copy of `logits` [n, V] (fp32), one row per context, for request `seq` (its config,
    prompt, generated tokens, EOS id and grammar `constraint`)."""
    config = seq.config
    out = logits.float().clone()
    n, vocab = out.shape
    device = out.device
    generated = seq.tokens
    if config.repetition_penalty != 1.0 or config.presence_penalty or config.frequency_penalty:
        counts = _counts(generated, contexts, vocab, device)
        if config.repetition_penalty != 1.0:
            seen = counts > 0
            prompt = torch.tensor(seq.prompt, dtype=torch.long, device=device)
            seen[:, prompt] = True
            r = config.repetition_penalty
            penalised = torch.where(out > 0, out / r, out * r)
            out = torch.where(seen, penalised, out)
        if config.frequency_penalty:
            out -= config.frequency_penalty * counts
        if config.presence_penalty:
            out -= config.presence_penalty * (counts > 0).float()
    if config.logit_bias:
        ids = torch.tensor([t for t, _ in config.logit_bias], dtype=torch.long, device=device)
        bias = torch.tensor([b for _, b in config.logit_bias], dtype=torch.float32, device=device)
        out[:, ids] += bias
    if config.min_tokens:
        early = [i for i, c in enumerate(contexts) if c.index < config.min_tokens]
        barred = barred_before_min(config, seq.eos)
        if early and barred:
            rows = torch.tensor(early, dtype=torch.long, device=device)
            out[rows[:, None], torch.tensor(barred, dtype=torch.long, device=device)[None, :]] = float("-inf")
    if seq.constraint is not None:
        allowed = seq.constraint.masks([list(c.after) for c in contexts]).to(device)
        out = out.masked_fill(~allowed[:, :vocab], float("-inf"))
    return out


def _counts(generated: list[int], contexts: Seq[Context], vocab: int, device: torch.device) -> torch.Tensor:
    """[n, V] float counts of each token in generated + context.after, per context."""
    base = torch.bincount(torch.tensor(generated, dtype=torch.long, device=device), minlength=vocab)[:vocab]
    counts = base.float()[None, :].repeat(len(contexts), 1)
    rows = [i for i, c in enumerate(contexts) for _ in c.after]
    if rows:
        tokens = [t for c in contexts for t in c.after]
        counts.index_put_((torch.tensor(rows, device=device), torch.tensor(tokens, device=device)),
                          torch.ones(len(rows), device=device), accumulate=True)
    return counts
