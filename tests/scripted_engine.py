"""A scripted stand-in model for driving the generation loops through chosen situations.

Random weights almost never draft correctly, so acceptance counts, EOS inside a block and the mask-token
trap are driven here by a model whose predictions are fixed per position. The loops under test are the real
ones; only the network is replaced, and the KV cache is the real `KVCache` so rollbacks are observable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.runtime.model.kv_cache import KVCache

VOCAB = 64
MASK = 60
EOS = 61


@dataclass
class ScriptedConfig:
    vocab_size: int = VOCAB
    mask_token_id: int = MASK
    eos_token_id: int = EOS
    block_size: int = 8


def one_hot_logits(tokens: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(tokens), VOCAB)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 10.0
    return logits


class ScriptedEngine:
    """AR truth: after the prompt the causal model always continues with `truth` (index = generated position).

    Drafts: in draft pass number n (counted per sequence), positions 1..accept[n] of the block are drafted
    correctly and the rest wrongly, so exactly accept[n] drafts are accepted. `draft_mask` makes every draft
    predict the mask token itself (the reference's trap).
    """

    max_batch_size = 8
    max_seq_len = 512
    has_lora = False
    tokenizer_path = None

    def __init__(self, truth: list[int], accept: list[int] | None = None, draft_mask: bool = False,
                 denoise: dict[int, int] | None = None) -> None:
        self.config = ScriptedConfig()
        self.truth = truth
        self.accept = accept or []
        self.draft_mask = draft_mask
        self.denoise = denoise or {}
        self.prompt_len: dict[int, int] = {}
        self.draft_calls: dict[int, int] = {}
        self.calls: list[str] = []

    def new_cache(self, num_slots: int) -> KVCache:
        return KVCache(1, num_slots, self.max_seq_len, 1, 2, torch.float32)

    def _truth_at(self, generated_index: int) -> int:
        return self.truth[generated_index] if generated_index < len(self.truth) else 0

    def prefill(self, cache, slots, prompts):
        self.calls.append("prefill")
        for slot, prompt in zip(slots, prompts, strict=True):
            self.prompt_len[slot] = len(prompt)
            cache.lens[slot] = len(prompt)
        return torch.stack([one_hot_logits([self._truth_at(0)])[0] for _ in slots])

    def decode(self, cache, slots, tokens):
        self.calls.append("decode")
        out = []
        for slot in slots:
            generated = int(cache.lens[slot]) - self.prompt_len[slot] + 1
            cache.lens[slot] += 1
            out.append(one_hot_logits([self._truth_at(generated)])[0])
        return torch.stack(out)

    def draft(self, cache, slots, blocks, lora=False):
        self.calls.append("draft")
        out = []
        for slot, block in zip(slots, blocks, strict=True):
            start = int(cache.lens[slot]) - self.prompt_len[slot]  # generated index of block[0]
            n = self.draft_calls.get(slot, 0)
            self.draft_calls[slot] = n + 1
            if self.draft_mask:
                out.append(one_hot_logits([MASK] * len(block)))
                continue
            if self.denoise:  # diffusion script: position -> token, everything else the truth
                out.append(one_hot_logits([self.denoise.get(start + i, self._truth_at(start + i))
                                           for i in range(len(block))]))
                continue
            good = self.accept[n] if n < len(self.accept) else len(block) - 1
            tokens = [self._truth_at(start + i) if i <= good else (self._truth_at(start + i) + 1) % 50
                      for i in range(len(block))]
            out.append(one_hot_logits(tokens))
        return torch.stack(out)

    def verify(self, cache, slots, blocks):
        self.calls.append("verify")
        out = []
        for slot, block in zip(slots, blocks, strict=True):
            start = int(cache.lens[slot]) - self.prompt_len[slot]
            cache.lens[slot] += len(block)
            out.append(one_hot_logits([self._truth_at(start + i + 1) for i in range(len(block))]))
        return torch.stack(out)
