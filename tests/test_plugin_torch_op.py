"""`torch.ops.trimode.block_attention` (plugins/torch_op.py): contract, paged cache, cache mutation, tracing, CUDA.

    block_attention(q, k_new, v_new, k_cache, v_cache, cu_seqlens, page_table, cache_lens, mask_kind, mask_param,
                    write, scale, max_chunk, max_cache_len) -> out

On CPU the op is the reference by definition, so these tests pin the op's plumbing and check it against the
hand-built dense oracle of test_plugin_native.py for every kind (over shuffled page tables, page sizes 5 and
16, shared prefix pages): argument checks, row / page / host-bound checks made before anything is written, the
declared cache mutation, the fake kernel (meta tensors, torch.compile) and torch.library.opcheck. The CUDA tests
run the CUDA library on a GPU (eagerly, and inside a captured CUDA graph whose rows change kind, length, write
flag and pages between replays, including bad page ids); without a GPU they skip with the reason.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from trimode.plugins import native, torch_op
from trimode.plugins.reference import (
    BIDIRECTIONAL,
    CAUSAL,
    PREFIX_BLOCK,
    QUAD,
    block_attention_reference,
)

from .test_plugin_native import (
    BAD_PAGE_ROWS,
    MIXED,
    ROWS,
    SMALL,
    Batch,
    Row,
    dense_oracle,
    expected_caches,
    i32,
    make_batch,
    page_rows,
    require,
    single_row,
)

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"
)
KINDS = (CAUSAL, BIDIRECTIONAL, QUAD, PREFIX_BLOCK)


def args_of(b: Batch, device: str = "cpu", max_chunk: int | None = None, max_cache_len: int = 0) -> tuple:
    """The op's arguments for a batch (tensors moved to `device`); max_chunk defaults to the tight bound."""
    tensors = [t.to(device).clone() for t in (b.q, b.k, b.v, b.k_cache, b.v_cache, *b.arrays())]
    bound = max_chunk if max_chunk is not None else max(1, max(r.n for r in b.rows))
    return (*tensors, b.q.shape[-1] ** -0.5, bound, max_cache_len)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float().cpu() - want.float().cpu()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("page_size", [5, 16])
@pytest.mark.parametrize("mask_kind", KINDS)
def test_cpu_op_equals_reference_and_dense_oracle(mask_kind, page_size):
    rows = ROWS[mask_kind] + page_rows(mask_kind, page_size)
    b = make_batch(mask_kind, torch.float32, 8, 2, 64, rows, page_size=page_size)
    args = args_of(b)
    got = torch_op.block_attention(*args)
    ref = args_of(b)
    want = block_attention_reference(*ref[:11], ref[11])
    assert torch.equal(got, want)
    assert rel_err(got, dense_oracle(b, ref[11])) < 1e-5
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(args[3], exp_k) and torch.equal(args[4], exp_v), "the op mutates exactly the written rows"


def test_cpu_op_mixed_rows_equal_each_row_alone():
    b = make_batch(3, torch.float32, 8, 2, 128, MIXED, page_size=16)
    args = args_of(b)
    got = torch_op.block_attention(*args)
    assert rel_err(got, dense_oracle(b, args[11])) < 1e-5
    for index, r in enumerate(b.rows):
        if r.n == 0:
            continue
        one = single_row(b, index, b.k_cache.clone(), b.v_cache.clone())
        chunk = slice(b.starts[index], b.starts[index] + r.n)
        assert rel_err(got[chunk], torch_op.block_attention(*args_of(one))) < 1e-5, r
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(args[3], exp_k) and torch.equal(args[4], exp_v)


def test_cpu_op_rows_sharing_prefix_pages():
    """A common prefix read by three rows through the same pages; two of them write into their own pages."""
    rows = [Row(CAUSAL, 0, 4, 22, True), Row(QUAD, 2, 6, 13, True), Row(BIDIRECTIONAL, 0, 3, 15)]
    b = make_batch(8, torch.float32, 8, 2, 64, rows, page_size=5, share=((0, 1, 2), (0, 2, 3)))
    args = args_of(b)
    got = torch_op.block_attention(*args)
    assert rel_err(got, dense_oracle(b, args[11])) < 1e-5
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(args[3], exp_k) and torch.equal(args[4], exp_v)
    for page in b.page_table[0, :3].tolist():
        assert torch.equal(args[3][page], b.k_cache[page])


def test_cpu_op_accepts_a_prefix_block_row_whose_tail_is_the_whole_chunk():
    b = make_batch(4, torch.float32, 4, 2, 64, [Row(PREFIX_BLOCK, 4, 4, 3, True), Row(CAUSAL, 0, 2, 1, True)])
    args = args_of(b)
    got = torch_op.block_attention(*args)
    assert rel_err(got, dense_oracle(b, args[11])) < 1e-5
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(args[3], exp_k) and torch.equal(args[4], exp_v)


BASE = [Row(CAUSAL, 0, 3, 4, True), Row(QUAD, 1, 2, 0, True)]  # page size 4: row 0 uses 2 entries, row 1 one


ROW0_WRITTEN_PAGE = "the page row 0 writes"


def _set(index: int, row: int, column: int, value: int | str):
    """A change that sets one element of argument `index` (column -1: a 1-D argument)."""

    def change(args: list) -> None:
        new = int(args[6][0, 1]) if value == ROW0_WRITTEN_PAGE else value
        args[index][(row, column) if column >= 0 else row] = new

    return change


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.__setitem__(6, a[6].long()), "page_table must be int32"),
        (lambda a: a.__setitem__(6, a[6][:, 0]), "page_table must be \\[B, T\\]"),
        (lambda a: a.__setitem__(5, a[5][:-1]), "cu_seqlens must be"),
        (lambda a: a.__setitem__(8, a[8][:1]), "mask_kind must have shape"),
        (lambda a: a.__setitem__(3, a[3][:, :, :1]), "k_cache/v_cache must be"),
        (lambda a: a.__setitem__(12, 2), "more than max_chunk=2"),
        (lambda a: a.__setitem__(12, 0), "max_chunk must be in"),
        (lambda a: a.__setitem__(13, 3), "cache lengths must be in \\[0, 3\\]"),
        (lambda a: a.__setitem__(13, 999), "max_cache_len must be in \\[0, T\\*S=8\\]"),
        (_set(7, 1, -1, 9), "cache lengths must be in \\[0, 8\\]"),  # p_b > T * S
        (_set(7, 1, -1, -1), "cache lengths must be in"),
        (_set(7, 1, -1, 8), "needs 3 page-table entries, the table has 2"),  # p_b 8 fits, its draft does not
        (_set(6, 0, 1, -1), "outside the pool"),
        (_set(6, 0, 0, 99), "outside the pool"),
        (_set(6, 1, 0, -3), "outside the pool"),
        (_set(6, 1, 0, ROW0_WRITTEN_PAGE), "also used by another row"),  # row 1 writes it too
        (_set(6, 0, 0, ROW0_WRITTEN_PAGE), "twice by its own page table"),  # row 0 reads it at entry 0
        (lambda a: a[8].__setitem__(1, 5), "unknown mask kind 5"),
        (lambda a: a[9].__setitem__(1, 2), "quad row with L=2"),
        (lambda a: a[8].__setitem__(0, BIDIRECTIONAL), "bidirectional row cannot write"),
        (lambda a: a.__setitem__(1, a[1][:, :1]), "k_new/v_new must be"),
        (lambda a: a.__setitem__(0, a[0][:, :3]), "not a multiple"),
    ],
)
def test_cpu_op_rejects_bad_calls_before_writing(change, match):
    b = make_batch(0, torch.float32, 4, 2, 64, BASE, page_size=4, pages_per_row=2)
    args = list(args_of(b))
    change(args)
    with pytest.raises(ValueError, match=match):
        torch_op.block_attention(*args)
    if args[3].shape == b.k_cache.shape:
        assert torch.equal(args[3], b.k_cache) and torch.equal(args[4], b.v_cache), "a rejected call writes nothing"


def test_cpu_op_rejects_a_bad_later_row_before_an_earlier_row_writes():
    """The reference would write row 0 before it meets row 1's bad page; the op checks every row first."""
    b = make_batch(0, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 3, 4, True), Row(CAUSAL, 0, 1, 5)], page_size=4)
    args = list(args_of(b))
    args[6][1, 1] = 1000
    with pytest.raises(ValueError, match="outside the pool"):
        torch_op.block_attention(*args)
    assert torch.equal(args[3], b.k_cache)
    with pytest.raises(ValueError):  # the plain reference raises too, but only after row 0 wrote
        block_attention_reference(*args[:11], args[11])
    assert not torch.equal(args[3], b.k_cache)


def test_fake_kernel_propagates_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    b = make_batch(0, torch.bfloat16, 8, 2, 64, MIXED)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args_of(b)]
        out = torch_op.block_attention(*fake)
    assert out.shape == b.q.shape and out.dtype == b.q.dtype


def test_torch_compile_fullgraph():
    b = make_batch(1, torch.float32, 8, 2, 64, MIXED, page_size=8)
    a, ref = args_of(b), args_of(b)
    compiled = torch.compile(torch_op.block_attention, fullgraph=True, backend="eager")
    assert torch.equal(compiled(*a), torch_op.block_attention(*ref))
    assert torch.equal(a[3], ref[3]) and torch.equal(a[4], ref[4])


def test_opcheck():
    b = make_batch(2, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 3, 4, True), Row(QUAD, 2, 6, 1, True),
                                               Row(BIDIRECTIONAL, 0, 2, 3), Row(PREFIX_BLOCK, 2, 4, 0, True)],
                   page_size=3)
    torch.library.opcheck(torch.ops.trimode.block_attention.default, args_of(b))


def test_cuda_available_is_false_without_gpu_or_library():
    if torch.cuda.is_available() and native.is_built("cuda"):
        pytest.skip("a GPU and the CUDA library are present")
    assert torch_op.cuda_available() is False


# ---- CUDA (skipped without a GPU) ----------------------------------------------------------------------


def cuda_rows() -> list[Row]:
    """Long caches, decode, chunks over several tiles, all four kinds."""
    return [Row(CAUSAL, 0, 1, 2999, True), Row(QUAD, 4, 20, 1000, True), Row(BIDIRECTIONAL, 0, 32, 17),
            Row(PREFIX_BLOCK, 8, 77, 0, True), Row(CAUSAL, 0, 77, 129, True), Row(QUAD, 1, 2, 0),
            Row(PREFIX_BLOCK, 0, 1, 64, True), Row(BIDIRECTIONAL, 0, 1, 0)]


def as_float(b: Batch) -> Batch:
    return replace(b, **{n: getattr(b, n).float() for n in ("q", "k", "v", "k_cache", "v_cache")})


@requires_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [16, 24])
def test_cuda_op_matches_reference_and_dense_oracle(dtype, tolerance, head_dim, page_size):
    require("cuda")
    b = make_batch(5, dtype, 32, 8, head_dim, cuda_rows(), page_size=page_size)
    args = args_of(b, "cuda")
    got = torch_op.block_attention(*args)
    torch.cuda.synchronize()
    ref = args_of(as_float(b))
    want = block_attention_reference(*ref[:11], ref[11])
    dense = dense_oracle(b, args[11])
    for r, start in zip(b.rows, b.starts, strict=True):
        chunk = slice(start, start + r.n)
        assert rel_err(got[chunk], want[chunk]) < tolerance, r
        assert rel_err(got[chunk], dense[chunk]) < tolerance, r
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(args[3].cpu(), exp_k) and torch.equal(args[4].cpu(), exp_v)


@requires_cuda
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("mask_kind", KINDS)
def test_cuda_op_page_sizes_and_shared_prefixes(mask_kind, page_size):
    require("cuda")
    param, n = SMALL[mask_kind]
    write = mask_kind != BIDIRECTIONAL
    size = page_size
    shared = [Row(mask_kind, param, n, 3 * size + 2, write), Row(mask_kind, param, n, 2 * size + 3, write),
              Row(mask_kind, param, n, 3 * size)]
    rows = page_rows(mask_kind, size) + shared
    b = make_batch(70 + size, torch.bfloat16, 16, 2, 128, rows, page_size=size, share=((5, 6, 2), (5, 7, 3)))
    args = args_of(b, "cuda")
    got = torch_op.block_attention(*args)
    torch.cuda.synchronize()
    dense = dense_oracle(b, args[11])
    for r, start in zip(b.rows, b.starts, strict=True):
        chunk = slice(start, start + r.n)
        assert rel_err(got[chunk], dense[chunk]) < 2e-2, r
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(args[3].cpu(), exp_k) and torch.equal(args[4].cpu(), exp_v)


@requires_cuda
def test_cuda_kernel_hides_keys_in_bad_pages_and_drops_their_writes():
    """Bad page data on the device: the keys of a page id outside [0, P) are not visible, a write into such a
    page or past T*S is dropped, everything else exact (the same rule as the emulated kernel)."""
    require("cuda")
    rows = BAD_PAGE_ROWS
    b = make_batch(60, torch.float32, 8, 2, 64, rows, page_size=4, pages_per_row=4, num_pages=15)
    lib = native.load("cuda")
    args = args_of(b, "cuda")
    out = torch.empty_like(args[0])
    params = native.make_params(*args[:11], out, args[11], args[12])
    lib.check(params, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    want = dense_oracle(b, args[11])
    for r, start in zip(rows, b.starts, strict=True):
        assert rel_err(out[start : start + r.n], want[start : start + r.n]) < 1e-5, r
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(args[3].cpu(), exp_k) and torch.equal(args[4].cpu(), exp_v)


@requires_cuda
def test_cuda_op_inside_cuda_graph_serves_any_mix_of_rows():
    """One capture at fixed bounds; between replays the rows change kind, parameter, length, cache length,
    write flag and pages (device tensors only): every replay equals the eager op and the oracle, an invalid row
    gives zeros, a bad page hides its keys."""
    require("cuda")
    rows = [Row(CAUSAL, 0, 1, 100), Row(QUAD, 2, 6, 2000), Row(BIDIRECTIONAL, 0, 8, 7), Row(PREFIX_BLOCK, 2, 12, 0)]
    b = make_batch(6, torch.bfloat16, 32, 8, 128, rows, page_size=16, pages_per_row=128, extra_pages=400)
    static = list(args_of(b, "cuda", max_chunk=12, max_cache_len=2040))
    torch_op.block_attention(*static)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch_op.block_attention(*static)
    mixes = [
        [Row(QUAD, 3, 12, 5), Row(CAUSAL, 0, 3, 1500), Row(PREFIX_BLOCK, 1, 4, 0), Row(BIDIRECTIONAL, 0, 1, 0)],
        [Row(BIDIRECTIONAL, 0, 12, 40), Row(QUAD, 1, 2, 0), Row(CAUSAL, 0, 1, 2039), Row(CAUSAL, 0, 0, 3)],
        [Row(CAUSAL, 0, 6, 0), Row(PREFIX_BLOCK, 6, 6, 9), Row(QUAD, 2, 6, 100), Row(QUAD, 2, 5, 0)],  # invalid
    ]
    gen = torch.Generator().manual_seed(9)
    pool = b.k_cache.shape[0]
    n_tokens = b.q.shape[0]
    for number, mix in enumerate(mixes):
        used = sum(r.n for r in mix)
        cu = [0]
        for r in mix:
            cu.append(cu[-1] + r.n)
        assert used <= n_tokens
        table = torch.randperm(pool, generator=gen)[: 4 * 128].reshape(4, 128).to(torch.int32)
        if number == 0:
            table[1, 3] = -1  # positions 48..63 of row 1 are hidden
        for index, values in ((5, cu), (7, [r.past for r in mix]), (8, [r.kind for r in mix]),
                              (9, [r.param for r in mix]), (10, [0] * len(mix))):
            static[index].copy_(i32(values))
        static[6].copy_(table)
        static[0].copy_(torch.randn_like(static[0]))
        graph.replay()
        torch.cuda.synchronize()
        eager = torch_op.block_attention(*static)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), mix
        invalid = number == 2  # its last row: a quad row of 5 tokens, which L = 2 does not allow
        oracle_rows = mix[:3] + [replace(mix[3], n=0)] if invalid else mix  # the oracle skips that row
        now = replace(b, q=static[0].cpu(), rows=oracle_rows, starts=cu[:-1], page_table=table)
        dense = dense_oracle(now, static[11])
        for index, r in enumerate(mix):
            if invalid and index == 3:
                assert (out[cu[3] : cu[4]] == 0).all(), "an invalid row gives zeros"
            elif r.n:
                assert rel_err(out[cu[index] : cu[index + 1]], dense[cu[index] : cu[index + 1]]) < 2e-2, (mix, r)
        assert (out[used:] == 0).all(), "tokens of no row are zeros"
