"""`torch.ops.trimode.block_attention`: the block attention contract (plugins/reference.py) as a torch op.

    block_attention(q, k_new, v_new, k_cache, v_cache, cu_seqlens, page_table, cache_lens, mask_kind,
                    mask_param, write, scale: float, max_chunk: int, max_cache_len: int) -> out

q/k_new/v_new/out are packed [N, H, D]; k_cache/v_cache are page pools [P, S, Hkv, D]; page_table is [B, T]
int32 and the five other row arrays are int32 (cu_seqlens [B+1], the rest [B]), all on q's device. k_cache and
v_cache are mutated in place at the positions of writing rows (declared in `mutates_args`); the output never
aliases an input. `max_chunk` (>= every n_b, <= N) and `max_cache_len` (>= every p_b, 0 = T * S) are host
bounds that size the CUDA grid, so one captured CUDA graph serves every mix of rows (and pages) within them.

One op for every device, so the model code calls the same thing on CPU and GPU and torch.compile / CUDA graph
capture see a single opaque node:
* CPU: `plugins.reference.block_attention_reference` (the definition), after checking the rows, the pages and
  the bounds against the (host) data, so a call the CUDA kernel would compute differently (it zeroes rows beyond
  max_chunk, hides keys in bad pages, races on a written page another row reads) fails here with a ValueError,
  before anything is written.
* CUDA: the CUDA library (`plugins/build/libtrimode_attention.so`) through ctypes, launched on torch's current
  stream with any workspace allocated by torch on that stream, so the call is capturable in a CUDA graph (the
  library never synchronizes or allocates, and reads every row array and the page table on the device).
* Meta/fake: shape propagation only, for tracing.
"""

from __future__ import annotations

import torch

from . import native
from .masks import BIDIRECTIONAL, CAUSAL, PREFIX_BLOCK, QUAD, check_row
from .reference import block_attention_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROW_ARRAYS = ("cache_lens", "mask_kind", "mask_param", "write")


def _check(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, cu_seqlens: torch.Tensor, page_table: torch.Tensor,
           rows: dict[str, torch.Tensor], max_chunk: int, max_cache_len: int) -> None:
    """Device-independent checks (shapes, dtypes, bounds), so CPU and CUDA reject the same calls alike."""
    if q.dim() != 3 or k_new.dim() != 3 or v_new.dim() != 3 or k_cache.dim() != 4:
        raise ValueError("q/k_new/v_new are packed [N, H, D] and k_cache/v_cache [P, S, Hkv, D]")
    tokens, heads, head_dim = q.shape
    kv_heads = k_new.shape[1]
    if k_new.shape != (tokens, kv_heads, head_dim) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new/v_new must be {(tokens, kv_heads, head_dim)}, "
                         f"got {tuple(k_new.shape)}/{tuple(v_new.shape)}")
    if k_cache.shape[2:] != (kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache must be [P, S, {kv_heads}, {head_dim}], "
                         f"got {tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    if k_cache.shape[0] < 1 or k_cache.shape[1] < 1 or k_cache.shape[0] * k_cache.shape[1] >= 1 << 31:
        raise ValueError(f"k_cache/v_cache need at least one page of one position and P * S < 2^31, "
                         f"got {tuple(k_cache.shape)}")
    if heads % kv_heads != 0:
        raise ValueError(f"num_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
    if page_table.dim() != 2 or page_table.shape[0] < 1 or page_table.shape[1] < 1:
        raise ValueError(f"page_table must be [B, T] with B, T >= 1, got {tuple(page_table.shape)}")
    batch = page_table.shape[0]
    if cu_seqlens.shape != (batch + 1,):
        raise ValueError(f"cu_seqlens must be [B+1] for B = page_table.shape[0] = {batch}, "
                         f"got {tuple(cu_seqlens.shape)}")
    for name, t in rows.items():
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    for name, t in (("cu_seqlens", cu_seqlens), ("page_table", page_table), *rows.items()):
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"{name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
    if len({t.dtype for t in (q, k_new, v_new, k_cache, v_cache)}) != 1:
        raise ValueError("q, k_new, v_new, k_cache and v_cache must share one dtype")
    if not 1 <= max_chunk <= max(tokens, 1):
        raise ValueError(f"max_chunk must be in [1, N={tokens}], got {max_chunk}")
    addressable = page_table.shape[1] * k_cache.shape[1]
    if addressable > 1 << 30:
        raise ValueError(f"a page table addresses T * S = {addressable} positions, more than 2^30")
    if not 0 <= max_cache_len <= addressable:
        raise ValueError(f"max_cache_len must be in [0, T*S={addressable}], got {max_cache_len}")


def _written_counts(lengths: torch.Tensor, mask_kind: torch.Tensor, mask_param: torch.Tensor,
                    write: torch.Tensor) -> torch.Tensor:
    """w_b of every row (masks.written_count, vectorized): 0 for rows that do not write."""
    counts = torch.zeros_like(lengths)
    counts = torch.where(mask_kind == CAUSAL, lengths, counts)
    counts = torch.where(mask_kind == QUAD, mask_param.long(), counts)
    counts = torch.where(mask_kind == PREFIX_BLOCK, lengths - mask_param.long(), counts)
    counts = torch.where(mask_kind == BIDIRECTIONAL, torch.zeros_like(counts), counts)
    return torch.where(write != 0, counts, torch.zeros_like(counts))


def _check_rows_on_host(cu_seqlens: torch.Tensor, page_table: torch.Tensor, cache_lens: torch.Tensor,
                        mask_kind: torch.Tensor, mask_param: torch.Tensor, write: torch.Tensor, max_chunk: int,
                        max_cache_len: int, num_pages: int, page_size: int) -> None:
    """The rows, pages and host bounds against the data (CPU only: on CUDA the data is never read on the host).

    Everything is checked before the reference runs, so a rejected call writes nothing.
    """
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    if int(cu_seqlens[0]) < 0 or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing from >= 0, got {cu_seqlens.tolist()}")
    for kind, param, n, writes in zip(mask_kind.tolist(), mask_param.tolist(), lengths.tolist(), write.tolist(),
                                      strict=True):
        check_row(kind, param, n, bool(writes))
    if int(lengths.max()) > max_chunk:
        raise ValueError(f"a row has {int(lengths.max())} tokens, more than max_chunk={max_chunk}")
    pages_per_row = page_table.shape[1]
    bound = max_cache_len or pages_per_row * page_size
    past = cache_lens.long()
    if int(past.min()) < 0 or int(past.max()) > bound:
        raise ValueError(f"cache lengths must be in [0, {bound}] (max_cache_len or T * S), got {past.tolist()}")
    written = _written_counts(lengths, mask_kind, mask_param, write)
    used = torch.where(lengths > 0, (past + written + page_size - 1) // page_size, torch.zeros_like(past))
    if int(used.max()) > pages_per_row:
        raise ValueError(f"a row needs {int(used.max())} page-table entries, the table has {pages_per_row}")
    entry = torch.arange(pages_per_row)[None, :]
    in_use = entry < used[:, None]
    pages = page_table.long()
    if bool(((pages < 0) | (pages >= num_pages))[in_use].any()):
        raise ValueError(f"a used page-table entry is outside the pool of {num_pages} pages")
    if not bool((written > 0).any()):
        return
    uses = torch.bincount(pages[in_use], minlength=num_pages)
    writes_to = in_use & (entry >= (past // page_size)[:, None]) & (written > 0)[:, None]
    if bool((uses[pages[writes_to]] != 1).any()):
        raise ValueError("a page a row writes is also used by another row (or twice by its own page table): "
                         "the result would depend on the order rows run in")


@torch.library.custom_op("trimode::block_attention", mutates_args=("k_cache", "v_cache"))
def block_attention_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, cu_seqlens: torch.Tensor, page_table: torch.Tensor,
                       cache_lens: torch.Tensor, mask_kind: torch.Tensor, mask_param: torch.Tensor,
                       write: torch.Tensor, scale: float, max_chunk: int, max_cache_len: int) -> torch.Tensor:
    """Default (CPU) implementation: the PyTorch reference."""
    rows = dict(cache_lens=cache_lens, mask_kind=mask_kind, mask_param=mask_param, write=write)
    _check(q, k_new, v_new, k_cache, v_cache, cu_seqlens, page_table, rows, max_chunk, max_cache_len)
    if int(cu_seqlens[-1]) > q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])}, past N={q.shape[0]}")
    _check_rows_on_host(cu_seqlens, page_table, cache_lens, mask_kind, mask_param, write, max_chunk,
                        max_cache_len, k_cache.shape[0], k_cache.shape[1])
    return block_attention_reference(q, k_new, v_new, k_cache, v_cache, cu_seqlens, page_table, cache_lens,
                                     mask_kind, mask_param, write, scale)


@block_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, cu_seqlens, page_table, cache_lens, mask_kind, mask_param, write, scale,
      max_chunk, max_cache_len):
    return torch.empty_like(q)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous, 16-byte aligned version of a read-only input (a copy only when needed)."""
    if not t.is_contiguous() or t.data_ptr() % 16:
        return t.clone(memory_format=torch.contiguous_format)
    return t


@block_attention_op.register_kernel("cuda")
def _(q, k_new, v_new, k_cache, v_cache, cu_seqlens, page_table, cache_lens, mask_kind, mask_param, write, scale,
      max_chunk, max_cache_len):
    rows = dict(cache_lens=cache_lens, mask_kind=mask_kind, mask_param=mask_param, write=write)
    _check(q, k_new, v_new, k_cache, v_cache, cu_seqlens, page_table, rows, max_chunk, max_cache_len)
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not cache.is_contiguous() or cache.data_ptr() % 16:
            raise ValueError(f"{name} is written in place, so it must be contiguous and 16-byte aligned")
    lib = native.load("cuda")
    q, k_new, v_new = _aligned(q), _aligned(k_new), _aligned(v_new)
    index = [t.contiguous() for t in (cu_seqlens, page_table, cache_lens, mask_kind, mask_param, write)]
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
                    v_cache: torch.Tensor, cu_seqlens: torch.Tensor, page_table: torch.Tensor,
                    cache_lens: torch.Tensor, mask_kind: torch.Tensor, mask_param: torch.Tensor,
                    write: torch.Tensor, scale: float, max_chunk: int, max_cache_len: int = 0) -> torch.Tensor:
    """Block attention per the contract in `plugins/reference.py` (see the module docstring)."""
    return torch.ops.trimode.block_attention(q, k_new, v_new, k_cache, v_cache, cu_seqlens, page_table,
                                             cache_lens, mask_kind, mask_param, write, float(scale),
                                             int(max_chunk), int(max_cache_len))
