"""`torch.ops.trimode.block_attention` (plugins/torch_op.py): contract, cache mutation, tracing, CUDA.

On CPU the op is the reference by definition, so these tests pin the op's plumbing: argument checks, the
declared cache mutation, slots=None, the fake kernel (meta tensors, torch.compile) and torch.library.opcheck.
The CUDA tests run the CUDA library on a GPU (eager and inside a captured CUDA graph); without a GPU they
skip.
"""

from __future__ import annotations

import pytest
import torch

from trimode.plugins import native, torch_op
from trimode.plugins.reference import block_attention_reference

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"
)


def inputs(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    chunk: int = 5,
    cache_lens=(6, 0, 40),
    chunk_lens=(5, 2, 1),
    capacity: int = 64,
):
    gen = torch.Generator().manual_seed(seed)
    batch = len(cache_lens)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    index = {"device": device, "dtype": torch.int32}
    return dict(
        q=rnd(batch, chunk, heads, head_dim),
        k_new=rnd(batch, chunk, kv_heads, head_dim),
        v_new=rnd(batch, chunk, kv_heads, head_dim),
        k_cache=rnd(batch + 1, capacity, kv_heads, head_dim),
        v_cache=rnd(batch + 1, capacity, kv_heads, head_dim),
        slots=torch.arange(batch, **index).flip(0) + 1,
        cache_lens=torch.tensor(cache_lens, **index),
        chunk_lens=torch.tensor(chunk_lens, **index),
    )


def call(op, a: dict, mask_kind: int, write_kv: bool, slots="given") -> torch.Tensor:
    scale = a["q"].shape[-1] ** -0.5
    return op(
        a["q"],
        a["k_new"],
        a["v_new"],
        a["k_cache"],
        a["v_cache"],
        a["slots"] if slots == "given" else slots,
        a["cache_lens"],
        a["chunk_lens"],
        mask_kind,
        write_kv,
        scale,
    )


@pytest.mark.parametrize("mask_kind", [0, 1])
@pytest.mark.parametrize("write_kv", [False, True])
def test_cpu_op_equals_reference_and_mutates_cache(mask_kind, write_kv):
    a = inputs()
    b = {name: t.clone() for name, t in a.items()}
    got = call(torch_op.block_attention, a, mask_kind, write_kv)
    want = call(block_attention_reference, b, mask_kind, write_kv)
    assert torch.equal(got, want)
    assert torch.equal(a["k_cache"], b["k_cache"]) and torch.equal(a["v_cache"], b["v_cache"])
    untouched = inputs()
    for i in range(3):
        slot, past, n = int(a["slots"][i]), int(a["cache_lens"][i]), int(a["chunk_lens"][i])
        if write_kv:
            assert torch.equal(a["k_cache"][slot, past : past + n], a["k_new"][i, :n])
            assert torch.equal(a["v_cache"][slot, past : past + n], a["v_new"][i, :n])
        assert torch.equal(a["k_cache"][slot, :past], untouched["k_cache"][slot, :past])
        assert torch.equal(a["k_cache"][slot, past + n :], untouched["k_cache"][slot, past + n :])
    if not write_kv:
        assert torch.equal(a["k_cache"], untouched["k_cache"]) and torch.equal(
            a["v_cache"], untouched["v_cache"]
        )


def test_slots_none_means_identity():
    a, b = inputs(), inputs()
    b["slots"] = torch.arange(3, dtype=torch.int32)
    assert torch.equal(
        call(torch_op.block_attention, a, 0, True, slots=None), call(torch_op.block_attention, b, 0, True)
    )
    assert torch.equal(a["k_cache"], b["k_cache"])


def test_cpu_op_rejects_structured_mask():
    with pytest.raises(ValueError, match="mask kind 2"):
        call(torch_op.block_attention, inputs(), 2, False)


def test_cpu_op_rejects_heads_not_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="not a multiple"):
        call(torch_op.block_attention, inputs(heads=8, kv_heads=3), 0, False)


def test_fake_kernel_propagates_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = inputs()
        out = call(torch_op.block_attention, a, 1, False)
    assert out.shape == a["q"].shape and out.dtype == a["q"].dtype


def test_torch_compile_fullgraph():
    a, b = inputs(), inputs()
    compiled = torch.compile(torch_op.block_attention, fullgraph=True, backend="eager")
    assert torch.equal(call(compiled, a, 0, True), call(block_attention_reference, b, 0, True))
    assert torch.equal(a["k_cache"], b["k_cache"])


def test_opcheck():
    a = inputs()
    args = (
        a["q"],
        a["k_new"],
        a["v_new"],
        a["k_cache"],
        a["v_cache"],
        a["slots"],
        a["cache_lens"],
        a["chunk_lens"],
        0,
        True,
        0.125,
    )
    torch.library.opcheck(torch.ops.trimode.block_attention.default, args)


def test_cuda_available_is_false_without_gpu_or_library():
    if torch.cuda.is_available() and native.is_built("cuda"):
        pytest.skip("a GPU and the CUDA library are present")
    assert torch_op.cuda_available() is False


# ---- CUDA (skipped without a GPU) ----------------------------------------------------------------------


def require_cuda_library() -> None:
    if not native.is_built("cuda"):
        pytest.skip(f"{native.library_path('cuda')} not built (run `make -C plugins` with nvcc)")


@requires_cuda
@pytest.mark.parametrize(
    "dtype,tolerance", [(torch.float32, 1e-4), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)]
)
@pytest.mark.parametrize("mask_kind", [0, 1])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_op_matches_reference(dtype, tolerance, mask_kind, head_dim):
    require_cuda_library()
    for seed, (chunk, cache_lens, chunk_lens) in enumerate(
        [(1, (0, 300, 2999), (1, 1, 0)), (32, (17, 1000, 64), (32, 7, 1)), (77, (0, 129, 5), (77, 40, 3))]
    ):
        a = inputs("cuda", dtype, seed, 32, 8, head_dim, chunk, cache_lens, chunk_lens, capacity=3072)
        ref = {name: (t.float() if t.is_floating_point() else t).cpu() for name, t in a.items()}
        before = a["k_cache"].clone()
        got = call(torch_op.block_attention, a, mask_kind, True)
        want = call(block_attention_reference, ref, mask_kind, False)
        torch.cuda.synchronize()
        for b in range(len(cache_lens)):
            slot, past, n = int(ref["slots"][b]), cache_lens[b], chunk_lens[b]
            assert (got[b, n:] == 0).all()
            if n:
                err = float((got[b, :n].float().cpu() - want[b, :n]).norm() / want[b, :n].norm())
                assert err < tolerance, (dtype, chunk, b, err)
            assert torch.equal(a["k_cache"][slot, past : past + n], a["k_new"][b, :n])
            assert torch.equal(a["k_cache"][slot, :past], before[slot, :past])


@requires_cuda
def test_cuda_op_inside_cuda_graph():
    require_cuda_library()
    a = inputs("cuda", torch.bfloat16, 3, 32, 8, 128, 1, (100, 2000, 7), (1, 1, 1), capacity=2048)
    static_out = call(torch_op.block_attention, a, 0, False)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call(torch_op.block_attention, a, 0, False)
    a["q"].copy_(torch.randn_like(a["q"]))
    a["cache_lens"].copy_(torch.tensor([5, 1500, 300], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    eager = call(torch_op.block_attention, a, 0, False)
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)


@requires_cuda
def test_cuda_library_reads_the_mask_kind_from_device_memory_inside_cuda_graph():
    """The TensorRT plugin's path: one captured call, the kind in a device tensor (mask_kind_device), switched
    between replays; each replay equals the op's host-field result bit for bit, a bad value gives zeros."""
    require_cuda_library()
    lib = native.load("cuda")
    a = inputs("cuda", torch.bfloat16, 5, 32, 8, 128, 6, (100, 0, 1500), (6, 3, 1), capacity=2048)
    mask = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(a["q"])
    params = native.make_params(
        a["q"],
        a["k_new"],
        a["v_new"],
        a["k_cache"],
        a["v_cache"],
        a["slots"],
        a["cache_lens"],
        a["chunk_lens"],
        out,
        5,
        False,
        128**-0.5,
        mask_kind_tensor=mask,
    )  # host field 5 (invalid): ignored because the kind is read from `mask`
    size = lib.workspace_size(params)
    workspace = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
    params.workspace, params.workspace_size = workspace.data_ptr(), size
    lib.check(params, torch.cuda.current_stream().cuda_stream)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lib.check(params, torch.cuda.current_stream().cuda_stream)
    for value in (0, 1, 0, 1):
        mask.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        eager = call(torch_op.block_attention, a, value, False)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), value
    mask.fill_(7)
    graph.replay()
    torch.cuda.synchronize()
    assert (out == 0).all()
