"""The block attention C API (plugins/csrc/block_attention.h, ABI 4: a paged cache) through ctypes, against two
oracles.

Two host-pointer libraries implement the API and are checked the same way:
* ``cpu``: the C++ reference (block_attention_cpu.cpp);
* ``emu``: the CUDA kernel source (block_attention_kernels.cuh) compiled for the CPU against the CUDA
  emulation in plugins/csrc/emulation, so the kernel's tiling, GQA packing, per-row masks, page lookups, online
  softmax, split/combine and cache writes run here even without a GPU.
Every result is compared with BOTH `reference.block_attention_reference` (the contract) and an independent
dense oracle: `reference.dense_attention` over each row's cached positions gathered through its page table in
this file (not with `reference.row_positions`) plus its chunk keys, with a mask built in this file from each
kind's definition (`hand_mask`, not `chunk_mask`). Caches are compared byte for byte, so pages no row writes
(and the positions of written pages below p_b) must come back unchanged.

Page tables are shuffled (a row's pages are scattered over the pool, never in order), their unused entries hold
garbage (-1, ids past the pool), and some calls share read-only prefix pages between rows.

A library that is not built FAILS its tests when the compiler that builds it is on PATH (it would otherwise
skip silently, issue 16); it skips, with the reason, only where no such compiler exists.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field, replace
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
GARBAGE = (-1, 1 << 30, -(1 << 31), 7_000_000)  # what unused page-table entries hold: never read


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
    assert lib.handle.trimode_abi_version() == native.ABI_VERSION == 4
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
    pages: list[int] | None = None  # explicit first page-table entries; None: fresh pages from the pool

    def written(self) -> int:
        return len(written_offsets(self.kind, self.param, self.n)) if self.write and self.n > 0 else 0


@dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor  # [P, S, Hkv, D]
    v_cache: torch.Tensor
    rows: list[Row]
    starts: list[int]
    cu_seqlens: torch.Tensor
    page_table: torch.Tensor  # [B, T]
    cache_lens: torch.Tensor
    mask_kind: torch.Tensor
    mask_param: torch.Tensor
    write: torch.Tensor
    extra: dict = field(default_factory=dict)

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[1]

    def arrays(self) -> tuple[torch.Tensor, ...]:
        return self.cu_seqlens, self.page_table, self.cache_lens, self.mask_kind, self.mask_param, self.write


def i32(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32)


def pages_needed(r: Row, page_size: int) -> int:
    """ceil((p_b + w_b) / S), written here from the contract (not reference.pages_used)."""
    positions = r.past + r.written()
    return (positions + page_size - 1) // page_size


def make_batch(seed: int, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, rows: list[Row],
               page_size: int = 16, pages_per_row: int | None = None, extra_pages: int = 3,
               share: tuple[tuple[int, int, int], ...] = (), num_pages: int | None = None,
               contiguous: bool = False) -> Batch:
    """Random tensors for `rows` packed end to end, over a pool of pages.

    Rows without explicit pages get their own pages, drawn from a shuffled pool (or, with `contiguous`, in pool
    order, like the former slot layout). `share` entries (src, dst, count) make row dst's first `count` entries
    those of row src (a common prefix both read). Unused entries hold garbage. `extra_pages` pages belong to no
    row (they must come back unchanged).
    """
    gen = torch.Generator().manual_seed(seed)
    starts, pos = [], 0
    for r in rows:
        starts.append(pos)
        pos += r.n
    tokens = max(pos, 1)
    shared = {dst: (src, count) for src, dst, count in share}
    fresh = [pages_needed(r, page_size) - shared.get(b, (0, 0))[1] if r.pages is None else 0
             for b, r in enumerate(rows)]
    explicit = [p for r in rows if r.pages is not None for p in r.pages if p >= 0]
    pool = num_pages if num_pages is not None else max([sum(fresh) + extra_pages, *(p + 1 for p in explicit)])
    taken = set(explicit)
    order = torch.randperm(pool, generator=gen).tolist()
    if contiguous:
        order.sort()
    free = [p for p in order if p not in taken]
    tables: list[list[int]] = []
    for b, r in enumerate(rows):
        if r.pages is not None:
            tables.append(list(r.pages))
            continue
        src, count = shared.get(b, (0, 0))
        table = tables[src][:count] if count else []
        table += [free.pop(0) for _ in range(fresh[b])]
        tables.append(table)
    width = pages_per_row or max(1, *(len(t) for t in tables))
    for b, table in enumerate(tables):
        table += [GARBAGE[(b + e) % len(GARBAGE)] for e in range(width - len(table))]
        del table[width:]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return Batch(
        q=rnd(tokens, heads, head_dim), k=rnd(tokens, kv_heads, head_dim), v=rnd(tokens, kv_heads, head_dim),
        k_cache=rnd(pool, page_size, kv_heads, head_dim), v_cache=rnd(pool, page_size, kv_heads, head_dim),
        rows=rows, starts=starts, cu_seqlens=i32(starts + [pos]),
        page_table=torch.tensor(tables, dtype=torch.int32).reshape(len(rows), width),
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


def gather_cached(b: Batch, row: int, past: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A row's cached K and V (positions 0..past-1, through its page table) and which of them live in a valid
    page (entries past the table or ids outside [0, P) are invalid; their K/V are zeros here)."""
    size, pool, table = b.page_size, b.k_cache.shape[0], b.page_table[row].long()
    positions = torch.arange(past)
    entry = positions // size
    page = torch.full_like(positions, -1)
    inside = entry < table.shape[0]
    page[inside] = table[entry[inside]]
    valid = (page >= 0) & (page < pool)
    safe = torch.where(valid, page, torch.zeros_like(page))
    keys = b.k_cache[safe, positions % size] * valid[:, None, None]
    values = b.v_cache[safe, positions % size] * valid[:, None, None]
    return keys, values, valid


def dense_oracle(b: Batch, scale: float, cache_lens: list[int] | None = None) -> torch.Tensor:
    """Each row by plain masked softmax over [its cache ; its chunk] (fp32), zeros for tokens of no row. Cached
    positions in invalid pages are not visible (the kernel's rule; valid calls have none)."""
    out = torch.zeros(b.q.shape, dtype=torch.float32)
    lens = cache_lens if cache_lens is not None else [r.past for r in b.rows]
    for index, (r, start, past) in enumerate(zip(b.rows, b.starts, lens, strict=True)):
        if r.n == 0:
            continue
        chunk = slice(start, start + r.n)
        cached_k, cached_v, valid = gather_cached(b, index, past)
        keys = torch.cat([cached_k, b.k[chunk]]).float()
        values = torch.cat([cached_v, b.v[chunk]]).float()
        allowed = torch.cat([valid[None, :].expand(r.n, past), hand_mask(r.kind, r.param, r.n)], dim=1)
        out[chunk] = dense_attention(b.q[chunk].float(), keys, values, allowed, scale)
    return out


def expected_caches(b: Batch, cache_lens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches after the call: each writing row's written_offsets tokens at p_b + i through its page table,
    nothing else changed. A position past the table or in an invalid page is dropped (the kernel's rule)."""
    k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
    size, pool = b.page_size, b.k_cache.shape[0]
    lens = cache_lens if cache_lens is not None else [r.past for r in b.rows]
    for index, (r, start, past) in enumerate(zip(b.rows, b.starts, lens, strict=True)):
        if not r.write or r.n == 0:
            continue
        table = b.page_table[index].tolist()
        for i, offset in enumerate(written_offsets(r.kind, r.param, r.n)):
            entry, slot = divmod(past + i, size)
            if entry < len(table) and 0 <= table[entry] < pool:
                k_cache[table[entry], slot] = b.k[start + offset]
                v_cache[table[entry], slot] = b.v[start + offset]
    return k_cache, v_cache


def run_library(kind: str, b: Batch, scale: float, **kwargs):
    """Output and caches of one library call (on copies of the caches)."""
    k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
    out = native.block_attention_host(kind, b.q, b.k, b.v, k_cache, v_cache, *b.arrays(), scale, **kwargs)
    return out, k_cache, v_cache


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def check_call(kind: str, b: Batch, **kwargs) -> float:
    """Runs the library; checks output vs reference and dense oracle, zero tokens, caches byte for byte."""
    scale = b.q.shape[-1] ** -0.5
    got, k_cache, v_cache = run_library(kind, b, scale, **kwargs)
    assert got.dtype == b.q.dtype and got.shape == b.q.shape
    assert torch.isfinite(got).all()
    ref_k, ref_v = b.k_cache.float().clone(), b.v_cache.float().clone()
    want = block_attention_reference(b.q.float(), b.k.float(), b.v.float(), ref_k, ref_v, *b.arrays(), scale)
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


def written_pages(b: Batch) -> set[int]:
    """Pages some row of the call writes."""
    pages = set()
    for index, r in enumerate(b.rows):
        for i in range(r.written()):
            pages.add(int(b.page_table[index, (r.past + i) // b.page_size]))
    return pages


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
# (param, n) of a small row of each kind, for the page tests.
SMALL = {CAUSAL: (0, 7), BIDIRECTIONAL: (0, 5), QUAD: (2, 6), PREFIX_BLOCK: (2, 9)}


@pytest.mark.parametrize("mask_kind", KINDS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_each_kind_fp32_matches_reference_and_dense_oracle(kind, mask_kind, heads, kv_heads, head_dim):
    b = make_batch(mask_kind, torch.float32, heads, kv_heads, head_dim, ROWS[mask_kind], page_size=16)
    assert check_call(kind, b) < 1e-5


@pytest.mark.parametrize("mask_kind", KINDS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_each_kind_over_long_caches(kind, mask_kind, head_dim):
    """Cache lengths up to 2048 over 128 shuffled pages each (many key tiles; split-K in the emulated kernel)."""
    param, n = {CAUSAL: (0, 3), BIDIRECTIONAL: (0, 5), QUAD: (3, 12), PREFIX_BLOCK: (4, 10)}[mask_kind]
    write = mask_kind != BIDIRECTIONAL
    rows = [Row(mask_kind, param, n, 2048 - n, write), Row(mask_kind, param, n, 1000), Row(mask_kind, param, n, 0)]
    b = make_batch(10 + mask_kind, torch.float32, 8, 2, head_dim, rows, page_size=16, pages_per_row=128)
    assert b.page_table.shape == (3, 128)
    assert check_call(kind, b) < 1e-5


def page_rows(mask_kind: int, size: int) -> list[Row]:
    """Rows whose cache ends just before a page boundary (a write spans it), exactly on one (a write opens a
    fresh page), inside a page (a write lands in a partially filled last page), or at 0."""
    param, n = SMALL[mask_kind]
    write = mask_kind != BIDIRECTIONAL
    return [Row(mask_kind, param, n, 2 * size - 1, write), Row(mask_kind, param, n, size, write),
            Row(mask_kind, param, n, 3 * size + size // 2, write), Row(mask_kind, param, n, 0, write),
            Row(mask_kind, param, n, 2 * size + 1)]


@pytest.mark.parametrize("mask_kind", KINDS)
@pytest.mark.parametrize("page_size", [1, 5, 16, 24])
def test_page_sizes_and_writes_across_page_boundaries(kind, mask_kind, page_size):
    b = make_batch(30 + page_size, torch.float32, 8, 2, 64, page_rows(mask_kind, page_size), page_size=page_size)
    assert check_call(kind, b) < 1e-5
    if mask_kind != BIDIRECTIONAL:  # the writes really cross pages / start mid-page
        written = [(r.past % page_size, (r.past + r.written() - 1) // page_size - r.past // page_size)
                   for r in b.rows if r.written()]
        assert any(crossed > 0 for _, crossed in written)
        assert page_size == 1 or any(offset > 0 for offset, _ in written)


@pytest.mark.parametrize("page_size", [5, 16])
@pytest.mark.parametrize("mask_kind", KINDS)
def test_rows_sharing_prefix_pages(kind, mask_kind, page_size):
    """Three rows read one common prefix through the same pages (a shared prompt): row 1 shares row 0's first
    two pages, row 2 its first three; rows 0 and 1 write into their own later pages. Each row equals the
    oracles, and the shared pages come back byte for byte."""
    param, n = SMALL[mask_kind]
    write = mask_kind != BIDIRECTIONAL
    size = page_size
    rows = [Row(mask_kind, param, n, 3 * size + 2, write), Row(mask_kind, param, n, 2 * size + 3, write),
            Row(mask_kind, param, n, 3 * size)]
    b = make_batch(40 + mask_kind, torch.float32, 8, 2, 64, rows, page_size=size, share=((0, 1, 2), (0, 2, 3)))
    assert torch.equal(b.page_table[1, :2], b.page_table[0, :2])
    assert torch.equal(b.page_table[2, :3], b.page_table[0, :3])
    assert check_call(kind, b) < 1e-5
    _, k_cache, v_cache = run_library(kind, b, 0.125)
    for page in b.page_table[0, :3].tolist():
        assert torch.equal(k_cache[page], b.k_cache[page]) and torch.equal(v_cache[page], b.v_cache[page])
    assert not written_pages(b) & set(b.page_table[0, :3].tolist())


def relocate(b: Batch, seed: int) -> Batch:
    """The same call with every page moved to another place in a larger pool (and the tables following)."""
    pool = b.k_cache.shape[0]
    gen = torch.Generator().manual_seed(seed)
    target = torch.randperm(pool + 4, generator=gen)[:pool]  # page p moves to target[p]
    k_cache = torch.randn(pool + 4, *b.k_cache.shape[1:], generator=gen).to(b.k_cache.dtype)
    v_cache = torch.randn(pool + 4, *b.v_cache.shape[1:], generator=gen).to(b.v_cache.dtype)
    k_cache[target], v_cache[target] = b.k_cache, b.v_cache
    table = b.page_table.long()
    used = (table >= 0) & (table < pool)
    moved = torch.where(used, target[table.clamp(0, pool - 1)], table).to(torch.int32)
    return replace(b, k_cache=k_cache, v_cache=v_cache, page_table=moved, extra={"target": target})


@pytest.mark.parametrize("sm_count", [8, 64])
def test_result_does_not_depend_on_where_pages_live(kind, sm_count):
    """The same pages moved elsewhere in a larger pool (the tables following) give bit-identical outputs, and
    the writes follow the pages: from contiguous tables (the former slot layout) to shuffled ones, and from
    shuffled ones to others."""
    if kind == "emu":
        native.emu_set_sm_count(sm_count)
    rows = [Row(CAUSAL, 0, 5, 37, True), Row(QUAD, 2, 6, 16, True), Row(BIDIRECTIONAL, 0, 4, 70),
            Row(PREFIX_BLOCK, 2, 6, 0, True)]
    for contiguous in (True, False):
        b = make_batch(50, torch.float32, 8, 2, 64, rows, page_size=8, contiguous=contiguous)
        assert check_call(kind, b) < 1e-5
        out, k_cache, v_cache = run_library(kind, b, 0.125)
        moved = relocate(b, 51)
        out_moved, k_moved, v_moved = run_library(kind, moved, 0.125)
        assert torch.equal(out, out_moved)
        target = moved.extra["target"]
        assert torch.equal(k_moved[target], k_cache) and torch.equal(v_moved[target], v_cache)
        elsewhere = torch.ones(k_moved.shape[0], dtype=torch.bool)
        elsewhere[target] = False
        assert torch.equal(k_moved[elsewhere], moved.k_cache[elsewhere])


MIXED = [Row(CAUSAL, 0, 1, 40, True), Row(QUAD, 2, 6, 17, True), Row(BIDIRECTIONAL, 0, 8, 5),
         Row(PREFIX_BLOCK, 3, 11, 0, True), Row(CAUSAL, 0, 19, 0, True), Row(QUAD, 3, 12, 70),
         Row(PREFIX_BLOCK, 2, 6, 33), Row(BIDIRECTIONAL, 0, 1, 0), Row(CAUSAL, 0, 0, 12, True)]


def single_row(b: Batch, index: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> Batch:
    """Row `index` of a batch as a call of its own (same page table row, the given caches)."""
    r, start = b.rows[index], b.starts[index]
    chunk = slice(start, start + r.n)
    return Batch(q=b.q[chunk].contiguous(), k=b.k[chunk].contiguous(), v=b.v[chunk].contiguous(),
                 k_cache=k_cache, v_cache=v_cache, rows=[r], starts=[0], cu_seqlens=i32([0, r.n]),
                 page_table=b.page_table[index : index + 1].clone(), cache_lens=i32([r.past]),
                 mask_kind=i32([r.kind]), mask_param=i32([r.param]), write=i32([int(r.write)]))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_mixed_call_equals_each_row_alone(kind, head_dim, heads, kv_heads):
    """Rows of all four kinds (and an empty row) in one call: each row's output and writes are what it gives
    alone, so batching never changes a result."""
    b = make_batch(21, torch.float32, heads, kv_heads, head_dim, MIXED, page_size=16)
    scale = head_dim**-0.5
    assert check_call(kind, b) < 1e-5
    together, k_together, v_together = run_library(kind, b, scale)
    k_alone, v_alone = b.k_cache.clone(), b.v_cache.clone()
    for index, r in enumerate(b.rows):
        if r.n == 0:
            continue
        chunk = slice(b.starts[index], b.starts[index] + r.n)
        alone, k_alone, v_alone = run_library(kind, single_row(b, index, k_alone, v_alone), scale)
        assert rel_err(together[chunk], alone) < 1e-5, r
    assert torch.equal(k_together, k_alone) and torch.equal(v_together, v_alone)


def test_tokens_owned_by_no_row_are_zero(kind):
    """cu_seqlens need not cover [0, N): tokens before the first row, between rows (as empty rows) and after
    the last are zeros."""
    rows = [Row(CAUSAL, 0, 0, 3), Row(QUAD, 1, 2, 4, True), Row(PREFIX_BLOCK, 1, 3, 0, True)]
    b = make_batch(5, torch.float32, 4, 2, 64, rows, page_size=4)
    n = b.q.shape[0]
    q = torch.cat([torch.randn(2, 4, 64), b.q, torch.randn(3, 4, 64)])
    k = torch.cat([torch.randn(2, 2, 64), b.k, torch.randn(3, 2, 64)])
    v = torch.cat([torch.randn(2, 2, 64), b.v, torch.randn(3, 2, 64)])
    shifted = replace(b, q=q, k=k, v=v, starts=[s + 2 for s in b.starts], cu_seqlens=b.cu_seqlens + 2)
    assert shifted.q.shape[0] == n + 5
    check_call(kind, shifted)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_half_precision_matches_reference_and_dense_oracle(kind, dtype, head_dim):
    b = make_batch(100, dtype, 8, 2, head_dim, MIXED, page_size=24)
    assert check_call(kind, b) < TOLERANCE[dtype]


@pytest.mark.parametrize("mask_kind", KINDS)
def test_each_key_moves_exactly_the_queries_that_may_see_it(kind, mask_kind):
    """Perturbing chunk key s changes output token t iff the kind lets t see s: the mask's structure, column by
    column (for quad: a mask token's key moves only its own sub-block's masks; d_j's key moves every token of
    sub-blocks >= j). Perturbing a cached position moves every token."""
    param, n = {CAUSAL: (0, 6), BIDIRECTIONAL: (0, 6), QUAD: (2, 6), PREFIX_BLOCK: (2, 6)}[mask_kind]
    b = make_batch(7, torch.float32, 4, 2, 64, [Row(mask_kind, param, n, 10)], page_size=3)
    before = run_library(kind, b, 0.125)[0]
    allowed = hand_mask(mask_kind, param, n)
    for s in range(n):
        changed = replace(b, k=b.k.clone())
        changed.k[s] += 3.0
        after = run_library(kind, changed, 0.125)[0]
        moved = [t for t in range(n) if not torch.equal(before[t], after[t])]
        assert moved == [t for t in range(n) if allowed[t, s]], (mask_kind, s, moved)
    for position in (0, 4, 9):  # through the page table: entry position // 3, offset position % 3
        changed = replace(b, k_cache=b.k_cache.clone())
        changed.k_cache[int(b.page_table[0, position // 3]), position % 3] += 3.0
        after = run_library(kind, changed, 0.125)[0]
        assert all(not torch.equal(before[t], after[t]) for t in range(n)), position


@pytest.mark.parametrize("sm_count", [1, 8, 64, 1000])
def test_kernel_split_plans_agree(sm_count):
    """The emulated kernel gives the oracles' result whether the key range is split (flash decoding + combine
    kernel) or not; the SM count is what decides the split plan."""
    require("emu")
    native.emu_set_sm_count(sm_count)
    rows = [Row(CAUSAL, 0, 1, 250, True), Row(QUAD, 2, 6, 131, True), Row(BIDIRECTIONAL, 0, 3, 0),
            Row(PREFIX_BLOCK, 1, 2, 300, True)]
    b = make_batch(7, torch.float32, 8, 2, 64, rows, page_size=24)
    assert check_call("emu", b) < 1e-5


def test_kernel_splits_when_the_grid_is_small():
    lib = require("emu")
    native.emu_set_sm_count(64)
    b = make_batch(1, torch.bfloat16, 8, 2, 128, [Row(CAUSAL, 0, 1, 300)], page_size=16, pages_per_row=32)
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
    native.emu_set_sm_count(64)
    params.max_cache_len = 0
    params.pages_per_row = 4  # 0 means T * S: a shorter table is a tighter bound as well
    assert lib.workspace_size(params) < full


def test_kernel_with_too_small_a_workspace_uses_fewer_splits():
    """A workspace smaller than asked for only means fewer splits, never a wrong result or an overrun."""
    lib = require("emu")
    native.emu_set_sm_count(64)
    b = make_batch(3, torch.float32, 4, 1, 64, [Row(CAUSAL, 0, 1, 200), Row(QUAD, 1, 2, 90)], page_size=16)
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
    b = make_batch(4, torch.float32, 8, 2, 64, [Row(CAUSAL, 0, 1, 290, True), Row(QUAD, 1, 2, 7)], page_size=16)
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
    _bad([GOOD, Row(QUAD, 1, 2, 0, True)], native.ERR_OUT_OF_RANGE, [0], max_chunk=2),  # n_b > max_chunk
    _bad([GOOD, Row(CAUSAL, 0, 2, 0)], native.ERR_OUT_OF_RANGE, [1], cu=[0, 3, 2]),  # decreasing
    _bad([GOOD, Row(CAUSAL, 0, 2, 0)], native.ERR_OUT_OF_RANGE, [1], cu=[0, 3, 9]),  # past N
    _bad([GOOD, Row(CAUSAL, 0, 2, 0)], native.ERR_OUT_OF_RANGE, [0], cu=[-1, 3, 5]),  # negative
]


@pytest.mark.parametrize("rows,cu,max_chunk,status,empty", INVALID_ROWS)
def test_cpu_library_rejects_invalid_rows(rows, cu, max_chunk, status, empty):
    """The CPU library reads its row arrays, so it returns the status and touches neither output nor cache."""
    lib = require("cpu")
    b = make_batch(0, torch.float32, 4, 2, 64, rows, page_size=4, pages_per_row=4)
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
    b = make_batch(0, torch.float32, 4, 2, 64, rows, page_size=4, pages_per_row=4)
    if cu is not None:
        b.cu_seqlens = i32(cu)
    out, k_cache, v_cache = run_library("emu", b, 0.125, max_chunk=max_chunk or b.q.shape[0])
    valid = [i for i in range(len(rows)) if i not in empty]
    for i in valid:
        one = single_row(b, i, b.k_cache.clone(), b.v_cache.clone())
        assert check_call("emu", one) < 1e-5
        chunk = slice(b.starts[i], b.starts[i] + rows[i].n)
        assert torch.equal(out[chunk], run_library("emu", one, 0.125)[0])
    only_valid = replace(b, rows=[replace(r, write=r.write and i in valid) for i, r in enumerate(rows)])
    exp_k, exp_v = expected_caches(only_valid)
    owned_by_valid = torch.zeros(b.q.shape[0], dtype=torch.bool)
    for i in valid:
        owned_by_valid[b.starts[i] : b.starts[i] + rows[i].n] = True
    assert (out[~owned_by_valid] == 0).all(), "an invalid row's tokens must be zeros"
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v), "an invalid row must write nothing"


# ---- page data ---------------------------------------------------------------------------------------------

# Page size 4 throughout; (rows, pages_per_row, num_pages, CPU status). Entries a row does not use are garbage.
BAD_PAGES = [
    pytest.param([Row(CAUSAL, 0, 2, 5, pages=[0, -1])], 2, 4, native.ERR_OUT_OF_RANGE, id="read-page--1"),
    pytest.param([Row(CAUSAL, 0, 2, 5, pages=[1, 4])], 2, 4, native.ERR_OUT_OF_RANGE, id="read-page-P"),
    pytest.param([GOOD, Row(QUAD, 1, 2, 9, pages=[2, 3, -(1 << 31)])], 3, 4, native.ERR_OUT_OF_RANGE,
                 id="read-page-int-min"),
    pytest.param([Row(CAUSAL, 0, 2, 3, True, pages=[0, 9])], 2, 4, native.ERR_OUT_OF_RANGE, id="write-page-P"),
    pytest.param([Row(CAUSAL, 0, 3, 6, True, pages=[0, 1])], 2, 4, native.ERR_OUT_OF_RANGE,
                 id="write-past-T*S"),
    pytest.param([Row(CAUSAL, 0, 1, 9, pages=[0, 1])], 2, 4, native.ERR_OUT_OF_RANGE, id="past-beyond-T*S"),
    pytest.param([Row(CAUSAL, 0, 2, 5, True, pages=[0, 1]), Row(CAUSAL, 0, 1, 6, pages=[2, 1])], 2, 4,
                 native.ERR_OUT_OF_RANGE, id="written-page-read-by-another-row"),
    pytest.param([Row(BIDIRECTIONAL, 0, 1, 6, pages=[2, 1]), Row(QUAD, 1, 2, 4, True, pages=[0, 1])], 2, 4,
                 native.ERR_OUT_OF_RANGE, id="written-page-read-by-an-earlier-row"),
    pytest.param([Row(CAUSAL, 0, 2, 5, True, pages=[0, 1]), Row(CAUSAL, 0, 2, 6, True, pages=[2, 1])], 2, 4,
                 native.ERR_OUT_OF_RANGE, id="two-rows-write-one-page"),
    pytest.param([Row(CAUSAL, 0, 2, 5, True, pages=[1, 1])], 2, 4, native.ERR_OUT_OF_RANGE,
                 id="written-page-twice-in-one-table"),
    # accepted: garbage in unused entries, an empty row's pages, pages shared by readers only, a page an empty
    # row names while another row writes it, a read page listed twice
    pytest.param([Row(CAUSAL, 0, 2, 1, True, pages=[3, -5, 77])], 3, 4, native.OK, id="garbage-unused-entries"),
    pytest.param([Row(CAUSAL, 0, 0, 7, True, pages=[-1, 9]), GOOD], 2, 4, native.OK, id="empty-row-bad-pages"),
    pytest.param([Row(CAUSAL, 0, 2, 8, pages=[0, 1]), Row(QUAD, 1, 2, 5, pages=[0, 1])], 2, 4, native.OK,
                 id="readers-share-pages"),
    pytest.param([Row(CAUSAL, 0, 0, 5, pages=[2, 3]), Row(CAUSAL, 0, 2, 5, True, pages=[2, 3])], 2, 4,
                 native.OK, id="empty-row-names-a-written-page"),
    pytest.param([Row(BIDIRECTIONAL, 0, 2, 8, pages=[1, 1])], 2, 4, native.OK, id="read-page-twice"),
]


@pytest.mark.parametrize("rows,pages_per_row,num_pages,status", BAD_PAGES)
def test_cpu_library_checks_page_data(rows, pages_per_row, num_pages, status):
    """Bad page data is reported (status 9) before anything is written; what the contract allows passes."""
    lib = require("cpu")
    b = make_batch(0, torch.float32, 4, 2, 64, rows, page_size=4, pages_per_row=pages_per_row,
                   num_pages=num_pages)
    out = torch.full_like(b.q, 7.0)
    k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
    params = native.make_params(b.q, b.k, b.v, k_cache, v_cache, *b.arrays(), out, 0.125, b.q.shape[0])
    got = lib.run(params)
    assert got == status, lib.error_string(got)
    if status != native.OK:
        assert (out == 7.0).all(), "a rejected call must not touch the output"
        assert torch.equal(k_cache, b.k_cache) and torch.equal(v_cache, b.v_cache), "nor the caches"
        assert "page" in lib.error_string(got)
    else:
        check_call("cpu", b)


# Page size 4, T = 4, P = 15: rows whose tables hold bad page ids among the entries they use.
BAD_PAGE_ROWS = [
    Row(CAUSAL, 0, 3, 10, True, pages=[5, -1, 2, 7]),  # positions 4..7 hidden; writes 10..12 to pages 2 and 7
    Row(QUAD, 2, 6, 13, True, pages=[0, 1 << 30, 1, 15]),  # 4..7 and 12 hidden; the drafts' page 15 = P: dropped
    Row(BIDIRECTIONAL, 0, 4, 16, pages=[3, 4, -(1 << 31), 6]),  # positions 8..11 hidden
    Row(PREFIX_BLOCK, 2, 7, 12, True, pages=[9, 10, 11, 12]),  # writes 5 tokens: 12..15 kept, 16 past T*S
    Row(CAUSAL, 0, 2, 6, True, pages=[13, 14, -7, 99]),  # all valid (entries 2, 3 unused)
]


@pytest.mark.parametrize("sm_count", [1, 64])
def test_emulated_kernel_hides_keys_in_bad_pages_and_drops_their_writes(sm_count):
    """The kernel cannot report device data: a cached position whose page id is outside [0, P) is not visible
    (never read), a write into such a page or past T*S is dropped, and every other key, row and write of the
    same call is exact (compared with the dense oracle that leaves those keys out)."""
    require("emu")
    native.emu_set_sm_count(sm_count)
    rows = BAD_PAGE_ROWS
    b = make_batch(60, torch.float32, 8, 2, 64, rows, page_size=4, pages_per_row=4, num_pages=15)
    out, k_cache, v_cache = run_library("emu", b, 0.125)
    want = dense_oracle(b, 0.125)
    for r, start in zip(rows, b.starts, strict=True):
        chunk = slice(start, start + r.n)
        assert rel_err(out[chunk], want[chunk]) < 1e-5, r
    exp_k, exp_v = expected_caches(b)  # drops the writes to page 8 (>= P) and to position 16 (entry 4 >= T)
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)
    assert torch.equal(k_cache[7, 0], b.k[2]) and torch.equal(k_cache[7, 1:], b.k_cache[7, 1:])
    # The hidden positions really are left out: a valid table gives a different result for those rows.
    fixed = replace(b, page_table=torch.tensor([[5, 0, 2, 7], [0, 3, 1, 8], [3, 4, 5, 6], [9, 10, 11, 12],
                                                [13, 14, 0, 0]], dtype=torch.int32))
    other = run_library("emu", fixed, 0.125)[0]
    for index in (0, 1, 2):
        chunk = slice(b.starts[index], b.starts[index] + rows[index].n)
        assert not torch.equal(out[chunk], other[chunk]), index
    if native.is_built("cpu"):
        assert native.load("cpu").run(native.make_params(b.q, b.k, b.v, b.k_cache.clone(), b.v_cache.clone(),
                                                         *b.arrays(), torch.empty_like(b.q), 0.125,
                                                         b.q.shape[0])) == native.ERR_OUT_OF_RANGE


def test_cpu_library_checks_cache_length_against_max_cache_len():
    lib = require("cpu")
    b = make_batch(0, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 2, 9, True), Row(CAUSAL, 0, 1, 3)], page_size=4)
    out = torch.empty_like(b.q)
    params = native.make_params(b.q, b.k, b.v, b.k_cache, b.v_cache, *b.arrays(), out, 0.1, 2, max_cache_len=8)
    assert lib.run(params) == native.ERR_OUT_OF_RANGE
    params.max_cache_len = 9
    assert lib.run(params) == native.OK
    b.cache_lens[1] = -1
    assert lib.run(params) == native.ERR_OUT_OF_RANGE


def test_emulated_kernel_clamps_cache_data():
    """p_b is clamped to [0, T*S] on the device and writes past T*S are dropped (the CPU library rejects both)."""
    require("emu")
    rows = [Row(CAUSAL, 0, 3, 14, True, pages=[3, 0, 7, 10]), Row(QUAD, 1, 2, 99, True, pages=[1, 5, 9, 11]),
            Row(CAUSAL, 0, 1, -5, True, pages=[2, 4, 6, 8])]
    b = make_batch(4, torch.float32, 4, 2, 64, rows, page_size=4, pages_per_row=4, num_pages=12)
    out, k_cache, v_cache = run_library("emu", b, 0.125)
    assert torch.isfinite(out).all()
    clamped = [14, 16, 0]
    exp_k, exp_v = expected_caches(b, clamped)
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)
    assert torch.equal(k_cache[10, 2:], b.k[0:2]), "positions 14, 15 written, 16 dropped"
    assert torch.equal(k_cache[2, 0], b.k[5]), "p_b = -5 is 0"
    assert rel_err(out, dense_oracle(b, 0.125, clamped)) < 1e-5


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
        ("abi_version", 3, native.ERR_ABI),
        ("num_rows", 0, native.ERR_INVALID_SHAPE),
        ("num_tokens", 0, native.ERR_INVALID_SHAPE),
        ("num_pages", 0, native.ERR_INVALID_SHAPE),
        ("page_size", 0, native.ERR_INVALID_SHAPE),
        ("pages_per_row", 0, native.ERR_INVALID_SHAPE),
        ("pages_per_row", -2, native.ERR_INVALID_SHAPE),
        ("pages_per_row", (1 << 30) // 16 + 1, native.ERR_INVALID_SHAPE),  # T * S > 2^30
        ("num_pages", (1 << 31) // 16, native.ERR_INVALID_SHAPE),  # P * S = 2^31: pool rows are int32
        ("max_chunk", 0, native.ERR_INVALID_SHAPE),
        ("max_chunk", 4, native.ERR_INVALID_SHAPE),  # > N
        ("max_cache_len", 33, native.ERR_INVALID_SHAPE),  # > T * S = 2 * 16
        ("max_cache_len", -1, native.ERR_INVALID_SHAPE),
        ("q", None, native.ERR_NULL_POINTER),
        ("cu_seqlens", None, native.ERR_NULL_POINTER),
        ("mask_kind", None, native.ERR_NULL_POINTER),
        ("mask_param", None, native.ERR_NULL_POINTER),
        ("page_table", None, native.ERR_NULL_POINTER),
    ],
)
def test_invalid_calls_return_status_codes(kind, field_name, value, status):
    b = make_batch(0, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 3, 3)], page_size=16, pages_per_row=2)
    out = torch.full_like(b.q, 7.0)
    lib = native.load(kind)
    assert lib.run(_params(b, out, max_cache_len=32)) == native.OK
    out.fill_(7.0)
    got = lib.run(_params(b, out, **{field_name: value}))
    assert got == status, lib.error_string(got)
    assert lib.error_string(got) and lib.error_string(got) != "unknown trimode status"
    assert (out == 7.0).all(), "a rejected call must not touch the output"


def test_make_params_reads_the_page_table_shape():
    b = make_batch(0, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 3, 3), Row(QUAD, 1, 2, 0)], page_size=16,
                   pages_per_row=5)
    params = _params(b, torch.empty_like(b.q))
    assert (params.num_rows, params.pages_per_row) == (2, 5)
    assert (params.num_pages, params.page_size) == tuple(b.k_cache.shape[:2])
    with pytest.raises(ValueError, match="page_table must be"):
        native.make_params(b.q, b.k, b.v, b.k_cache, b.v_cache, b.cu_seqlens, b.page_table[:, 0],
                           *b.arrays()[2:], b.q, 0.1, 3)


def test_write_may_be_null(kind):
    """write = NULL (the TensorRT plugin): no row writes, even rows whose kind could."""
    b = make_batch(2, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 3, 3, True), Row(QUAD, 1, 2, 0, True)], page_size=2)
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
    assert lib.run(_params(b, out, pages_per_row=0)) == native.ERR_INVALID_SHAPE
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
    """Exact-size buffers + poisoned shared memory under ASan/UBSan: all four kinds, page sizes 1/5/16/24,
    shared pages, bad page ids, tables too short for the writes, invalid rows."""
    if native.toolchain("emu") is None:
        pytest.skip("no g++ on PATH: the ASan build needs it")
    plugins = Path(native.__file__).resolve().parent
    result = subprocess.run(["make", "-C", str(plugins), "emu-asan-check"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "PASSED" in result.stdout
