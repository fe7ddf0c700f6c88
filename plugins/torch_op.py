"""`torch.ops.trimode.block_attention`: the block attention contract (plugins/reference.py) as a torch op.

    block_attention(q, k_new, v_new, k_cache, v_cache, cu_seqlens, slots, cache_lens, mask_kind, mask_param,
                    write, scale: float, max_chunk: int, max_cache_len: int) -> out

q/k_new/v_new/out are packed [N, H, D]; the six row arrays are int32 on q's device; k_cache/v_cache are
mutated in place at the positions of writing rows (declared in `mutates_args`); the output never aliases an
input. `max_chunk` (>= every n_b, <= N) and `max_cache_len` (>= every p_b, 0 = capacity) are host bounds
that size the CUDA grid, so one captured CUDA graph serves every mix of rows within them.

One op for every device, so the model code calls the same thing on CPU and GPU and torch.compile / CUDA graph
capture see a single opaque node:
* CPU: `plugins.reference.block_attention_reference` (the definition), after checking the bounds against the
  (host) row data, so a call the CUDA kernel would compute differently (it zeroes rows beyond max_chunk) fails
  here with a ValueError.
* CUDA: the CUDA library (`plugins/build/libtrimode_attention.so`) through ctypes, launched on torch's current
  stream with any workspace allocated by torch on that stream, so the call is capturable in a CUDA graph (the
  library never synchronizes or allocates, and reads every row array on the device).
* Meta/fake: shape propagation only, for tracing.
"""

from __future__ import annotations

import torch

from . import native
from .reference import PREFIX_BLOCK, block_attention_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROW_ARRAYS = ("slots", "cache_lens", "mask_kind", "mask_param", "write")


def _check(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, cu_seqlens: torch.Tensor, rows: dict[str, torch.Tensor], max_chunk: int,
           max_cache_len: int) -> None:
    """Device-independent checks (shapes, dtypes, bounds), so CPU and CUDA reject the same calls alike."""
    if q.dim() != 3 or k_new.dim() != 3 or v_new.dim() != 3 or k_cache.dim() != 4:
        raise ValueError("q/k_new/v_new are packed [N, H, D] and k_cache/v_cache [S, L, Hkv, D]")
    tokens, heads, head_dim = q.shape
    kv_heads = k_new.shape[1]
    if k_new.shape != (tokens, kv_heads, head_dim) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new/v_new must be {(tokens, kv_heads, head_dim)}, "
                         f"got {tuple(k_new.shape)}/{tuple(v_new.shape)}")
    if k_cache.shape[2:] != (kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache must be [S, L, {kv_heads}, {head_dim}], "
                         f"got {tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    if heads % kv_heads != 0:
        raise ValueError(f"num_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
    batch = rows["slots"].shape[0] if rows["slots"].dim() == 1 else -1
    if batch < 1 or cu_seqlens.shape != (batch + 1,):
        raise ValueError(f"cu_seqlens must be [B+1] for B = len(slots) >= 1, got {tuple(cu_seqlens.shape)} "
                         f"and slots {tuple(rows['slots'].shape)}")
    for name, t in rows.items():
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    for name, t in (("cu_seqlens", cu_seqlens), *rows.items()):
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"{name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
    if len({t.dtype for t in (q, k_new, v_new, k_cache, v_cache)}) != 1:
        raise ValueError("q, k_new, v_new, k_cache and v_cache must share one dtype")
    if not 1 <= max_chunk <= max(tokens, 1):
        raise ValueError(f"max_chunk must be in [1, N={tokens}], got {max_chunk}")
    if not 0 <= max_cache_len <= k_cache.shape[1]:
        raise ValueError(f"max_cache_len must be in [0, L={k_cache.shape[1]}], got {max_cache_len}")


def _check_bounds_on_host(cu_seqlens: torch.Tensor, cache_lens: torch.Tensor, max_chunk: int,
                          max_cache_len: int, capacity: int) -> None:
    """The host bounds against the row data (CPU only: on CUDA the data is never read on the host)."""
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    if int(lengths.max()) > max_chunk:
        raise ValueError(f"a row has {int(lengths.max())} tokens, more than max_chunk={max_chunk}")
    bound = max_cache_len or capacity
    if int(cache_lens.max()) > bound:
        raise ValueError(f"a row has cache length {int(cache_lens.max())}, more than max_cache_len={bound}")


@torch.library.custom_op("trimode::block_attention", mutates_args=("k_cache", "v_cache"))
def block_attention_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, cu_seqlens: torch.Tensor, slots: torch.Tensor,
                       cache_lens: torch.Tensor, mask_kind: torch.Tensor, mask_param: torch.Tensor,
                       write: torch.Tensor, scale: float, max_chunk: int, max_cache_len: int) -> torch.Tensor:
    """Default (CPU) implementation: the PyTorch reference."""
    rows = dict(slots=slots, cache_lens=cache_lens, mask_kind=mask_kind, mask_param=mask_param, write=write)
    _check(q, k_new, v_new, k_cache, v_cache, cu_seqlens, rows, max_chunk, max_cache_len)
    _check_bounds_on_host(cu_seqlens, cache_lens, max_chunk, max_cache_len, k_cache.shape[1])
    # A prefix_block row whose tail is the whole chunk writes no token; the reference would index with an empty
    # float tensor there, so such a row's flag is dropped (same result: nothing to write).
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    writes_nothing = (mask_kind == PREFIX_BLOCK) & (mask_param == lengths)
    write = torch.where(writes_nothing, torch.zeros_like(write), write)
    return block_attention_reference(q, k_new, v_new, k_cache, v_cache, cu_seqlens, slots, cache_lens, mask_kind,
                                     mask_param, write, scale)


@block_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, cu_seqlens, slots, cache_lens, mask_kind, mask_param, write, scale,
      max_chunk, max_cache_len):
    return torch.empty_like(q)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous, 16-byte aligned version of a read-only input (a copy only when needed)."""
    if not t.is_contiguous() or t.data_ptr() % 16:
        return t.clone(memory_format=torch.contiguous_format)
    return t


@block_attention_op.register_kernel("cuda")
def _(q, k_new, v_new, k_cache, v_cache, cu_seqlens, slots, cache_lens, mask_kind, mask_param, write, scale,
      max_chunk, max_cache_len):
    rows = dict(slots=slots, cache_lens=cache_lens, mask_kind=mask_kind, mask_param=mask_param, write=write)
    _check(q, k_new, v_new, k_cache, v_cache, cu_seqlens, rows, max_chunk, max_cache_len)
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not cache.is_contiguous() or cache.data_ptr() % 16:
            raise ValueError(f"{name} is written in place, so it must be contiguous and 16-byte aligned")
    lib = native.load("cuda")
    q, k_new, v_new = _aligned(q), _aligned(k_new), _aligned(v_new)
    index = [t.contiguous() for t in (cu_seqlens, slots, cache_lens, mask_kind, mask_param, write)]
    with torch.cuda.device(q.device):
        out = torch.empty_like(q)
        params = native.make_params(q, k_new, v_new, k_cache, v_cache, *index, out, scale, max_chunk,
                                    max_cache_len)
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
                    v_cache: torch.Tensor, cu_seqlens: torch.Tensor, slots: torch.Tensor,
                    cache_lens: torch.Tensor, mask_kind: torch.Tensor, mask_param: torch.Tensor,
                    write: torch.Tensor, scale: float, max_chunk: int, max_cache_len: int = 0) -> torch.Tensor:
    """Block attention per the contract in `plugins/reference.py` (see the module docstring)."""
    return torch.ops.trimode.block_attention(q, k_new, v_new, k_cache, v_cache, cu_seqlens, slots, cache_lens,
                                             mask_kind, mask_param, write, float(scale), int(max_chunk),
                                             int(max_cache_len))
