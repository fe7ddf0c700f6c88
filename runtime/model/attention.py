"""Attention dispatch: the CUDA plugin's torch op on GPU tensors, the PyTorch reference elsewhere.

This is the single place where the runtime chooses an attention implementation, so the model code reads the
same for every device and the choice is easy to test.
"""

from __future__ import annotations

import torch

from ...plugins.reference import block_attention_reference


def _cuda_op():
    """The plugin's torch op when the CUDA library is built and loadable, else None."""
    try:
        from ...plugins import torch_op
    except (ImportError, OSError):
        return None
    return torch_op if torch_op.cuda_available() else None


def attend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, slots: torch.Tensor, cache_lens: torch.Tensor, chunk_lens: torch.Tensor,
           mask_kind: int, write_kv: bool, scale: float) -> torch.Tensor:
    """Block attention per the contract in `plugins/reference.py`."""
    if q.is_cuda:
        op = _cuda_op()
        if op is not None:
            return op.block_attention(q, k_new, v_new, k_cache, v_cache, slots.int(), cache_lens.int(),
                                      chunk_lens.int(), mask_kind, write_kv, scale)
    return block_attention_reference(q, k_new, v_new, k_cache, v_cache, slots, cache_lens, chunk_lens,
                                     mask_kind, write_kv, scale)
