"""Baselines we measure ourselves against, on the same weights, in the same process.

* `HFGenerate`: Hugging Face transformers' `Ministral3ForCausalLM.generate` (greedy, its own KV cache) - the
  ordinary way to run these weights causally.
* `DynamicCacheEngine`: the step kinds with the cache handled the way the public reference code handles
  Hugging Face's DynamicCache - K/V grown by concatenation every causal pass, cropped by slicing on rollback,
  batch size 1 - so our generation loops on it are a like-for-like baseline for the paged cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...builder.checkpoint import load_checkpoint
from ...plugins.masks import written_offsets
from ...plugins.reference import block_attention_reference
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


class DynamicCacheEngine(TorchEngine):
    """The torch engine's math with a concatenating cache, batch size 1 like the public reference code.

    Its K/V live in per-layer tensors grown by torch.cat and cropped by slicing when the scheduler moves the
    sequence's length back (a rejected speculation), as Hugging Face's DynamicCache does; the scheduler's page
    tables are only bookkeeping here."""

    backend = "torch-dynamic-cache"

    def __init__(self, model, limits, tokenizer_path=None) -> None:
        super().__init__(model, limits, tokenizer_path)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def size_cache(self, kv_cache_memory=None, page_size=None, prefix_caching=True, identity="") -> None:
        """As the torch engine, without the prefix cache: its own K/V cannot start from shared pages."""
        super().size_cache(kv_cache_memory, page_size, False, identity)

    @torch.inference_mode()
    def step(self, cache, batch: StepBatch) -> torch.Tensor:  # type: ignore[override]
        model, c = self.model, self.config
        if len(batch.rows) != 1:
            raise ValueError("the reference-style baseline runs one sequence at a time")
        (row,) = batch.rows
        past, length = batch.cache_lens[0], len(row.tokens)
        if past == 0 or not self.k:
            self.k = [torch.zeros(0, c.num_key_value_heads, c.head_dim, dtype=model.dtype)] * c.num_hidden_layers
            self.v = list(self.k)
        self.k = [t[:past] for t in self.k]  # DynamicCache.crop
        self.v = [t[:past] for t in self.v]
        i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
        h = torch.nn.functional.embedding(batch.tokens[None], model.w["embed"])
        lora = bool(row.lora)
        for i in range(c.num_hidden_layers):
            q, k, v = model._qkv(i, h, batch.positions[None])
            pad = self.k[i].new_zeros(1, *k.shape[2:])  # the whole cache as one page (never empty)
            attn = block_attention_reference(
                q[0], k[0], v[0], torch.cat([self.k[i], pad])[None], torch.cat([self.v[i], pad])[None],
                i32(0, length), i32(0)[None], i32(past), i32(row.mask_kind), i32(row.mask_param), i32(0),
                model.scale)
            if row.write:
                index = torch.tensor(written_offsets(row.mask_kind, row.mask_param, length), dtype=torch.long)
                self.k[i] = torch.cat([self.k[i], k[0][index]])
                self.v[i] = torch.cat([self.v[i], v[0][index]])
            h = model._attn_out(i, h, attn[None], lora)
            h = model._mlp(i, h)
        return model._logits(h[0, batch.logit_index])
