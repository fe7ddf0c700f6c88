"""`torch.ops.trimode.block_attention` (plugins/torch_op.py): contract, cache mutation, tracing, CUDA.

    block_attention(q, k_new, v_new, k_cache, v_cache, cu_seqlens, slots, cache_lens, mask_kind, mask_param,
                    write, scale, max_chunk, max_cache_len) -> out

On CPU the op is the reference by definition, so these tests pin the op's plumbing and check it against the
hand-built dense oracle of test_plugin_native.py for every kind: argument checks, host-bound checks, the
declared cache mutation, the fake kernel (meta tensors, torch.compile) and torch.library.opcheck. The CUDA
tests run the CUDA library on a GPU (eager and inside a captured CUDA graph whose rows change kind, length and
write flag between replays); without a GPU they skip with the reason.
"""

from __future__ import annotations

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
    MIXED,
    ROWS,
    Batch,
    Row,
    dense_oracle,
    expected_caches,
    i32,
    make_batch,
    reference_write,
    require,
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


@pytest.mark.parametrize("mask_kind", KINDS)
def test_cpu_op_equals_reference_and_dense_oracle(mask_kind):
    b = make_batch(mask_kind, torch.float32, 8, 2, 64, ROWS[mask_kind], capacity=128)
    args = args_of(b)
    got = torch_op.block_attention(*args)
    ref = args_of(b)
    want = block_attention_reference(*ref[:10], reference_write(b), ref[11])
    assert torch.equal(got, want)
    assert rel_err(got, dense_oracle(b, ref[11])) < 1e-5
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(args[3], exp_k) and torch.equal(args[4], exp_v), "the op mutates exactly the written rows"


def test_cpu_op_mixed_rows_equal_each_row_alone():
    b = make_batch(3, torch.float32, 8, 2, 128, MIXED, capacity=128)
    args = args_of(b)
    got = torch_op.block_attention(*args)
    assert rel_err(got, dense_oracle(b, args[11])) < 1e-5
    for r, start, slot in zip(b.rows, b.starts, b.slots.tolist(), strict=True):
        if r.n == 0:
            continue
        chunk = slice(start, start + r.n)
        one = (b.q[chunk], b.k[chunk], b.v[chunk], b.k_cache.clone(), b.v_cache.clone(), i32([0, r.n]),
               i32([slot]), i32([r.past]), i32([r.kind]), i32([r.param]), i32([int(r.write)]), args[11], r.n, 0)
        assert rel_err(got[chunk], torch_op.block_attention(*one)) < 1e-5, r
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(args[3], exp_k) and torch.equal(args[4], exp_v)


def test_cpu_op_accepts_a_prefix_block_row_whose_tail_is_the_whole_chunk():
    b = make_batch(4, torch.float32, 4, 2, 64, [Row(PREFIX_BLOCK, 4, 4, 3, True), Row(CAUSAL, 0, 2, 1, True)])
    args = args_of(b)
    got = torch_op.block_attention(*args)
    assert rel_err(got, dense_oracle(b, args[11])) < 1e-5
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(args[3], exp_k) and torch.equal(args[4], exp_v)


BASE = [Row(CAUSAL, 0, 3, 4, True), Row(QUAD, 1, 2, 0, True)]


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.__setitem__(6, a[6].long()), "slots must be int32"),
        (lambda a: a.__setitem__(5, a[5][:-1]), "cu_seqlens must be"),
        (lambda a: a.__setitem__(8, a[8][:1]), "mask_kind must have shape"),
        (lambda a: a.__setitem__(12, 2), "more than max_chunk=2"),
        (lambda a: a.__setitem__(12, 0), "max_chunk must be in"),
        (lambda a: a.__setitem__(13, 3), "more than max_cache_len=3"),
        (lambda a: a.__setitem__(13, 999), "max_cache_len must be in"),
        (lambda a: a[8].__setitem__(1, 5), "unknown mask kind 5"),
        (lambda a: a[9].__setitem__(1, 2), "quad row with L=2"),
        (lambda a: a[8].__setitem__(0, BIDIRECTIONAL), "bidirectional row cannot write"),
        (lambda a: a.__setitem__(1, a[1][:, :1]), "k_new/v_new must be"),
        (lambda a: a.__setitem__(0, a[0][:, :3]), "not a multiple"),
    ],
)
def test_cpu_op_rejects_bad_calls(change, match):
    args = list(args_of(make_batch(0, torch.float32, 4, 2, 64, BASE)))
    change(args)
    with pytest.raises(ValueError, match=match):
        torch_op.block_attention(*args)


def test_fake_kernel_propagates_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    b = make_batch(0, torch.bfloat16, 8, 2, 64, MIXED)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args_of(b)]
        out = torch_op.block_attention(*fake)
    assert out.shape == b.q.shape and out.dtype == b.q.dtype


def test_torch_compile_fullgraph():
    b = make_batch(1, torch.float32, 8, 2, 64, MIXED, capacity=128)
    a, ref = args_of(b), args_of(b)
    compiled = torch.compile(torch_op.block_attention, fullgraph=True, backend="eager")
    assert torch.equal(compiled(*a), torch_op.block_attention(*ref))
    assert torch.equal(a[3], ref[3]) and torch.equal(a[4], ref[4])


def test_opcheck():
    b = make_batch(2, torch.float32, 4, 2, 64, [Row(CAUSAL, 0, 3, 4, True), Row(QUAD, 2, 6, 1, True),
                                               Row(BIDIRECTIONAL, 0, 2, 3), Row(PREFIX_BLOCK, 2, 4, 0, True)])
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


@requires_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_op_matches_reference_and_dense_oracle(dtype, tolerance, head_dim):
    require("cuda")
    b = make_batch(5, dtype, 32, 8, head_dim, cuda_rows(), capacity=3072)
    args = args_of(b, "cuda")
    got = torch_op.block_attention(*args)
    torch.cuda.synchronize()
    f32 = Batch(**{**b.__dict__, **{n: getattr(b, n).float() for n in ("q", "k", "v", "k_cache", "v_cache")}})
    ref = args_of(f32)
    want = block_attention_reference(*ref[:10], reference_write(b), ref[11])
    dense = dense_oracle(b, args[11])
    for r, start in zip(b.rows, b.starts, strict=True):
        chunk = slice(start, start + r.n)
        assert rel_err(got[chunk], want[chunk]) < tolerance, r
        assert rel_err(got[chunk], dense[chunk]) < tolerance, r
    exp_k, exp_v = expected_caches(b)
    assert torch.equal(args[3].cpu(), exp_k) and torch.equal(args[4].cpu(), exp_v)


@requires_cuda
def test_cuda_op_inside_cuda_graph_serves_any_mix_of_rows():
    """One capture at fixed bounds; between replays the rows change kind, parameter, length, cache length and
    write flag (device tensors only): every replay equals the eager op, an invalid row gives zeros."""
    require("cuda")
    rows = [Row(CAUSAL, 0, 1, 100), Row(QUAD, 2, 6, 2000), Row(BIDIRECTIONAL, 0, 8, 7), Row(PREFIX_BLOCK, 2, 12, 0)]
    b = make_batch(6, torch.bfloat16, 32, 8, 128, rows, capacity=2048)
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
    n_tokens = b.q.shape[0]
    for mix in mixes:
        used = sum(r.n for r in mix)
        cu = [0]
        for r in mix:
            cu.append(cu[-1] + r.n)
        assert used <= n_tokens
        for index, values in ((5, cu), (7, [r.past for r in mix]), (8, [r.kind for r in mix]),
                              (9, [r.param for r in mix]), (10, [0] * len(mix))):
            static[index].copy_(i32(values))
        static[0].copy_(torch.randn_like(static[0]))
        graph.replay()
        torch.cuda.synchronize()
        eager = torch_op.block_attention(*static)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), mix
        if mix is mixes[-1]:
            assert (out[cu[3] : cu[4]] == 0).all(), "an invalid row gives zeros"
        assert (out[used:] == 0).all(), "tokens of no row are zeros"
