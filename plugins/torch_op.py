"""`torch.ops.trimode.block_attention`: the block attention contract as a torch custom op.

One op for every device, so the model code calls the same thing on CPU and GPU and torch.compile / CUDA graph
capture see a single opaque node:
* CPU: `plugins.reference.block_attention_reference` (the definition of the contract).
* CUDA: the CUDA library (`plugins/build/libtrimode_attention.so`) through ctypes, launched on torch's current
  stream with any workspace allocated by torch on that stream, so the call is capturable in a CUDA graph (the
  library never synchronizes or allocates).
* Meta/fake: shape propagation only, for tracing.

The op mutates k_cache/v_cache (declared in `mutates_args`) when write_kv is true; the output never aliases an
input.
"""

from __future__ import annotations

import torch

from . import native
from .reference import BIDIRECTIONAL, CAUSAL, block_attention_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, slots: torch.Tensor, cache_lens: torch.Tensor, chunk_lens: torch.Tensor,
           mask_kind: int) -> None:
    """Device-independent checks, so CPU and CUDA reject the same calls with the same ValueError."""
    if mask_kind not in (CAUSAL, BIDIRECTIONAL):
        raise ValueError(f"unknown mask kind {mask_kind} "
                         "(0 causal, 1 bidirectional; 2 structured is reserved)")
    if q.dim() != 4 or k_new.dim() != 4 or k_cache.dim() != 4:
        raise ValueError("q/k_new/v_new are [B, T, H, D] and k_cache/v_cache [S, L, Hkv, D]")
    batch, chunk, heads, head_dim = q.shape
    kv_heads = k_new.shape[2]
    if k_new.shape != (batch, chunk, kv_heads, head_dim) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new/v_new must be {(batch, chunk, kv_heads, head_dim)}, "
                         f"got {tuple(k_new.shape)}/{tuple(v_new.shape)}")
    if k_cache.shape[2:] != (kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache must be [S, L, {kv_heads}, {head_dim}], "
                         f"got {tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    if heads % kv_heads != 0:
        raise ValueError(f"num_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
    for name, t in (("slots", slots), ("cache_lens", cache_lens), ("chunk_lens", chunk_lens)):
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    if len({t.dtype for t in (q, k_new, v_new, k_cache, v_cache)}) != 1:
        raise ValueError("q, k_new, v_new, k_cache and v_cache must share one dtype")


@torch.library.custom_op("trimode::block_attention", mutates_args=("k_cache", "v_cache"))
def block_attention_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slots: torch.Tensor, cache_lens: torch.Tensor,
                       chunk_lens: torch.Tensor, mask_kind: int, write_kv: bool,
                       scale: float) -> torch.Tensor:
    """Default (CPU) implementation: the PyTorch reference."""
    _check(q, k_new, v_new, k_cache, v_cache, slots, cache_lens, chunk_lens, mask_kind)
    return block_attention_reference(q, k_new, v_new, k_cache, v_cache, slots, cache_lens, chunk_lens,
                                     mask_kind, write_kv, scale)


@block_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, slots, cache_lens, chunk_lens, mask_kind, write_kv, scale):
    return torch.empty_like(q)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous, 16-byte aligned version of a read-only input (a copy only when needed)."""
    if not t.is_contiguous() or t.data_ptr() % 16:
        return t.clone(memory_format=torch.contiguous_format)
    return t


@block_attention_op.register_kernel("cuda")
def _(q, k_new, v_new, k_cache, v_cache, slots, cache_lens, chunk_lens, mask_kind, write_kv, scale):
    _check(q, k_new, v_new, k_cache, v_cache, slots, cache_lens, chunk_lens, mask_kind)
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not cache.is_contiguous() or cache.data_ptr() % 16:
            raise ValueError(f"{name} is written in place, so it must be contiguous and 16-byte aligned")
    lib = native.load("cuda")
    q, k_new, v_new = _aligned(q), _aligned(k_new), _aligned(v_new)
    index = [t.to(device=q.device, dtype=torch.int32).contiguous() for t in (slots, cache_lens, chunk_lens)]
    with torch.cuda.device(q.device):
        out = torch.empty_like(q)
        params = native.make_params(q, k_new, v_new, k_cache, v_cache, index[0], index[1], index[2], out,
                                    mask_kind, write_kv, scale)
        size = lib.workspace_size(params)
        workspace = torch.empty(size, dtype=torch.uint8, device=q.device) if size else None
        if workspace is not None:
            params.workspace, params.workspace_size = workspace.data_ptr(), size
        lib.check(params, torch.cuda.current_stream(q.device).cuda_stream)
    return out


def cuda_available() -> bool:
    """True when a GPU is visible and the CUDA library is built and loads."""
    if not torch.cuda.is_available() or not native.is_built("cuda"):
        return False
    try:
        native.load("cuda")
    except (OSError, native.PluginNotBuiltError):
        return False
    return True


def block_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slots: torch.Tensor | None, cache_lens: torch.Tensor,
                    chunk_lens: torch.Tensor, mask_kind: int, write_kv: bool, scale: float) -> torch.Tensor:
    """Block attention per the contract in `plugins/reference.py`; `slots=None` means slot b = b."""
    if slots is None:
        slots = torch.arange(q.shape[0], dtype=torch.int32, device=q.device)
    return torch.ops.trimode.block_attention(q, k_new, v_new, k_cache, v_cache, slots, cache_lens, chunk_lens,
                                             int(mask_kind), bool(write_kv), float(scale))
