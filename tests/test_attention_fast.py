"""The CPU engine's fast attention == the plain reference == a dense-mask oracle, for every mask kind."""

from __future__ import annotations

import pytest
import torch

from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL, PREFIX_BLOCK, QUAD, written_offsets
from trimode.plugins.reference import block_attention_reference, dense_attention
from trimode.runtime.model.attention import AttentionRows, attend_cpu


def hand_mask(kind: int, param: int, n: int) -> torch.Tensor:
    """Each kind's chunk mask written out element by element from its definition (not from chunk_mask)."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for t in range(n):
        for s in range(n):
            if kind == CAUSAL:
                allowed[t, s] = s <= t
            elif kind == BIDIRECTIONAL:
                allowed[t, s] = True
            elif kind == PREFIX_BLOCK:
                allowed[t, s] = s <= t or t >= n - param
            else:  # quad: sub-block j = [d_j, L masks]
                j, o = divmod(t, param + 1)
                k, o2 = divmod(s, param + 1)
                allowed[t, s] = (o2 == 0 and k <= j) or (o > 0 and k == j)
    return allowed


def make_rows(specs, heads: int, kv_heads: int, dim: int, page_size: int = 16, pages: int = 200, seed: int = 0,
              shared: int = 0):
    """specs: (cache_len, n, kind, param, write) per row; returns tensors for both implementations. Each row's
    pages are drawn at random from the pool (non-contiguous, out of order); with `shared` > 0 every row's first
    `shared` pages are the same ones (a common prefix no row writes)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(s[1] for s in specs)
    q = torch.randn(total, heads, dim, generator=g)
    k_new = torch.randn(total, kv_heads, dim, generator=g)
    v_new = torch.randn(total, kv_heads, dim, generator=g)
    k_cache = torch.randn(pages, page_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(pages, page_size, kv_heads, dim, generator=g)
    order = torch.randperm(pages, generator=g).tolist()
    common, order = order[:shared], order[shared:]
    cu, tables = [0], []
    for past, n, kind, param, write in specs:
        cu.append(cu[-1] + n)
        written = len(written_offsets(kind, param, n)) if write else 0
        count = -(-(past + written) // page_size)
        own = count - min(shared, count)
        assert shared == 0 or past >= shared * page_size, "a shared page must be a cached, full one"
        tables.append(common[: count - own] + order[:own])
        order = order[own:]
    rows = AttentionRows(cu, tables, [s[0] for s in specs], [s[2] for s in specs], [s[3] for s in specs],
                         [s[4] for s in specs], page_size, None, max(s[1] for s in specs), max(s[0] for s in specs))
    return q, k_new, v_new, k_cache, v_cache, rows


def reference(q, k_new, v_new, k_cache, v_cache, rows: AttentionRows, scale: float):
    i32 = lambda values: torch.tensor([int(v) for v in values], dtype=torch.int32)  # noqa: E731
    width = max(1, max(len(t) for t in rows.tables))
    table = torch.tensor([t + [-1] * (width - len(t)) for t in rows.tables], dtype=torch.int32)
    return block_attention_reference(q, k_new, v_new, k_cache, v_cache, i32(rows.cu), table,
                                     i32(rows.cache_lens), i32(rows.kinds), i32(rows.params), i32(rows.writes), scale)


def contiguous(cache: torch.Tensor, table: list[int], count: int) -> torch.Tensor:
    """A row's first `count` cached positions gathered page by page (the oracle's own reading of a table)."""
    size = cache.shape[1]
    return torch.cat([cache[table[p // size], p % size][None] for p in range(count)]) if count else cache[0, :0]


MIXED = [(37, 1, CAUSAL, 0, True), (0, 23, CAUSAL, 0, True), (12, 8, BIDIRECTIONAL, 0, False),
         (9, 12, QUAD, 3, True), (0, 13, PREFIX_BLOCK, 4, True), (5, 20, QUAD, 4, False)]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_fast_equals_reference_and_dense_oracle_mixed_rows(heads, kv_heads):
    scale = 0.125
    fast_in = make_rows(MIXED, heads, kv_heads, 16)
    ref_in = [t.clone() if isinstance(t, torch.Tensor) else t for t in fast_in]
    fast = attend_cpu(*fast_in, scale)
    ref = reference(*ref_in, scale)
    assert (fast - ref).abs().max() < 1e-5
    assert torch.equal(fast_in[3], ref_in[3]) and torch.equal(fast_in[4], ref_in[4])  # identical cache writes
    q, k_new, v_new, k_cache0, v_cache0, rows = make_rows(MIXED, heads, kv_heads, 16)  # pristine cache
    for b, (past, n, kind, param, _write) in enumerate(MIXED):
        a, e = rows.cu[b], rows.cu[b + 1]
        keys = torch.cat([contiguous(k_cache0, rows.tables[b], past), k_new[a:e]])
        values = torch.cat([contiguous(v_cache0, rows.tables[b], past), v_new[a:e]])
        allowed = torch.cat([torch.ones(n, past, dtype=torch.bool), hand_mask(kind, param, n)], dim=1)
        oracle = dense_attention(q[a:e], keys, values, allowed, scale)
        assert (fast[a:e] - oracle).abs().max() < 1e-5, f"row {b} (kind {kind})"


@pytest.mark.parametrize("past", [0, 1, 100, 2048])
@pytest.mark.parametrize("kind,n,param", [(CAUSAL, 1, 0), (CAUSAL, 9, 0), (BIDIRECTIONAL, 8, 0), (QUAD, 20, 4),
                                          (PREFIX_BLOCK, 11, 3)])
def test_fast_equals_reference_over_cache_lengths(past, kind, n, param):
    write = kind != BIDIRECTIONAL
    inputs = make_rows([(past, n, kind, param, write), (past // 2, 3, CAUSAL, 0, True)], 4, 2, 64, pages=300)
    copies = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    fast = attend_cpu(*inputs, 0.125)
    ref = reference(*copies, 0.125)
    assert (fast - ref).abs().max() < 1e-5
    assert torch.equal(inputs[3], copies[3]) and torch.equal(inputs[4], copies[4])


def test_quad_writes_only_the_draft_rows_at_consecutive_positions_across_a_page_boundary():
    inputs = make_rows([(10, 12, QUAD, 3, True)], 2, 2, 16, page_size=4, pages=12)
    before = inputs[3].clone()
    attend_cpu(*inputs, 0.25)
    k_new, k_cache, table = inputs[1], inputs[3], inputs[5].tables[0]
    assert len(table) == 4  # positions 10..12 cross from the row's third page into its fourth
    assert torch.equal(contiguous(k_cache, table, 13)[10:], k_new[[0, 4, 8]])
    changed = {table[2], table[3]}
    assert torch.equal(contiguous(k_cache, table, 10), contiguous(before, table, 10))
    assert torch.equal(k_cache[table[2], :2], before[table[2], :2]) and torch.equal(k_cache[table[3], 1:],
                                                                                   before[table[3], 1:])
    others = [p for p in range(12) if p not in changed]
    assert torch.equal(k_cache[others], before[others])


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 8)])
def test_batched_single_token_rows_equal_the_reference(heads, kv_heads):
    specs = [(past, 1, kind, 0, write) for past, kind, write in
             [(5, CAUSAL, True), (0, CAUSAL, True), (120, CAUSAL, True), (33, BIDIRECTIONAL, False),
              (1, CAUSAL, False), (64, CAUSAL, True)]] + [(7, 6, CAUSAL, 0, True)]
    inputs = make_rows(specs, heads, kv_heads, 32, page_size=8, pages=64)
    copies = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    fast = attend_cpu(*inputs, 0.2)
    ref = reference(*copies, 0.2)
    assert (fast - ref).abs().max() < 1e-5
    assert torch.equal(inputs[3], copies[3]) and torch.equal(inputs[4], copies[4])


@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("kind,n,param", [(CAUSAL, 7, 0), (BIDIRECTIONAL, 6, 0), (QUAD, 12, 3), (PREFIX_BLOCK, 9, 2)])
def test_shared_prefix_pages_equal_the_reference_and_a_contiguous_oracle(page_size, kind, n, param):
    """Two rows read the same first pages (a cached common prefix) through non-contiguous tables; neither
    writes them. Every kind, page sizes 1, 5 (not a power of two) and 16."""
    shared = 2
    specs = [(shared * page_size + 3, n, kind, param, kind != BIDIRECTIONAL),
             (shared * page_size + 7, 1, CAUSAL, 0, True), (shared * page_size, 4, CAUSAL, 0, True)]
    inputs = make_rows(specs, 4, 2, 16, page_size=page_size, pages=80, seed=page_size, shared=shared)
    copies = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    pristine = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    fast = attend_cpu(*inputs, 0.3)
    ref = reference(*copies, 0.3)
    assert (fast - ref).abs().max() < 1e-5
    assert torch.equal(inputs[3], copies[3]) and torch.equal(inputs[4], copies[4])
    rows = inputs[5]
    common = rows.tables[0][:shared]
    assert all(t[:shared] == common for t in rows.tables)
    assert torch.equal(inputs[3][common], pristine[3][common])  # shared pages are never written
    q, k_new, v_new, k0, v0, _ = pristine
    for b, (past, count, kind_b, param_b, _w) in enumerate(specs):
        a, e = rows.cu[b], rows.cu[b + 1]
        keys = torch.cat([contiguous(k0, rows.tables[b], past), k_new[a:e]])
        values = torch.cat([contiguous(v0, rows.tables[b], past), v_new[a:e]])
        allowed = torch.cat([torch.ones(count, past, dtype=torch.bool), hand_mask(kind_b, param_b, count)], dim=1)
        assert (fast[a:e] - dense_attention(q[a:e], keys, values, allowed, 0.3)).abs().max() < 1e-5
