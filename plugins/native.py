"""ctypes binding of the block attention C API (`plugins/csrc/block_attention.h`).

Three shared libraries implement the same API, all built into `plugins/build/` by `make -C plugins`:
``cuda`` (libtrimode_attention.so, device pointers), ``cpu`` (libtrimode_attention_cpu.so, the C++
reference, host pointers) and ``emu`` (libtrimode_attention_emu.so, the CUDA kernel source compiled for the
CPU against an emulation of the CUDA primitives it uses, host pointers). Binding them through one ctypes
layer means the tests exercise exactly the struct layout and status codes that the torch op and the TensorRT
plugin use.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ABI_VERSION = 4
MAX_SPLITS = 32
BUILD_DIR = Path(os.environ.get("TRIMODE_PLUGIN_BUILD_DIR", Path(__file__).resolve().parent / "build"))
LIBRARIES = {
    "cuda": "libtrimode_attention.so",
    "cpu": "libtrimode_attention_cpu.so",
    "emu": "libtrimode_attention_emu.so",
}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

OK = 0
ERR_NULL_POINTER = 1
ERR_INVALID_SHAPE = 2
ERR_HEAD_DIM = 3
ERR_GQA = 4
ERR_MASK_KIND = 5
ERR_INVALID_ROW = 6
ERR_DTYPE = 7
ERR_MISALIGNED = 8
ERR_OUT_OF_RANGE = 9
ERR_ABI = 10
ERR_CUDA = 11


class PluginNotBuiltError(RuntimeError):
    """The shared library is missing: run `make -C plugins` (or `make plugins` at the top level)."""


class AttentionError(RuntimeError):
    """A nonzero status returned by the C API; `status` holds the code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"trimode_block_attention failed with status {status}: {message}")
        self.status = status


class Params(ctypes.Structure):
    """Mirror of TrimodeAttentionParams (ABI 4); field order and types must match block_attention.h exactly."""

    _fields_ = [
        ("abi_version", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("num_rows", ctypes.c_int32),
        ("num_tokens", ctypes.c_int32),
        ("num_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("num_pages", ctypes.c_int32),  # P
        ("page_size", ctypes.c_int32),  # S
        ("pages_per_row", ctypes.c_int32),  # T: the page table's row stride
        ("max_chunk", ctypes.c_int32),
        ("max_cache_len", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("q", ctypes.c_void_p),
        ("k_new", ctypes.c_void_p),
        ("v_new", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("cu_seqlens", ctypes.c_void_p),
        ("page_table", ctypes.c_void_p),  # [B, T] int32
        ("cache_lens", ctypes.c_void_p),
        ("mask_kind", ctypes.c_void_p),
        ("mask_param", ctypes.c_void_p),
        ("write", ctypes.c_void_p),  # may be NULL: no row writes
        ("out", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_size", ctypes.c_size_t),
    ]


@dataclass
class Library:
    """One loaded implementation of the C API."""

    kind: str
    path: Path
    handle: ctypes.CDLL

    def error_string(self, status: int) -> str:
        return self.handle.trimode_error_string(status).decode()

    def workspace_size(self, params: Params) -> int:
        """Bytes of workspace the call would use (0 for the CPU libraries); raises on invalid shapes."""
        size = ctypes.c_size_t(0)
        status = self.handle.trimode_block_attention_workspace_size(ctypes.byref(params), ctypes.byref(size))
        if status != OK:
            raise AttentionError(status, self.error_string(status))
        return size.value

    def run(self, params: Params, stream: int = 0) -> int:
        """Calls trimode_block_attention; returns the raw status (callers decide whether to raise)."""
        return self.handle.trimode_block_attention(ctypes.byref(params), ctypes.c_void_p(stream))

    def check(self, params: Params, stream: int = 0) -> None:
        status = self.run(params, stream)
        if status != OK:
            raise AttentionError(status, self.error_string(status))


_LOADED: dict[str, Library] = {}


def library_path(kind: str) -> Path:
    if kind not in LIBRARIES:
        raise ValueError(f"unknown plugin library kind {kind!r}; one of {sorted(LIBRARIES)}")
    return BUILD_DIR / LIBRARIES[kind]


def is_built(kind: str) -> bool:
    return library_path(kind).is_file()


def load(kind: str) -> Library:
    """Loads (once) the library of that kind; PluginNotBuiltError says how to build it when it is missing."""
    if kind in _LOADED:
        return _LOADED[kind]
    path = library_path(kind)
    if not path.is_file():
        raise PluginNotBuiltError(f"{path} is not built; run `make -C {path.parent.parent}` "
                                  f"({'needs nvcc' if kind == 'cuda' else 'needs g++'})")
    handle = ctypes.CDLL(str(path))
    handle.trimode_block_attention.argtypes = [ctypes.POINTER(Params), ctypes.c_void_p]
    handle.trimode_block_attention.restype = ctypes.c_int
    handle.trimode_block_attention_workspace_size.argtypes = [ctypes.POINTER(Params),
                                                              ctypes.POINTER(ctypes.c_size_t)]
    handle.trimode_block_attention_workspace_size.restype = ctypes.c_int
    handle.trimode_error_string.argtypes = [ctypes.c_int]
    handle.trimode_error_string.restype = ctypes.c_char_p
    handle.trimode_backend_name.argtypes = []
    handle.trimode_backend_name.restype = ctypes.c_char_p
    handle.trimode_abi_version.argtypes = []
    handle.trimode_abi_version.restype = ctypes.c_int
    if handle.trimode_abi_version() != ABI_VERSION:
        raise PluginNotBuiltError(f"{path} has ABI {handle.trimode_abi_version()}, expected {ABI_VERSION}; "
                                  "rebuild it with `make -C plugins`")
    lib = Library(kind=kind, path=path, handle=handle)
    _LOADED[kind] = lib
    return lib


def emu_set_sm_count(count: int) -> int:
    """Sets the SM count the emulated library plans its splits for (forcing or avoiding flash decoding).

    Returns the previous count, so a test can restore it.
    """
    handle = load("emu").handle
    handle.trimode_emu_set_sm_count.argtypes = [ctypes.c_int]
    handle.trimode_emu_set_sm_count.restype = ctypes.c_int
    return handle.trimode_emu_set_sm_count(count)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


ROW_ARRAYS = ("cu_seqlens", "page_table", "cache_lens", "mask_kind", "mask_param", "write")


def make_params(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, cu_seqlens: torch.Tensor, page_table: torch.Tensor,
                cache_lens: torch.Tensor, mask_kind: torch.Tensor, mask_param: torch.Tensor,
                write: torch.Tensor | None, out: torch.Tensor, scale: float, max_chunk: int,
                max_cache_len: int = 0, workspace: torch.Tensor | None = None) -> Params:
    """Fills Params from tensors laid out per the contract; the tensors must outlive the call.

    Only the sizes are taken from the tensors (B and T from `page_table` [B, T], P and S from `k_cache`
    [P, S, Hkv, D]); checking that they are contiguous, of one dtype and int32 row arrays on the library's device
    is the caller's job (the torch op does it), because the C API cannot see strides. `write=None` passes NULL:
    no row writes.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_cache.shape
    if page_table.dim() != 2:
        raise ValueError(f"page_table must be [B, T], got shape {tuple(page_table.shape)}")
    num_rows, pages_per_row = page_table.shape
    return Params(
        abi_version=ABI_VERSION, dtype=DTYPES.get(q.dtype, -1), num_rows=num_rows, num_tokens=num_tokens,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, num_pages=num_pages,
        page_size=page_size, pages_per_row=pages_per_row, max_chunk=int(max_chunk),
        max_cache_len=int(max_cache_len), scale=float(scale),
        q=_ptr(q), k_new=_ptr(k_new), v_new=_ptr(v_new), k_cache=_ptr(k_cache), v_cache=_ptr(v_cache),
        cu_seqlens=_ptr(cu_seqlens), page_table=_ptr(page_table), cache_lens=_ptr(cache_lens),
        mask_kind=_ptr(mask_kind), mask_param=_ptr(mask_param), write=_ptr(write), out=_ptr(out),
        workspace=_ptr(workspace), workspace_size=0 if workspace is None else workspace.numel(),
    )


def max_chunk_of(cu_seqlens: torch.Tensor) -> int:
    """The tight max_chunk of host row boundaries (at least 1)."""
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    return max(1, int(lengths.max())) if lengths.numel() else 1


def block_attention_host(kind: str, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens: torch.Tensor,
                         page_table: torch.Tensor, cache_lens: torch.Tensor, mask_kind: torch.Tensor,
                         mask_param: torch.Tensor, write: torch.Tensor | None, scale: float,
                         max_chunk: int | None = None, max_cache_len: int = 0) -> torch.Tensor:
    """Runs a host-pointer library ("cpu" or "emu") on CPU tensors; mutates the caches of writing rows.

    `max_chunk=None` uses the tight bound of `cu_seqlens` (clamped to [1, N]). Raises AttentionError with the
    library's status on a rejected call.
    """
    if kind == "cuda":
        raise ValueError("the cuda library takes device pointers: use trimode.plugins.torch_op")
    lib = load(kind)
    tensors = (q, k_new, v_new, k_cache, v_cache)
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        raise ValueError("host libraries need contiguous CPU tensors")
    rows = [None if t is None else t.to(torch.int32).contiguous()
            for t in (cu_seqlens, page_table, cache_lens, mask_kind, mask_param, write)]
    if max_chunk is None:
        max_chunk = min(max_chunk_of(rows[0]), max(1, q.shape[0]))
    out = torch.empty_like(q)
    params = make_params(q, k_new, v_new, k_cache, v_cache, *rows, out, scale, max_chunk, max_cache_len)
    size = lib.workspace_size(params)
    workspace = torch.empty(size, dtype=torch.uint8) if size else None
    if workspace is not None:
        params.workspace, params.workspace_size = workspace.data_ptr(), size
    lib.check(params)
    return out


def toolchain(kind: str) -> str | None:
    """The compiler on PATH that `make -C plugins` builds this library with, or None (this machine cannot).

    The tests use it to tell "not built although it could be" (a failure) from "cannot be built here" (a skip).
    """
    import platform
    import shutil

    if kind == "cuda":
        return shutil.which(os.environ.get("NVCC", "nvcc"))
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if kind == "emu" and platform.machine() not in ("x86_64", "AMD64"):
        return None
    return compiler
