"""Baselines we measure ourselves against, on the same weights, in the same process.

* `HFGenerate`: Hugging Face transformers' `Ministral3ForCausalLM.generate` (greedy, its own KV cache) - the
  ordinary way to run these weights causally.
* `DynamicCacheEngine`: the step kinds with the cache handled the way the public reference code handles
  Hugging Face's DynamicCache - K/V grown by concatenation every causal pass, cropped by slicing on rollback,
  batch size 1 - so our generation loops on it are a like-for-like baseline for the preallocated cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...builder.checkpoint import load_checkpoint
from ...plugins.reference import block_attention_reference, written_offsets
from ..backends.step import StepBatch
from ..backends.torch_engine import TorchEngine


def transformers_model(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Ministral3ForCausalLM holding the checkpoint's weights (encoder. -> model., diffusion_head -> lm_head)."""
    from transformers import Ministral3Config, Ministral3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # it warns that factor != max/original positions; YaRN uses the factor

    ckpt = load_checkpoint(checkpoint_dir, with_lora=False)
    c = ckpt.config
    rope = {"rope_type": c.rope.rope_type, "rope_theta": c.rope.rope_theta, "factor": c.rope.factor,
            "original_max_position_embeddings": c.rope.original_max_position_embeddings,
            "beta_fast": c.rope.beta_fast, "beta_slow": c.rope.beta_slow, "mscale": c.rope.mscale,
            "mscale_all_dim": c.rope.mscale_all_dim, "llama_4_scaling_beta": c.rope.llama_4_scaling_beta}
    config = Ministral3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False, rope_parameters=rope,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.eos_token_id)
    config._attn_implementation = "sdpa"
    model = Ministral3ForCausalLM(config).eval()
    weights = {n.replace("encoder.", "model.", 1).replace("diffusion_head", "lm_head"): t.to(dtype)
               for n, t in ckpt.weights.items()}
    model.load_state_dict(weights, strict=False)
    return model.to(dtype)


class HFGenerate:
    """Greedy `generate()` of transformers for exactly `max_new_tokens` tokens per prompt (batch 1)."""

    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.model = transformers_model(checkpoint_dir, dtype)

    @torch.inference_mode()
    def __call__(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt])
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
        return out[0, len(prompt):].tolist()


class DynamicCache:
    """Per-layer K/V [len, Hkv, D] grown by torch.cat; `lengths` mirrors KVCache's interface for one slot."""

    def __init__(self, num_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0]
        self.max_len = 1 << 30

    def reset(self, slots=None) -> None:
        self.__init__(len(self.k))

    def rollback(self, slot: int, length: int) -> None:
        self.k = [None if t is None else t[:length] for t in self.k]
        self.v = [None if t is None else t[:length] for t in self.v]
        self.lengths[0] = length


class DynamicCacheEngine(TorchEngine):
    """The torch engine's math with a concatenating cache; batch size 1 like the public reference code."""

    backend = "torch-dynamic-cache"

    def new_cache(self, num_slots: int) -> DynamicCache:  # type: ignore[override]
        if num_slots != 1:
            raise ValueError("the reference-style baseline runs one sequence at a time")
        return DynamicCache(self.config.num_hidden_layers)

    @torch.inference_mode()
    def step(self, cache: DynamicCache, batch: StepBatch) -> torch.Tensor:  # type: ignore[override]
        model, c = self.model, self.config
        (row,) = batch.rows
        past, length = cache.lengths[0], len(row.tokens)
        i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
        h = torch.nn.functional.embedding(batch.tokens[None], model.w["embed"])
        lora = bool(row.lora)
        for i in range(c.num_hidden_layers):
            q, k, v = model._qkv(i, h, batch.positions[None])
            if cache.k[i] is None:
                cache.k[i] = k.new_zeros(0, *k.shape[2:])
                cache.v[i] = v.new_zeros(0, *v.shape[2:])
            attn = block_attention_reference(
                q[0], k[0], v[0], cache.k[i][None], cache.v[i][None], i32(0, length), i32(0), i32(past),
                i32(row.mask_kind), i32(row.mask_param), i32(0), model.scale)
            if row.write:
                index = torch.tensor(written_offsets(row.mask_kind, row.mask_param, length))
                cache.k[i] = torch.cat([cache.k[i], k[0][index]])
                cache.v[i] = torch.cat([cache.v[i], v[0][index]])
            h = model._attn_out(i, h, attn[None], lora)
            h = model._mlp(i, h)
        if row.write:
            cache.lengths[0] = past + row.written
        return model._logits(h[0, batch.logit_index])
