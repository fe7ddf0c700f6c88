"""The CPU engine's fast attention == the plain reference == a dense-mask oracle, for every mask kind."""

from __future__ import annotations

import pytest
import torch

from trimode.plugins.reference import (
    BIDIRECTIONAL,
    CAUSAL,
    PREFIX_BLOCK,
    QUAD,
    block_attention_reference,
    dense_attention,
)
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


def make_rows(specs, heads: int, kv_heads: int, dim: int, slots: int = 6, capacity: int = 2200, seed: int = 0):
    """specs: (cache_len, n, kind, param, write) per row; returns tensors for both implementations."""
    g = torch.Generator().manual_seed(seed)
    total = sum(s[1] for s in specs)
    q = torch.randn(total, heads, dim, generator=g)
    k_new = torch.randn(total, kv_heads, dim, generator=g)
    v_new = torch.randn(total, kv_heads, dim, generator=g)
    k_cache = torch.randn(slots, capacity, kv_heads, dim, generator=g)
    v_cache = torch.randn(slots, capacity, kv_heads, dim, generator=g)
    cu = [0]
    for spec in specs:
        cu.append(cu[-1] + spec[1])
    order = list(range(len(specs)))[::-1]  # slots out of order
    rows = AttentionRows(cu, order, [s[0] for s in specs], [s[2] for s in specs], [s[3] for s in specs],
                         [s[4] for s in specs], None, max(s[1] for s in specs), max(s[0] for s in specs))
    return q, k_new, v_new, k_cache, v_cache, rows


def reference(q, k_new, v_new, k_cache, v_cache, rows: AttentionRows, scale: float):
    i32 = lambda values: torch.tensor([int(v) for v in values], dtype=torch.int32)  # noqa: E731
    return block_attention_reference(q, k_new, v_new, k_cache, v_cache, i32(rows.cu), i32(rows.slots),
                                     i32(rows.cache_lens), i32(rows.kinds), i32(rows.params), i32(rows.writes), scale)


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
        slot = rows.slots[b]
        keys = torch.cat([k_cache0[slot, :past], k_new[a:e]])
        values = torch.cat([v_cache0[slot, :past], v_new[a:e]])
        allowed = torch.cat([torch.ones(n, past, dtype=torch.bool), hand_mask(kind, param, n)], dim=1)
        oracle = dense_attention(q[a:e], keys, values, allowed, scale)
        assert (fast[a:e] - oracle).abs().max() < 1e-5, f"row {b} (kind {kind})"


@pytest.mark.parametrize("past", [0, 1, 100, 2048])
@pytest.mark.parametrize("kind,n,param", [(CAUSAL, 1, 0), (CAUSAL, 9, 0), (BIDIRECTIONAL, 8, 0), (QUAD, 20, 4),
                                          (PREFIX_BLOCK, 11, 3)])
def test_fast_equals_reference_over_cache_lengths(past, kind, n, param):
    write = kind != BIDIRECTIONAL
    inputs = make_rows([(past, n, kind, param, write), (past // 2, 3, CAUSAL, 0, True)], 4, 2, 64, slots=2)
    copies = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    fast = attend_cpu(*inputs, 0.125)
    ref = reference(*copies, 0.125)
    assert (fast - ref).abs().max() < 1e-5
    assert torch.equal(inputs[3], copies[3]) and torch.equal(inputs[4], copies[4])


def test_quad_writes_only_the_draft_rows_at_contiguous_positions():
    inputs = make_rows([(10, 12, QUAD, 3, True)], 2, 2, 16, slots=1, capacity=40)
    before = inputs[3].clone()
    attend_cpu(*inputs, 0.25)
    k_new, k_cache, slot = inputs[1], inputs[3], inputs[5].slots[0]
    assert torch.equal(k_cache[slot, 10:13], k_new[[0, 4, 8]])
    assert torch.equal(k_cache[slot, :10], before[slot, :10]) and torch.equal(k_cache[slot, 13:], before[slot, 13:])


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 8)])
def test_batched_single_token_rows_equal_the_reference(heads, kv_heads):
    specs = [(past, 1, kind, 0, write) for past, kind, write in
             [(5, CAUSAL, True), (0, CAUSAL, True), (120, CAUSAL, True), (33, BIDIRECTIONAL, False),
              (1, CAUSAL, False), (64, CAUSAL, True)]] + [(7, 6, CAUSAL, 0, True)]
    inputs = make_rows(specs, heads, kv_heads, 32, slots=7, capacity=200)
    copies = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    fast = attend_cpu(*inputs, 0.2)
    ref = reference(*copies, 0.2)
    assert (fast - ref).abs().max() < 1e-5
    assert torch.equal(inputs[3], copies[3]) and torch.equal(inputs[4], copies[4])
