"""Memory-mapped reading of safetensors files, with errors that name the file.

The format is an 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}},
then the raw bytes. Reading it ourselves lets us (a) check a file completely before touching its data — a
truncated download is reported as such instead of as a crash in the middle of a build — and (b) map the file
copy-on-write, so a checkpoint of many GB is paged in on demand and never held twice in memory.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in its file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One safetensors file, validated on open and memory-mapped; tensors are views of the map."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(self.path, "file not found")
        self.size = self.path.stat().st_size
        self.tensors = self._read_header()
        self._map: mmap.mmap | None = None

    def _read_header(self) -> dict[str, TensorInfo]:
        if self.size < 8:
            raise CheckpointError(self.path, f"truncated safetensors file ({self.size} bytes, no header)")
        with open(self.path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > MAX_HEADER or 8 + header_len > self.size:
                raise CheckpointError(self.path, f"truncated or corrupt safetensors file (header of "
                                                 f"{header_len} bytes in a file of {self.size})")
            try:
                header = json.loads(handle.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(self.path, "corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(self.path, "corrupt safetensors header (not an object)")
        base = 8 + header_len
        infos: dict[str, TensorInfo] = {}
        data_end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(self.path, f"corrupt safetensors header entry for '{name}'") from None
            if dtype_name not in DTYPES:
                raise CheckpointError(self.path, f"tensor '{name}' has unsupported dtype {dtype_name}")
            dtype = DTYPES[dtype_name]
            numel = 1
            for dim in shape:
                numel *= int(dim)
            if end - begin != numel * dtype.itemsize:
                raise CheckpointError(self.path, f"tensor '{name}' byte range does not match its shape")
            infos[name] = TensorInfo(name, dtype, tuple(int(d) for d in shape), base + begin, base + end)
            data_end = max(data_end, end)
        if base + data_end > self.size:
            raise CheckpointError(self.path, f"truncated safetensors file: data needs {base + data_end} "
                                             f"bytes, file has {self.size}")
        return infos

    def get(self, name: str) -> torch.Tensor:
        """A tensor backed by the memory map (copy-on-write: writing to it never touches the file)."""
        info = self.tensors[name]
        numel = (info.end - info.start) // info.dtype.itemsize
        if numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._map is None:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(self._map, dtype=info.dtype, count=numel, offset=info.start)
        return flat.view(info.shape)


    def read(self, name: str) -> torch.Tensor:
        """A copy of the tensor in fresh (64-byte aligned) memory, read with plain file reads: nothing of the
        file is mapped into the process, so a tensor that is only needed transformed costs no resident pages
        beyond the copy."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if out.numel():
            with open(self.path, "rb") as handle:
                handle.seek(info.start)
                handle.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out


def safetensors_header(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus padded JSON header of a file holding these tensors in sorted name order.

    The one header writer: `write_safetensors` and the streaming engine build (which writes tensors one at a
    time after this header) both use it, so their files are byte-identical.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, (dtype, shape) in sorted(specs.items()):
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                      ) -> None:
    """Write tensors in sorted name order, so the same tensors always give the same bytes."""
    ordered = sorted(tensors.items())
    header = safetensors_header({name: (t.dtype, tuple(t.shape)) for name, t in ordered}, metadata)
    with open(path, "wb") as handle:
        handle.write(header)
        for _, tensor in ordered:
            data = tensor.detach().contiguous().cpu()
            if data.numel():
                handle.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
