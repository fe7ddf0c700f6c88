"""The block attention C API (plugins/csrc/block_attention.h) against plugins/reference.py, through ctypes.

Two host-pointer libraries implement the API and are checked the same way:
* ``cpu``: the C++ reference (block_attention_cpu.cpp);
* ``emu``: the CUDA kernel source (block_attention_kernels.cuh) compiled for the CPU against the CUDA
  emulation in plugins/csrc/emulation, so the kernel's tiling, GQA packing, masking, online softmax,
  split/combine and cache writes run here even without a GPU.
The CUDA library itself is only loaded here (no GPU): its GPU run is tests/test_plugin_torch_op.py's job.
Every test skips with a reason when its library is not built (`make -C plugins` builds them).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from trimode.plugins import native
from trimode.plugins.reference import block_attention_reference

HOST_KINDS = ("cpu", "emu")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def require(kind: str) -> native.Library:
    if not native.is_built(kind):
        pytest.skip(f"{native.library_path(kind)} not built (run `make -C plugins`)")
    return native.load(kind)


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


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slots: torch.Tensor | None
    cache_lens: torch.Tensor
    chunk_lens: torch.Tensor


def make_case(
    seed: int,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    chunk: int,
    cache_lens: list[int],
    chunk_lens: list[int],
    capacity: int = 96,
    slots: list[int] | None = None,
    extra_slots: int = 2,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    batch = len(cache_lens)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return Case(
        q=rnd(batch, chunk, heads, head_dim),
        k=rnd(batch, chunk, kv_heads, head_dim),
        v=rnd(batch, chunk, kv_heads, head_dim),
        k_cache=rnd(batch + extra_slots, capacity, kv_heads, head_dim),
        v_cache=rnd(batch + extra_slots, capacity, kv_heads, head_dim),
        slots=None if slots is None else torch.tensor(slots, dtype=torch.int32),
        cache_lens=torch.tensor(cache_lens, dtype=torch.int32),
        chunk_lens=torch.tensor(chunk_lens, dtype=torch.int32),
    )


def run_and_check(kind: str, c: Case, mask_kind: int, write_kv: bool) -> float:
    """Runs the library, checks padding rows and the cache contract, returns the relative error vs fp32."""
    batch, _, _, head_dim = c.q.shape
    scale = head_dim**-0.5
    slots = c.slots if c.slots is not None else torch.arange(batch, dtype=torch.int32)
    want = block_attention_reference(
        c.q.float(),
        c.k.float(),
        c.v.float(),
        c.k_cache.float(),
        c.v_cache.float(),
        slots,
        c.cache_lens,
        c.chunk_lens,
        mask_kind,
        False,
        scale,
    )
    k_cache, v_cache = c.k_cache.clone(), c.v_cache.clone()
    got = native.block_attention_host(
        kind, c.q, c.k, c.v, k_cache, v_cache, c.slots, c.cache_lens, c.chunk_lens, mask_kind, write_kv, scale
    )
    assert got.dtype == c.q.dtype and got.shape == c.q.shape
    assert torch.isfinite(got).all()
    expected_k, expected_v = c.k_cache.clone(), c.v_cache.clone()
    err = 0.0
    for b in range(batch):
        slot, past, n = int(slots[b]), int(c.cache_lens[b]), int(c.chunk_lens[b])
        assert (got[b, n:] == 0).all(), "rows t >= n_b must be zero"
        if n:
            err = max(err, float((got[b, :n].float() - want[b, :n]).norm() / want[b, :n].norm()))
        if write_kv:
            expected_k[slot, past : past + n] = c.k[b, :n]
            expected_v[slot, past : past + n] = c.v[b, :n]
    # Written exactly at [p_b, p_b + n_b) of each sequence's slot, every other byte unchanged.
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    return err


# (chunk T, cache_lens, chunk_lens, slots): decode, padded chunks, empty caches, a fully padded sequence,
# non-identity slots, and a chunk longer than one 64-row kernel tile.
SHAPES = [
    (1, [0], [1], None),
    (1, [37, 5, 80], [1, 1, 0], [3, 0, 1]),
    (7, [0, 12], [7, 3], [2, 0]),
    (16, [50, 0, 9], [16, 16, 1], [4, 2, 0]),
    (33, [20, 64], [33, 17], None),
]


@pytest.mark.parametrize("mask_kind", [0, 1])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("write_kv", [False, True])
def test_fp32_matches_reference(kind, mask_kind, heads, kv_heads, head_dim, write_kv):
    for i, (chunk, cache_lens, chunk_lens, slots) in enumerate(SHAPES):
        c = make_case(i, torch.float32, heads, kv_heads, head_dim, chunk, cache_lens, chunk_lens, slots=slots)
        err = run_and_check(kind, c, mask_kind, write_kv)
        assert err < TOLERANCE[torch.float32], (chunk, cache_lens, chunk_lens, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", [0, 1])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_half_precision_matches_reference(kind, dtype, mask_kind, head_dim):
    for i, (chunk, cache_lens, chunk_lens, slots) in enumerate(SHAPES):
        c = make_case(100 + i, dtype, 8, 2, head_dim, chunk, cache_lens, chunk_lens, slots=slots)
        err = run_and_check(kind, c, mask_kind, write_kv=mask_kind == 0)
        assert err < TOLERANCE[dtype], (dtype, chunk, cache_lens, chunk_lens, err)


@pytest.mark.parametrize("sm_count", [1, 8, 64, 1000])
@pytest.mark.parametrize("mask_kind", [0, 1])
def test_kernel_split_plans_agree(sm_count, mask_kind):
    """The emulated kernel gives the reference's result whether the key range is split (flash decoding +
    combine kernel) or not; the SM count is what decides the split plan."""
    require("emu")
    native.emu_set_sm_count(sm_count)
    c = make_case(7, torch.float32, 8, 2, 64, 3, [250, 0, 131], [1, 3, 2], capacity=320, slots=[2, 4, 0])
    assert run_and_check("emu", c, mask_kind, write_kv=True) < 1e-4


def test_kernel_splits_when_the_grid_is_small():
    require("emu")
    native.emu_set_sm_count(64)
    c = make_case(1, torch.bfloat16, 8, 2, 128, 1, [300], [1], capacity=512)
    out = torch.empty_like(c.q)
    params = native.make_params(
        c.q, c.k, c.v, c.k_cache, c.v_cache, None, c.cache_lens, c.chunk_lens, out, 0, False, 128**-0.5
    )
    lib = native.load("emu")
    full = lib.workspace_size(params)
    assert full > 0, "decode of one sequence must be split across blocks"
    if native.is_built("cpu"):
        assert native.load("cpu").workspace_size(params) == 0, "the CPU reference needs no workspace"
    native.emu_set_sm_count(1000)  # more blocks than a single split could ever fill: bounded by MAX_SPLITS
    rows = c.q.shape[0] * c.q.shape[1] * c.q.shape[2]
    assert lib.workspace_size(params) <= native.MAX_SPLITS * rows * (128 + 1) * 4


def test_kernel_with_too_small_a_workspace_uses_fewer_splits():
    """A workspace smaller than asked for only means fewer splits, never a wrong result or an overrun."""
    lib = require("emu")
    native.emu_set_sm_count(64)
    c = make_case(3, torch.float32, 4, 1, 64, 1, [200, 90], [1, 1], capacity=256)
    want = block_attention_reference(
        c.q,
        c.k,
        c.v,
        c.k_cache,
        c.v_cache,
        torch.arange(2, dtype=torch.int32),
        c.cache_lens,
        c.chunk_lens,
        0,
        False,
        0.125,
    )
    for fraction in (0.0, 0.3, 1.0):
        out = torch.empty_like(c.q)
        params = native.make_params(
            c.q, c.k, c.v, c.k_cache, c.v_cache, None, c.cache_lens, c.chunk_lens, out, 0, False, 0.125
        )
        size = int(lib.workspace_size(params) * fraction)
        workspace = torch.full((size + 64,), 0x5A, dtype=torch.uint8)  # a guard tail after `size` bytes
        params.workspace, params.workspace_size = workspace.data_ptr(), size
        lib.check(params)
        assert float((out - want).norm() / want.norm()) < 1e-4, fraction
        assert (workspace[size:] == 0x5A).all(), "wrote past the workspace it was given"


def test_bidirectional_sees_the_whole_chunk_and_causal_does_not(kind):
    """A key changed at the last chunk position moves every bidirectional row but only the causal last row."""
    c = make_case(5, torch.float32, 4, 2, 64, 6, [10], [6])
    changed = Case(**{**c.__dict__, "k": c.k.clone()})
    changed.k[0, 5] += 3.0
    for mask_kind, moved_rows in ((0, [5]), (1, [0, 1, 2, 3, 4, 5])):
        before = native.block_attention_host(
            kind,
            c.q,
            c.k,
            c.v,
            c.k_cache.clone(),
            c.v_cache.clone(),
            None,
            c.cache_lens,
            c.chunk_lens,
            mask_kind,
            False,
            0.125,
        )
        after = native.block_attention_host(
            kind,
            changed.q,
            changed.k,
            changed.v,
            c.k_cache.clone(),
            c.v_cache.clone(),
            None,
            c.cache_lens,
            c.chunk_lens,
            mask_kind,
            False,
            0.125,
        )
        moved = [t for t in range(6) if not torch.equal(before[0, t], after[0, t])]
        assert moved == moved_rows, (mask_kind, moved)


def _run_host(kind: str, c: Case, mask_kind: int, write_kv: bool, mask_kind_tensor: torch.Tensor | None = None):
    """Output and written caches of one call (the caches are copies, so the case is never mutated)."""
    k_cache, v_cache = c.k_cache.clone(), c.v_cache.clone()
    out = native.block_attention_host(
        kind,
        c.q,
        c.k,
        c.v,
        k_cache,
        v_cache,
        c.slots,
        c.cache_lens,
        c.chunk_lens,
        mask_kind,
        write_kv,
        c.q.shape[-1] ** -0.5,
        mask_kind_tensor=mask_kind_tensor,
    )
    return out, k_cache, v_cache


@pytest.mark.parametrize("mask_kind", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("write_kv", [False, True])
def test_mask_kind_from_pointer_matches_host_field(kind, mask_kind, dtype, write_kv):
    """mask_kind_device (the TensorRT plugin's path: the kind is a tensor read inside the call) gives exactly
    the host field's result, and the host field is then ignored (set here to the other kind)."""
    for i, (chunk, cache_lens, chunk_lens, slots) in enumerate(SHAPES):
        c = make_case(200 + i, dtype, 8, 2, 64, chunk, cache_lens, chunk_lens, slots=slots)
        want = _run_host(kind, c, mask_kind, write_kv)
        got = _run_host(kind, c, 1 - mask_kind, write_kv, torch.tensor([mask_kind], dtype=torch.int32))
        for w, g in zip(want, got, strict=True):
            assert torch.equal(w, g), (kind, chunk, cache_lens, chunk_lens)
        if dtype == torch.float32:
            assert run_and_check(kind, c, mask_kind, write_kv) < TOLERANCE[dtype]


def test_mask_kind_from_pointer_one_call_site_serves_both_kinds(kind):
    """One Params, one tensor: changing the tensor's value between calls switches causal <-> bidirectional,
    as one TensorRT plan (or captured CUDA graph) does between a verify step and a draft step."""
    c = make_case(11, torch.float32, 4, 2, 64, 6, [10, 3], [6, 4])
    mask = torch.zeros(1, dtype=torch.int32)
    out = torch.empty_like(c.q)
    params = native.make_params(
        c.q,
        c.k,
        c.v,
        c.k_cache,
        c.v_cache,
        c.slots,
        c.cache_lens,
        c.chunk_lens,
        out,
        0,
        False,
        0.125,
        mask_kind_tensor=mask,
    )
    lib = native.load(kind)
    for value in (0, 1, 0, 1):
        mask.fill_(value)
        out.fill_(float("nan"))
        lib.check(params)
        want = _run_host(kind, c, value, False)[0]
        assert torch.equal(out, want), value


@pytest.mark.parametrize("sm_count", [1, 64])
@pytest.mark.parametrize("mask_kind", [0, 1])
def test_kernel_mask_kind_from_pointer_split_and_unsplit(sm_count, mask_kind):
    """The emulated kernel reads the kind in every block of the attention kernel and the combine kernel."""
    require("emu")
    native.emu_set_sm_count(sm_count)
    c = make_case(8, torch.float32, 8, 2, 128, 3, [250, 0, 131], [1, 3, 2], capacity=320, slots=[2, 4, 0])
    want = _run_host("emu", c, mask_kind, True)
    got = _run_host("emu", c, 1 - mask_kind, True, torch.tensor([mask_kind], dtype=torch.int32))
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)


@pytest.mark.parametrize(
    "value,status", [(2, native.ERR_MASK_NOT_IMPLEMENTED), (3, native.ERR_MASK_KIND), (-1, native.ERR_MASK_KIND)]
)
def test_cpu_library_rejects_a_bad_mask_kind_in_memory(value, status):
    """The CPU library reads the pointer on the host, so a bad value gets the host field's status, untouched
    output; a valid pointer makes an invalid host field irrelevant."""
    lib = require("cpu")
    c = make_case(0, torch.float32, 4, 2, 64, 2, [3], [2])
    out = torch.full_like(c.q, 7.0)
    mask = torch.tensor([value], dtype=torch.int32)
    got = lib.run(_params(c, out, mask_kind=0, mask_kind_device=mask.data_ptr()))
    assert got == status, lib.error_string(got)
    assert (out == 7.0).all()
    mask.fill_(1)
    assert lib.run(_params(c, out, mask_kind=2, mask_kind_device=mask.data_ptr())) == native.OK


@pytest.mark.parametrize("value", [2, 3, -1, 1 << 30])
@pytest.mark.parametrize("sm_count", [1, 64])
def test_emulated_kernel_zeros_the_output_for_a_bad_mask_kind_in_memory(value, sm_count):
    """The kernel cannot report device data: a kind other than 0/1 makes every sequence empty (zero output,
    no cache write) instead of crashing or silently picking a mask."""
    require("emu")
    native.emu_set_sm_count(sm_count)
    c = make_case(9, torch.float32, 8, 2, 64, 3, [250, 0, 40], [1, 3, 2], capacity=320)
    out, k_cache, v_cache = _run_host("emu", c, 0, True, torch.tensor([value], dtype=torch.int32))
    assert (out == 0).all()
    assert torch.equal(k_cache, c.k_cache) and torch.equal(v_cache, c.v_cache)


def test_workspace_size_ignores_the_host_field_when_the_kind_is_in_memory(kind):
    c = make_case(1, torch.bfloat16, 8, 2, 128, 1, [300], [1], capacity=512)
    out = torch.empty_like(c.q)
    mask = torch.zeros(1, dtype=torch.int32)
    lib = native.load(kind)
    with_field = lib.workspace_size(_params(c, out))
    assert lib.workspace_size(_params(c, out, mask_kind=5, mask_kind_device=mask.data_ptr())) == with_field
    assert lib.run(_params(c, out, mask_kind=5)) == native.ERR_MASK_KIND


def _params(c: Case, out: torch.Tensor, **overrides) -> native.Params:
    params = native.make_params(
        c.q, c.k, c.v, c.k_cache, c.v_cache, c.slots, c.cache_lens, c.chunk_lens, out, 0, False, 0.125
    )
    for name, value in overrides.items():
        setattr(params, name, value)
    return params


@pytest.mark.parametrize(
    "field,value,status",
    [
        ("mask_kind", 2, native.ERR_MASK_NOT_IMPLEMENTED),
        ("mask_kind", 3, native.ERR_MASK_KIND),
        ("mask_kind", -1, native.ERR_MASK_KIND),
        ("num_kv_heads", 3, native.ERR_GQA),  # 4 query heads are not a multiple of 3
        ("head_dim", 96, native.ERR_HEAD_DIM),
        ("dtype", 9, native.ERR_DTYPE),
        ("abi_version", 99, native.ERR_ABI),
        ("batch", 0, native.ERR_INVALID_SHAPE),
        ("max_cache_len", 1000, native.ERR_INVALID_SHAPE),
        ("q", None, native.ERR_NULL_POINTER),
        ("cache_lens", None, native.ERR_NULL_POINTER),
    ],
)
def test_invalid_calls_return_status_codes(kind, field, value, status):
    c = make_case(0, torch.float32, 4, 2, 64, 2, [3], [2])
    out = torch.full_like(c.q, 7.0)
    lib = native.load(kind)
    got = lib.run(_params(c, out, **{field: value}))
    assert got == status, lib.error_string(got)
    assert lib.error_string(got) and lib.error_string(got) != "unknown trimode status"
    assert (out == 7.0).all(), "a rejected call must not touch the output"


def test_misaligned_pointer_is_rejected(kind):
    c = make_case(0, torch.float32, 4, 2, 64, 2, [3], [2])
    out = torch.empty_like(c.q)
    params = _params(c, out)
    params.q = c.q.data_ptr() + 4
    assert native.load(kind).run(params) == native.ERR_MISALIGNED


@pytest.mark.parametrize(
    "slots,cache_lens,chunk_lens,write_kv",
    [
        ([5], [3], [2], False),  # slot >= S
        ([-1], [3], [2], False),
        ([0], [97], [1], False),  # p_b > L
        ([0], [95], [2], True),  # the write would pass L
        ([0], [3], [3], False),  # n_b > T
    ],
)
def test_cpu_library_checks_data_ranges(slots, cache_lens, chunk_lens, write_kv):
    """Host data is readable by the CPU library, so it rejects out-of-range indices (the kernel clamps)."""
    lib = require("cpu")
    c = make_case(0, torch.float32, 4, 2, 64, 2, cache_lens, chunk_lens, slots=slots, extra_slots=4)
    out = torch.empty_like(c.q)
    assert lib.run(_params(c, out, write_kv=int(write_kv))) == native.ERR_OUT_OF_RANGE


def test_emulated_kernel_clamps_out_of_range_data():
    """The kernel cannot report device data errors without a sync: a bad slot gives zeros and writes nothing,
    n_b > T is read as T, writes past L are dropped."""
    require("emu")
    c = make_case(4, torch.float32, 4, 2, 64, 2, [3, 95], [2, 5], capacity=96, slots=[9, 1], extra_slots=0)
    k_cache, v_cache = c.k_cache.clone(), c.v_cache.clone()
    out = native.block_attention_host(
        "emu", c.q, c.k, c.v, k_cache, v_cache, c.slots, c.cache_lens, c.chunk_lens, 0, True, 0.125
    )
    assert (out[0] == 0).all()
    assert torch.isfinite(out).all()
    assert torch.equal(k_cache[0], c.k_cache[0])
    assert torch.equal(k_cache[1, 95], c.k[1, 0]) and torch.equal(k_cache[1, :95], c.k_cache[1, :95])


def test_cuda_library_loads_and_fails_cleanly_without_a_gpu():
    lib = require("cuda")
    assert lib.handle.trimode_backend_name() == b"cuda"
    c = make_case(0, torch.float32, 4, 2, 64, 2, [3], [2])
    out = torch.empty_like(c.q)
    assert lib.run(_params(c, out, mask_kind=2)) == native.ERR_MASK_NOT_IMPLEMENTED
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA run is covered by test_plugin_torch_op.py")
    status = lib.run(_params(c, out))
    assert status == native.ERR_CUDA, lib.error_string(status)
    assert "cuda" in lib.error_string(status).lower()


def test_load_reports_a_missing_library(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "BUILD_DIR", tmp_path)
    monkeypatch.setattr(native, "_LOADED", {})
    with pytest.raises(native.PluginNotBuiltError, match="make -C"):
        native.load("cpu")


@pytest.mark.skipif(
    not os.environ.get("TRT_INCLUDE"),
    reason="set TRT_INCLUDE=/path/to/TensorRT/include to compile and run the TensorRT plugin's host check",
)
def test_tensorrt_plugin_host_check():
    plugins = Path(native.__file__).resolve().parent
    result = subprocess.run(
        ["make", "-C", str(plugins), "tensorrt-check", f"TRT_INCLUDE={os.environ['TRT_INCLUDE']}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "PASSED" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the CUDA emulation is x86-64 only")
def test_emulated_kernels_are_memory_safe():
    """Exact-size buffers + poisoned shared memory under ASan/UBSan: no out-of-bounds kernel access."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    plugins = Path(native.__file__).resolve().parent
    result = subprocess.run(
        ["make", "-C", str(plugins), "emu-asan-check"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "PASSED" in result.stdout
