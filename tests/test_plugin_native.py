"""The block attention C API (plugins/csrc/block_attention.h, ABI 3) through ctypes, against two oracles.

Two host-pointer libraries implement the API and are checked the same way:
* ``cpu``: the C++ reference (block_attention_cpu.cpp);
* ``emu``: the CUDA kernel source (block_attention_kernels.cuh) compiled for the CPU against the CUDA
  emulation in plugins/csrc/emulation, so the kernel's tiling, GQA packing, per-row masks, online softmax,
  split/combine and cache writes run here even without a GPU.
Every result is compared with BOTH `reference.block_attention_reference` (the contract) and an independent
dense oracle: `reference.dense_attention` over the concatenated cache + chunk keys with a mask built in this
file from each kind's definition (`hand_mask`, not `chunk_mask`). Caches are compared byte for byte.

A library that is not built FAILS its tests when the compiler that builds it is on PATH (it would otherwise
skip silently, issue 16); it skips, with the reason, only where no such compiler exists.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from trimode.plugins import native
from trimode.plugins.reference import (
    BIDIRECTIONAL,
    CAUSAL,
    PREFIX_BLOCK,
    QUAD,
    block_attention_reference,
    dense_attention,
    written_offsets,
)

HOST_KINDS = ("cpu", "emu")
KINDS = (CAUSAL, BIDIRECTIONAL, QUAD, PREFIX_BLOCK)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def require(kind: str) -> native.Library:
    """The loaded library; FAILS when it is missing but buildable here, skips only when it cannot be built."""
    if native.is_built(kind):
        return native.load(kind)
    path = native.library_path(kind)
    compiler = native.toolchain(kind)
    if compiler is not None:
        pytest.fail(f"{path} is not built although {compiler} is on PATH: run `make -C plugins` "
                    "(a missing library must not skip its tests silently)")
    needs = "nvcc" if kind == "cuda" else ("g++ on x86-64" if kind == "emu" else "a C++ compiler (g++)")
    pytest.skip(f"{path} is not built and this machine cannot build it (it needs {needs}; none is on PATH)")


@pytest.fixture(params=HOST_KINDS)
def kind(request) -> str:
    require(request.param)
    return request.param


@pytest.fixture(autouse=True)
def _emu_sm_count():
    """Each test starts from the emulated library's default SM count (8) and leaves it there."""
    if native.is_built("emu"):
        native.emu_set_sm_count(8)
    yield
    if native.is_built("emu"):
        native.emu_set_sm_count(8)


@pytest.mark.parametrize("library", ["cpu", "emu", "cuda"])
def test_library_is_built_wherever_it_can_be(library):
    """Issue 16: with a compiler present, a missing library is a failure, not ~140 silent skips."""
    lib = require(library)
    assert lib.handle.trimode_abi_version() == native.ABI_VERSION
    assert lib.handle.trimode_backend_name() == library.encode()


# ---- building calls -----------------------------------------------------------------------------------------


@dataclass
class Row:
    """One row of a call: its mask kind and parameter, chunk length, cache length and write flag."""

    kind: int
    param: int
    n: int
    past: int
    write: bool = False
    slot: int | None = None  # None: assigned by make_batch


@dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    rows: list[Row]
    starts: list[int]
    cu_seqlens: torch.Tensor
    slots: torch.Tensor
    cache_lens: torch.Tensor
    mask_kind: torch.Tensor
    mask_param: torch.Tensor
    write: torch.Tensor

    def arrays(self) -> tuple[torch.Tensor, ...]:
        return self.cu_seqlens, self.slots, self.cache_lens, self.mask_kind, self.mask_param, self.write


def i32(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32)


def make_batch(seed: int, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, rows: list[Row],
               capacity: int = 96, extra_slots: int = 2) -> Batch:
    """Random tensors for `rows` packed end to end; rows without a slot get distinct, shuffled slots."""
    gen = torch.Generator().manual_seed(seed)
    starts, pos = [], 0
    for r in rows:
        starts.append(pos)
        pos += r.n
    tokens = max(pos, 1)
    num_slots = len(rows) + extra_slots
    taken = {r.slot for r in rows}
    free = [s for s in torch.randperm(num_slots, generator=gen).tolist() if s not in taken]
    slots = [r.slot if r.slot is not None else free.pop() for r in rows]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return Batch(
        q=rnd(tokens, heads, head_dim), k=rnd(tokens, kv_heads, head_dim), v=rnd(tokens, kv_heads, head_dim),
        k_cache=rnd(num_slots, capacity, kv_heads, head_dim), v_cache=rnd(num_slots, capacity, kv_heads, head_dim),
        rows=rows, starts=starts, cu_seqlens=i32(starts + [pos]), slots=i32(slots),
        cache_lens=i32(r.past for r in rows), mask_kind=i32(r.kind for r in rows),
        mask_param=i32(r.param for r in rows), write=i32(int(r.write) for r in rows),
    )


def hand_mask(kind: int, param: int, n: int) -> torch.Tensor:
    """[n, n] bool, chunk query t may see chunk key s, built from each kind's definition in words."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    if kind == CAUSAL:  # token t sees tokens 0..t
        for t in range(n):
            allowed[t, : t + 1] = True
    elif kind == BIDIRECTIONAL:  # everything
        allowed[:] = True
    elif kind == QUAD:  # L sub-blocks [d_j, M x L]: all see d_0..d_j; the masks of j also see all of sub-block j
        width = param + 1
        for j in range(param):
            block = range(j * width, (j + 1) * width)
            for t in block:
                for k in range(j + 1):
                    allowed[t, k * width] = True
                if t != j * width:  # a mask token
                    for s in block:
                        allowed[t, s] = True
    elif kind == PREFIX_BLOCK:  # causal prompt of n - m tokens, then m tokens that see the whole chunk
        prefix = n - param
        for t in range(n):
            if t < prefix:
                allowed[t, : t + 1] = True
            else:
                allowed[t, :] = True
    else:
        raise ValueError(kind)
    return allowed


def dense_oracle(b: Batch, scale: float) -> torch.Tensor:
    """Each row by plain masked softmax over [its cache ; its chunk] (fp32), zeros for tokens of no row."""
    out = torch.zeros(b.q.shape, dtype=torch.float32)
    for r, start, slot in zip(b.rows, b.starts, b.slots.tolist(), strict=True):
        if r.n == 0:
            continue
        chunk = slice(start, start + r.n)
        keys = torch.cat([b.k_cache[slot, : r.past], b.k[chunk]]).float()
        values = torch.cat([b.v_cache[slot, : r.past], b.v[chunk]]).float()
        allowed = torch.cat([torch.ones(r.n, r.past, dtype=torch.bool), hand_mask(r.kind, r.param, r.n)], dim=1)
        out[chunk] = dense_attention(b.q[chunk].float(), keys, values, allowed, scale)
    return out


def expected_caches(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches after the call: each writing row's written_offsets tokens at p_b + i, nothing else changed."""
    k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
    for r, start, slot in zip(b.rows, b.starts, b.slots.tolist(), strict=True):
        if r.write:
            for i, offset in enumerate(written_offsets(r.kind, r.param, r.n)):
                k_cache[slot, r.past + i] = b.k[start + offset]
                v_cache[slot, r.past + i] = b.v[start + offset]
    return k_cache, v_cache


def run_library(kind: str, b: Batch, scale: float, **kwargs):
    """Output and caches of one library call (on copies of the caches)."""
    k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
    out = native.block_attention_host(kind, b.q, b.k, b.v, k_cache, v_cache, *b.arrays(), scale, **kwargs)
    return out, k_cache, v_cache


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def reference_write(b: Batch) -> torch.Tensor:
    """The write flags as passed to the reference: a writing row with nothing to write (prefix_block with m = n)
    is passed as 0, since reference.py indexes with an empty float tensor there (a reference bug, reported)."""
    return i32(int(w != 0 and bool(written_offsets(r.kind, r.param, r.n)))
               for w, r in zip(b.write.tolist(), b.rows, strict=True))


def check_call(kind: str, b: Batch, **kwargs) -> float:
    """Runs the library; checks output vs reference and dense oracle, zero tokens, caches byte for byte."""
    scale = b.q.shape[-1] ** -0.5
    got, k_cache, v_cache = run_library(kind, b, scale, **kwargs)
    assert got.dtype == b.q.dtype and got.shape == b.q.shape
    assert torch.isfinite(got).all()
    ref_k, ref_v = b.k_cache.float().clone(), b.v_cache.float().clone()
    want = block_attention_reference(b.q.float(), b.k.float(), b.v.float(), ref_k, ref_v,
                                     *b.arrays()[:5], reference_write(b), scale)
    dense = dense_oracle(b, scale)
    tol = TOLERANCE[b.q.dtype]
    err = 0.0
    owned = torch.zeros(b.q.shape[0], dtype=torch.bool)
    for r, start in zip(b.rows, b.starts, strict=True):
        if r.n:
            chunk = slice(start, start + r.n)
            owned[chunk] = True
            e_ref, e_dense = rel_err(got[chunk], want[chunk]), rel_err(got[chunk], dense[chunk])
            assert e_ref < tol and e_dense < tol, (r, e_ref, e_dense)
            err = max(err, e_ref, e_dense)
    assert (got[~owned] == 0).all(), "tokens owned by no row must be zero"
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v), "cache writes differ from written_offsets"
    # The reference's own writes agree (fp32 copies of the same values).
    assert torch.equal(ref_k, exp_k.float()) and torch.equal(ref_v, exp_v.float())
    return err


# Rows of each kind: decode and chunks, empty and filled caches, some writing, chunks over one 64-row tile.
ROWS = {
    CAUSAL: [Row(CAUSAL, 0, 1, 0, True), Row(CAUSAL, 0, 1, 37), Row(CAUSAL, 0, 7, 0, True),
             Row(CAUSAL, 0, 33, 64, True), Row(CAUSAL, 0, 21, 5)],
    BIDIRECTIONAL: [Row(BIDIRECTIONAL, 0, 1, 0), Row(BIDIRECTIONAL, 0, 4, 37), Row(BIDIRECTIONAL, 0, 7, 0),
                    Row(BIDIRECTIONAL, 0, 33, 64)],
    QUAD: [Row(QUAD, 1, 2, 0, True), Row(QUAD, 2, 6, 11), Row(QUAD, 3, 12, 0, True), Row(QUAD, 4, 20, 50, True),
           Row(QUAD, 7, 56, 3)],
    PREFIX_BLOCK: [Row(PREFIX_BLOCK, 0, 5, 0, True), Row(PREFIX_BLOCK, 5, 5, 9, True), Row(PREFIX_BLOCK, 3, 9, 0),
                   Row(PREFIX_BLOCK, 8, 40, 31, True), Row(PREFIX_BLOCK, 1, 1, 2, True)],
}


@pytest.mark.parametrize("mask_kind", KINDS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_each_kind_fp32_matches_reference_and_dense_oracle(kind, mask_kind, heads, kv_heads, head_dim):
    b = make_batch(mask_kind, torch.float32, heads, kv_heads, head_dim, ROWS[mask_kind], capacity=128)
    assert check_call(kind, b) < 1e-5


@pytest.mark.parametrize("mask_kind", KINDS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_each_kind_over_long_caches(kind, mask_kind, head_dim):
    """Cache lengths up to 2048 (many key tiles; split-K in the emulated kernel at 8 SMs)."""
    param, n = {CAUSAL: (0, 3), BIDIRECTIONAL: (0, 5), QUAD: (3, 12), PREFIX_BLOCK: (4, 10)}[mask_kind]
    write = mask_kind != BIDIRECTIONAL
    rows = [Row(mask_kind, param, n, 2048 - n, write), Row(mask_kind, param, n, 1000), Row(mask_kind, param, n, 0)]
    b = make_batch(10 + mask_kind, torch.float32, 8, 2, head_dim, rows, capacity=2048)
    assert check_call(kind, b) < 1e-5


MIXED = [Row(CAUSAL, 0, 1, 40, True), Row(QUAD, 2, 6, 17, True), Row(BIDIRECTIONAL, 0, 8, 5),
         Row(PREFIX_BLOCK, 3, 11, 0, True), Row(CAUSAL, 0, 19, 0, True), Row(QUAD, 3, 12, 70),
         Row(PREFIX_BLOCK, 2, 6, 33), Row(BIDIRECTIONAL, 0, 1, 0), Row(CAUSAL, 0, 0, 12, True)]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_mixed_call_equals_each_row_alone(kind, head_dim, heads, kv_heads):
    """Rows of all four kinds (and an empty row) in one call: each row's output and writes are what it gives
    alone, so batching never changes a result."""
    b = make_batch(21, torch.float32, heads, kv_heads, head_dim, MIXED, capacity=128)
    scale = head_dim**-0.5
    assert check_call(kind, b) < 1e-5
    together, k_together, v_together = run_library(kind, b, scale)
    k_alone, v_alone = b.k_cache.clone(), b.v_cache.clone()
    for r, start, slot in zip(b.rows, b.starts, b.slots.tolist(), strict=True):
        chunk = slice(start, start + r.n)
        one = Batch(q=b.q[chunk].contiguous(), k=b.k[chunk].contiguous(), v=b.v[chunk].contiguous(),
                    k_cache=k_alone, v_cache=v_alone, rows=[r], starts=[0], cu_seqlens=i32([0, r.n]),
                    slots=i32([slot]), cache_lens=i32([r.past]), mask_kind=i32([r.kind]),
                    mask_param=i32([r.param]), write=i32([int(r.write)]))
        if r.n == 0:
            continue
        alone, k_alone, v_alone = run_library(kind, one, scale)
        assert rel_err(together[chunk], alone) < 1e-5, r
    assert torch.equal(k_together, k_alone) and torch.equal(v_together, v_alone)


def test_tokens_owned_by_no_row_are_zero(kind):
    """cu_seqlens need not cover [0, N): tokens before the first row, between rows (as empty rows) and after
    the last are zeros."""
    rows = [Row(CAUSAL, 0, 0, 3), Row(QUAD, 1, 2, 4, True), Row(PREFIX_BLOCK, 1, 3, 0, True)]
    b = make_batch(5, torch.float32, 4, 2, 64, rows)
    n = b.q.shape[0]
    q = torch.cat([torch.randn(2, 4, 64), b.q, torch.randn(3, 4, 64)])
    k = torch.cat([torch.randn(2, 2, 64), b.k, torch.randn(3, 2, 64)])
    v = torch.cat([torch.randn(2, 2, 64), b.v, torch.randn(3, 2, 64)])
    shifted = Batch(q=q, k=k, v=v, k_cache=b.k_cache, v_cache=b.v_cache, rows=rows,
                    starts=[s + 2 for s in b.starts], cu_seqlens=b.cu_seqlens + 2, slots=b.slots,
                    cache_lens=b.cache_lens, mask_kind=b.mask_kind, mask_param=b.mask_param, write=b.write)
    assert shifted.q.shape[0] == n + 5
    check_call(kind, shifted)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_half_precision_matches_reference_and_dense_oracle(kind, dtype, head_dim):
    b = make_batch(100, dtype, 8, 2, head_dim, MIXED, capacity=128)
    assert check_call(kind, b) < TOLERANCE[dtype]


@pytest.mark.parametrize("mask_kind", KINDS)
def test_each_key_moves_exactly_the_queries_that_may_see_it(kind, mask_kind):
    """Perturbing chunk key s changes output token t iff the kind lets t see s: the mask's structure, column by
    column (for quad: a mask token's key moves only its own sub-block's masks; d_j's key moves every token of
    sub-blocks >= j)."""
    param, n = {CAUSAL: (0, 6), BIDIRECTIONAL: (0, 6), QUAD: (2, 6), PREFIX_BLOCK: (2, 6)}[mask_kind]
    b = make_batch(7, torch.float32, 4, 2, 64, [Row(mask_kind, param, n, 10)])
    before = run_library(kind, b, 0.125)[0]
    allowed = hand_mask(mask_kind, param, n)
    for s in range(n):
        changed = Batch(**{**b.__dict__, "k": b.k.clone()})
        changed.k[s] += 3.0
        after = run_library(kind, changed, 0.125)[0]
        moved = [t for t in range(n) if not torch.equal(before[t], after[t])]
        assert moved == [t for t in range(n) if allowed[t, s]], (mask_kind, s, moved)


@pytest.mark.parametrize("sm_count", [1, 8, 64, 1000])
def test_kernel_split_plans_agree(sm_count):
    """The emulated kernel gives the oracles' result whether the key range is split (flash decoding + combine
    kernel) or not; the SM count is what decides the split plan."""
    require("emu")
    native.emu_set_sm_count(sm_count)
    rows = [Row(CAUSAL, 0, 1, 250, True), Row(QUAD, 2, 6, 131, True), Row(BIDIRECTIONAL, 0, 3, 0),
            Row(PREFIX_BLOCK, 1, 2, 300, True)]
    b = make_batch(7, torch.float32, 8, 2, 64, rows, capacity=320)
    assert check_call("emu", b) < 1e-5


def test_kernel_splits_when_the_grid_is_small():
    lib = require("emu")
    native.emu_set_sm_count(64)
    b = make_batch(1, torch.bfloat16, 8, 2, 128, [Row(CAUSAL, 0, 1, 300)], capacity=512)
    out = torch.empty_like(b.q)
    params = native.make_params(b.q, b.k, b.v, b.k_cache, b.v_cache, *b.arrays(), out, 128**-0.5, 1)
    full = lib.workspace_size(params)
    assert full > 0, "decode of one row must be split across blocks"
    if native.is_built("cpu"):
        assert native.load("cpu").workspace_size(params) == 0, "the CPU reference needs no workspace"
    native.emu_set_sm_count(1000)  # more blocks than a single split could ever fill: bounded by MAX_SPLITS
    rows = b.q.shape[0] * b.q.shape[1]
    assert lib.workspace_size(params) <= native.MAX_SPLITS * rows * (128 + 1) * 4
    params.max_cache_len = 64  # a tighter host bound of p_b means fewer key tiles to split
    assert lib.workspace_size(params) < full


def test_kernel_with_too_small_a_workspace_uses_fewer_splits():
    """A workspace smaller than asked for only means fewer splits, never a wrong result or an overrun."""
    lib = require("emu")
    native.emu_set_sm_count(64)
    b = make_batch(3, torch.float32, 4, 1, 64, [Row(CAUSAL, 0, 1, 200), Row(QUAD, 1, 2, 90)], capacity=256)
    want = block_attention_reference(b.q, b.k, b.v, b.k_cache.clone(), b.v_cache.clone(), *b.arrays(), 0.125)
    for fraction in (0.0, 0.3, 1.0):
        out = torch.empty_like(b.q)
        params = native.make_params(b.q, b.k, b.v, b.k_cache, b.v_cache, *b.arrays(), out, 0.125, 2)
        size = int(lib.workspace_size(params) * fraction)
        workspace = torch.full((size + 64,), 0x5A, dtype=torch.uint8)  # a guard tail after `size` bytes
        params.workspace, params.workspace_size = workspace.data_ptr(), size
        lib.check(params)
        assert rel_err(out, want) < 1e-5, fraction
        assert (workspace[size:] == 0x5A).all(), "wrote past the workspace it was given"


def test_kernel_is_exact_when_max_cache_len_understates_a_cache_length():
    """max_cache_len only sizes the split plan: the last split takes every remaining key."""
    require("emu")
    native.emu_set_sm_count(64)
    b = make_batch(4, torch.float32, 8, 2, 64, [Row(CAUSAL, 0, 1, 290, True), Row(QUAD, 1, 2, 7)], capacity=320)
    got = run_library("emu", b, 0.125, max_cache_len=64)[0]
    want = block_attention_reference(b.q, b.k, b.v, b.k_cache.clone(), b.v_cache.clone(), *b.arrays(), 0.125)
    assert rel_err(got, want) < 1e-5


# ---- rows the contract does not define ------------------------------------------------------------------


# (rows, cu_seqlens override or None, max_chunk override or None, CPU status, emulated kernel: index of the rows
# made empty; None when the kernel clamps instead, see test_emulated_kernel_clamps_cache_data)
def _bad(rows, status, empty, cu=None, max_chunk=None):
    return pytest.param(rows, cu, max_chunk, status, empty, id=f"status{status}-{len(rows)}rows-{empty}")


GOOD = Row(CAUSAL, 0, 3, 4, True)
INVALID_ROWS = [
    _bad([GOOD, Row(4, 0, 2, 0)], native.ERR_MASK_KIND, [1]),
    _bad([Row(-1, 0, 2, 0), GOOD], native.ERR_MASK_KIND, [0]),
    _bad([GOOD, Row(QUAD, 2, 5, 0, True)], native.ERR_INVALID_ROW, [1]),  # n != L(L+1)
    _bad([GOOD, Row(QUAD, 0, 0, 0)], native.ERR_INVALID_ROW, [1]),  # L = 0
    _bad([GOOD, Row(QUAD, -2, 2, 0)], native.ERR_INVALID_ROW, [1]),  # L < 0 with n = L(L+1)
    _bad([Row(PREFIX_BLOCK, 4, 3, 0, True), GOOD], native.ERR_INVALID_ROW, [0]),  # tail > n
    _bad([GOOD, Row(PREFIX_BLOCK, -1, 3, 0)], native.ERR_INVALID_ROW, [1]),  # tail < 0
    _bad([GOOD, Row(BIDIRECTIONAL, 0, 2, 1, True)], native.ERR_INVALID_ROW, [1]),  # a bidirectional write
    _bad([GOOD, Row(CAUSAL, 0, 2, 0, True, slot=9)], native.ERR_OUT_OF_RANGE, [1]),  # slot >= S
    _bad([GOOD, Row(CAUSAL, 0, 2, 0, slot=-1)], native.ERR_OUT_OF_RANGE, [1]),
    _bad([GOOD, Row(QUAD, 1, 2, 0, True)], native.ERR_OUT_OF_RANGE, [0], max_chunk=2),  # n_b > max_chunk
    _bad([GOOD, Row(CAUSAL, 0, 2, 0)], native.ERR_OUT_OF_RANGE, [1], cu=[0, 3, 2]),  # decreasing
    _bad([GOOD, Row(CAUSAL, 0, 2, 0)], native.ERR_OUT_OF_RANGE, [1], cu=[0, 3, 9]),  # past N
    _bad([GOOD, Row(CAUSAL, 0, 2, 0)], native.ERR_OUT_OF_RANGE, [0], cu=[-1, 3, 5]),  # negative
]


@pytest.mark.parametrize("rows,cu,max_chunk,status,empty", INVALID_ROWS)
def test_cpu_library_rejects_invalid_rows(rows, cu, max_chunk, status, empty):
    """The CPU library reads its row arrays, so it returns the status and touches neither output nor cache."""
    lib = require("cpu")
    b = make_batch(0, torch.float32, 4, 2, 64, rows, capacity=16)
    if cu is not None:
        b.cu_seqlens = i32(cu)
    out = torch.full_like(b.q, 7.0)
    k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
    params = native.make_params(b.q, b.k, b.v, k_cache, v_cache, *b.arrays(), out, 0.125,
                                max_chunk or b.q.shape[0])
    got = lib.run(params)
    assert got == status, lib.error_string(got)
    assert lib.error_string(got) != "unknown trimode status"
    assert (out == 7.0).all(), "a rejected call must not touch the output"
    assert torch.equal(k_cache, b.k_cache) and torch.equal(v_cache, b.v_cache)
    with pytest.raises(native.AttentionError, match=f"status {status}"):
        native.block_attention_host("cpu", b.q, b.k, b.v, k_cache, v_cache, *b.arrays(), 0.125,
                                    max_chunk=max_chunk or b.q.shape[0])


@pytest.mark.parametrize("sm_count", [1, 64])
@pytest.mark.parametrize("rows,cu,max_chunk,status,empty", INVALID_ROWS)
def test_emulated_kernel_makes_invalid_rows_empty(rows, cu, max_chunk, status, empty, sm_count):
    """The kernel cannot report device data: an invalid row gives zero output and writes nothing, the valid
    rows of the same call are exact, nothing is accessed out of bounds (see also the ASan run)."""
    require("emu")
    native.emu_set_sm_count(sm_count)
    b = make_batch(0, torch.float32, 4, 2, 64, rows, capacity=16)
    if cu is not None:
        b.cu_seqlens = i32(cu)
    out, k_cache, v_cache = run_library("emu", b, 0.125, max_chunk=max_chunk or b.q.shape[0])
    valid = [i for i in range(len(rows)) if i not in empty]
    exp_k, exp_v = b.k_cache.clone(), b.v_cache.clone()
    for i in range(len(rows)):
        r, start = rows[i], b.starts[i]
        chunk = slice(start, start + r.n)
        if i in valid:
            one = Batch(q=b.q[chunk].contiguous(), k=b.k[chunk].contiguous(), v=b.v[chunk].contiguous(),
                        k_cache=b.k_cache.clone(), v_cache=b.v_cache.clone(), rows=[r], starts=[0],
                        cu_seqlens=i32([0, r.n]), slots=b.slots[i : i + 1], cache_lens=i32([r.past]),
                        mask_kind=i32([r.kind]), mask_param=i32([r.param]), write=i32([int(r.write)]))
            assert check_call("emu", one) < 1e-5
            assert torch.equal(out[chunk], run_library("emu", one, 0.125)[0])
            if r.write:
                slot = int(b.slots[i])
                for j, offset in enumerate(written_offsets(r.kind, r.param, r.n)):
                    exp_k[slot, r.past + j] = b.k[start + offset]
                    exp_v[slot, r.past + j] = b.v[start + offset]
    owned_by_valid = torch.zeros(b.q.shape[0], dtype=torch.bool)
    for i in valid:
        owned_by_valid[b.starts[i] : b.starts[i] + rows[i].n] = True
    assert (out[~owned_by_valid] == 0).all(), "an invalid row's tokens must be zeros"
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v), "an invalid row must write nothing"


@pytest.mark.parametrize(
    "row,status",
    [
        (Row(CAUSAL, 0, 2, 17), native.ERR_OUT_OF_RANGE),  # p_b > L
        (Row(CAUSAL, 0, 2, -1), native.ERR_OUT_OF_RANGE),
        (Row(CAUSAL, 0, 3, 14, True), native.ERR_OUT_OF_RANGE),  # the write would pass L
        (Row(QUAD, 2, 6, 15, True), native.ERR_OUT_OF_RANGE),  # quad writes L = 2 tokens: 15 + 2 > 16
        (Row(PREFIX_BLOCK, 1, 4, 14, True), native.ERR_OUT_OF_RANGE),  # writes 3 tokens
    ],
)
def test_cpu_library_checks_cache_ranges(row, status):
    lib = require("cpu")
    b = make_batch(0, torch.float32, 4, 2, 64, [row], capacity=16)
    out = torch.empty_like(b.q)
    params = native.make_params(b.q, b.k, b.v, b.k_cache, b.v_cache, *b.arrays(), out, 0.1, b.q.shape[0])
    assert lib.run(params) == status


def test_cpu_library_checks_cache_length_against_max_cache_len_and_shared_writing_slots():
    lib = require("cpu")
    b = make_batch(0, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 2, 9, True), Row(CAUSAL, 0, 1, 3)], capacity=16)
    out = torch.empty_like(b.q)
    params = native.make_params(b.q, b.k, b.v, b.k_cache, b.v_cache, *b.arrays(), out, 0.1, 2, max_cache_len=8)
    assert lib.run(params) == native.ERR_OUT_OF_RANGE
    params.max_cache_len = 9
    assert lib.run(params) == native.OK
    b.slots[1] = b.slots[0]  # a writing row's slot read by another row: order-dependent, rejected
    assert lib.run(params) == native.ERR_OUT_OF_RANGE
    b.write[0] = 0
    assert lib.run(params) == native.OK  # two readers of one slot are fine


def test_emulated_kernel_clamps_cache_data():
    """p_b is clamped to [0, L] on the device and writes past L are dropped (the CPU library rejects both)."""
    require("emu")
    rows = [Row(CAUSAL, 0, 3, 14, True), Row(QUAD, 1, 2, 99, True), Row(CAUSAL, 0, 1, -5, True)]
    b = make_batch(4, torch.float32, 4, 2, 64, rows, capacity=16)
    out, k_cache, v_cache = run_library("emu", b, 0.125)
    assert torch.isfinite(out).all()
    s0, s1, s2 = b.slots.tolist()
    assert torch.equal(k_cache[s0, 14:16], b.k[0:2]) and torch.equal(k_cache[s0, :14], b.k_cache[s0, :14])
    assert torch.equal(k_cache[s1], b.k_cache[s1]), "p_b clamped to L: the write is dropped"
    assert torch.equal(k_cache[s2, 0], b.k[5]) and torch.equal(k_cache[s2, 1:], b.k_cache[s2, 1:])
    clamped = Batch(**{**b.__dict__, "cache_lens": i32([14, 16, 0])})
    want = block_attention_reference(b.q, b.k, b.v, b.k_cache.clone(), b.v_cache.clone(),
                                     *Batch(**{**clamped.__dict__, "write": i32([0, 0, 0])}).arrays(), 0.125)
    assert rel_err(out, want) < 1e-5


# ---- parameters -------------------------------------------------------------------------------------------


def _params(b: Batch, out: torch.Tensor, **overrides) -> native.Params:
    params = native.make_params(b.q, b.k, b.v, b.k_cache, b.v_cache, *b.arrays(), out, 0.125, 3)
    for name, value in overrides.items():
        setattr(params, name, value)
    return params


@pytest.mark.parametrize(
    "field_name,value,status",
    [
        ("num_kv_heads", 3, native.ERR_GQA),  # 4 query heads are not a multiple of 3
        ("head_dim", 96, native.ERR_HEAD_DIM),
        ("dtype", 9, native.ERR_DTYPE),
        ("abi_version", 2, native.ERR_ABI),
        ("num_rows", 0, native.ERR_INVALID_SHAPE),
        ("num_tokens", 0, native.ERR_INVALID_SHAPE),
        ("max_chunk", 0, native.ERR_INVALID_SHAPE),
        ("max_chunk", 4, native.ERR_INVALID_SHAPE),  # > N
        ("max_cache_len", 1000, native.ERR_INVALID_SHAPE),
        ("max_cache_len", -1, native.ERR_INVALID_SHAPE),
        ("q", None, native.ERR_NULL_POINTER),
        ("cu_seqlens", None, native.ERR_NULL_POINTER),
        ("mask_kind", None, native.ERR_NULL_POINTER),
        ("mask_param", None, native.ERR_NULL_POINTER),
        ("slots", None, native.ERR_NULL_POINTER),
    ],
)
def test_invalid_calls_return_status_codes(kind, field_name, value, status):
    b = make_batch(0, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 3, 3)])
    out = torch.full_like(b.q, 7.0)
    lib = native.load(kind)
    got = lib.run(_params(b, out, **{field_name: value}))
    assert got == status, lib.error_string(got)
    assert lib.error_string(got) and lib.error_string(got) != "unknown trimode status"
    assert (out == 7.0).all(), "a rejected call must not touch the output"


def test_write_may_be_null(kind):
    """write = NULL (the TensorRT plugin): no row writes, even rows whose kind could."""
    b = make_batch(2, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 3, 3, True), Row(QUAD, 1, 2, 0, True)])
    out = torch.empty_like(b.q)
    k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
    params = native.make_params(b.q, b.k, b.v, k_cache, v_cache, *b.arrays()[:5], None, out, 0.125, 3)
    native.load(kind).check(params)
    assert torch.equal(k_cache, b.k_cache) and torch.equal(v_cache, b.v_cache)
    want = block_attention_reference(b.q, b.k, b.v, b.k_cache.clone(), b.v_cache.clone(), *b.arrays(), 0.125)
    assert rel_err(out, want) < 1e-5


def test_misaligned_pointer_is_rejected(kind):
    b = make_batch(0, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 3, 3)])
    out = torch.empty_like(b.q)
    params = _params(b, out)
    params.q = b.q.data_ptr() + 4
    assert native.load(kind).run(params) == native.ERR_MISALIGNED


def test_cuda_library_loads_and_fails_cleanly_without_a_gpu():
    lib = require("cuda")
    assert lib.handle.trimode_backend_name() == b"cuda"
    b = make_batch(0, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 3, 3)])
    out = torch.empty_like(b.q)
    assert lib.run(_params(b, out, max_chunk=0)) == native.ERR_INVALID_SHAPE
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA run is covered by test_plugin_torch_op.py")
    status = lib.run(_params(b, out))
    assert status == native.ERR_CUDA, lib.error_string(status)
    assert "cuda" in lib.error_string(status).lower()


def test_load_reports_a_missing_library(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "BUILD_DIR", tmp_path)
    monkeypatch.setattr(native, "_LOADED", {})
    with pytest.raises(native.PluginNotBuiltError, match="make -C"):
        native.load("cpu")


def test_require_fails_for_a_missing_library_when_a_compiler_exists(monkeypatch, tmp_path):
    """The issue-16 rule itself: missing + compiler = failure; missing + no compiler = skip with the reason."""
    monkeypatch.setattr(native, "BUILD_DIR", tmp_path)
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "toolchain", lambda kind: "/usr/bin/g++")
    with pytest.raises(pytest.fail.Exception, match="not built although /usr/bin/g\\+\\+ is on PATH"):
        require("cpu")
    monkeypatch.setattr(native, "toolchain", lambda kind: None)
    with pytest.raises(pytest.skip.Exception, match="cannot build it"):
        require("cpu")


# ---- the TensorRT plugin's host check and the ASan run -----------------------------------------------------


@pytest.mark.skipif(
    not os.environ.get("TRT_INCLUDE"),
    reason="set TRT_INCLUDE=/path/to/TensorRT/include to compile and run the TensorRT plugin's host check",
)
def test_tensorrt_plugin_host_check():
    plugins = Path(native.__file__).resolve().parent
    result = subprocess.run(
        ["make", "-C", str(plugins), "tensorrt-check", f"TRT_INCLUDE={os.environ['TRT_INCLUDE']}"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "PASSED" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the CUDA emulation is x86-64 only")
def test_emulated_kernels_are_memory_safe():
    """Exact-size buffers + poisoned shared memory under ASan/UBSan, all four kinds and invalid rows."""
    if native.toolchain("emu") is None:
        pytest.skip("no g++ on PATH: the ASan build needs it")
    plugins = Path(native.__file__).resolve().parent
    result = subprocess.run(["make", "-C", str(plugins), "emu-asan-check"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "PASSED" in result.stdout
