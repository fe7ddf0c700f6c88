"""Weight-only quantized matmuls: the kernels behind a quantized engine (schemes: builder/quantization.py).

The quantized model is *defined* by `QuantizedLinear.dequantize()`: y = x @ dequantize().T in the compute
dtype. Every kernel below computes that product (up to floating-point rounding), so every mode sees one model
and spec/quad stay exact relative to AR on the same engine.

Kernels, chosen per call from the number of tokens M in the matmul (a step packs all its rows):

* torch's own packed weight-only kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`)
  for 0 < M <= `packed_max_tokens(scheme, dtype)`: they read the small weights once and win for decode.
* otherwise dequantize-then-matmul in tiles of output channels small enough to stay in cache (wide rows:
  prefill, verify, quad, denoise), where the packed kernels' per-token cost grows faster than a GEMM's.
* fp8 on a CUDA device with FP8 tensor cores: `torch._scaled_mm` with the activations quantized per token
  (the W8A8 "dynamic fp8" of vLLM and TensorRT-LLM); everywhere else fp8 is dequantized.

The crossover table comes from `benchmarks/quantization.py` on the project's CPU machine (benchmarks/RESULTS.md);
the packed kernels have no vectorized fp32 path, so fp32 engines always dequantize.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

from ...builder.quantization import FP8_MAX, Quantization, pack_int4, unpack_int4

QUANTIZED_SUFFIXES = (".qweight", ".scales", ".zeros")  # a quantized matrix's stored parts
TILE_BYTES = 1 << 20  # dequantized tile size of the wide-row path (compute dtype bytes)

# Largest M (tokens in one matmul) for which the packed kernel beats dequantize-then-matmul, per scheme and
# compute dtype on the CPU (measured: benchmarks/RESULTS.md, "Quantized weights"). 0 = always dequantize.
PACKED_MAX_TOKENS: dict[tuple[str, torch.dtype], int] = {
    ("int8", torch.bfloat16): 16, ("int8", torch.float16): 16, ("int8", torch.float32): 0,
    ("int4", torch.bfloat16): 128, ("int4", torch.float16): 128, ("int4", torch.float32): 0,
}


def packed_max_tokens(scheme: str, dtype: torch.dtype) -> int:
    return PACKED_MAX_TOKENS.get((scheme, dtype), 0)


# torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`, innerKTiles 2) interleaves the codes of blocks
# of 64 output rows (the last block holds the rest); it is not documented, so it is found by packing probes.
INT4_CPU_BLOCK = 64
INT4_PACK_CHUNK = 4096  # rows packed at a time at load (a multiple of the block: the same bytes as all at once)
_INT4_LAYOUTS: dict[tuple[int, int], torch.Tensor] = {}


def _cpu_pack_int4(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)


def int4_cpu_layout(rows: int, k: int) -> torch.Tensor:
    """Index I with codes.view(-1) == unpack_int4(packed).view(-1)[I] for one block of `rows` x `k` codes."""
    key = (rows, k)
    if key not in _INT4_LAYOUTS:
        index = torch.arange(rows * k).view(rows, k)
        source = torch.zeros(rows * k, dtype=torch.int64)
        digit = 0
        while 16 ** digit < rows * k:  # each probe's codes are one base-16 digit of every code's own index
            slots = unpack_int4(_cpu_pack_int4((index >> (4 * digit)) & 15)).reshape(-1).long()
            source |= slots << (4 * digit)
            digit += 1
        inverse = torch.empty_like(source)
        inverse[source] = torch.arange(rows * k)
        _INT4_LAYOUTS[key] = inverse
    return _INT4_LAYOUTS[key]


_INTERLEAVED: dict[int, bool] = {}


def int4_blocks_interleave_halves(k: int) -> bool:
    """Whether a full 64-row block of torch's layout is the codes ordered [k][row % 32][row // 32] (what
    torch 2.13 does), checked once per K against the probed layout, so a torch with another layout only
    takes the slower gather."""
    if k not in _INTERLEAVED:
        half = INT4_CPU_BLOCK // 2
        structured = torch.arange(INT4_CPU_BLOCK * k).view(k, half, 2).permute(2, 1, 0).reshape(-1)
        _INTERLEAVED[k] = torch.equal(structured, int4_cpu_layout(INT4_CPU_BLOCK, k))
    return _INTERLEAVED[k]


class QuantizedLinear:
    """One quantized [N, K] matrix: `layer(x)` is x @ dequantize().T in the compute dtype."""

    def __init__(self, quant: Quantization, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.quant = quant
        self.scheme = quant.scheme
        self.dtype = dtype
        self.qweight: torch.Tensor | None = _aligned(stored["qweight"])  # the portable codes (None: see _packed)
        self.scales = _aligned(stored["scales"])
        self.zeros = None if stored.get("zeros") is None else _aligned(stored["zeros"])
        self.out_features = stored["qweight"].shape[0]
        self.in_features = stored["qweight"].shape[1] * (2 if self.scheme == "int4" else 1)
        self._packed: torch.Tensor | None = None  # int4 on the CPU: torch's layout, the only copy kept
        self._scales_zeros: torch.Tensor | None = None
        self._scales_c: torch.Tensor | None = None  # per-channel scales in the compute dtype
        self._block_scales: torch.Tensor | None = None  # int4 scales and offsets in torch's CPU block order
        self._block_offsets: torch.Tensor | None = None
        self._scaled_mm_ok = True
        self._packed_max_tokens = 0
        self._prepare()

    def _prepare(self) -> None:
        """Device-specific forms. int4 on the CPU is repacked into torch's layout (which needs 16 | N; other
        shapes keep the portable codes and always dequantize) and the portable copy is dropped: the wide-row
        path reads the codes back out of torch's layout, so int4 stays at half a byte per weight in memory."""
        fits = self.scheme == "int8" or (self.scheme == "int4" and self.out_features % 16 == 0)
        on_cpu = self.scales.device.type == "cpu"
        self._packed_max_tokens = packed_max_tokens(self.scheme, self.dtype) if fits and on_cpu else 0
        if self.scheme == "int4" and fits and on_cpu and self.qweight is not None:
            chunks = [_cpu_pack_int4(unpack_int4(self.qweight[start:start + INT4_PACK_CHUNK]))
                      for start in range(0, self.out_features, INT4_PACK_CHUNK)]
            self._packed = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
            self._scales_zeros = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).contiguous()
            self.qweight = None

    def _int4_codes(self, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """The rows' codes (0..15) written into `out` [n, K] (any dtype), from whichever form is held; rows
        in torch's CPU layout start on a 64-row block."""
        if self._packed is None:
            return out.copy_(unpack_int4(self.qweight[rows]))
        start, stop, _ = rows.indices(self.out_features)
        if start % INT4_CPU_BLOCK:
            raise ValueError(f"int4 rows must start on a {INT4_CPU_BLOCK}-row block (got {start})")
        k, half = self.in_features, INT4_CPU_BLOCK // 2
        full = (stop - start) // INT4_CPU_BLOCK * INT4_CPU_BLOCK
        if full and int4_blocks_interleave_halves(k):
            # byte (k, r) of a block holds row r's code at column k in its low nibble and row r + 32's in its high
            packed = self._packed[start:start + full].view(full // INT4_CPU_BLOCK, k, half)
            target = out[:full].view(full // INT4_CPU_BLOCK, 2, half, k)
            target[:, 0].copy_((packed & 0xF).transpose(1, 2))
            target[:, 1].copy_((packed >> 4).transpose(1, 2))
        elif full:
            slots = unpack_int4(self._packed[start:start + full]).view(full // INT4_CPU_BLOCK, -1)
            out[:full].copy_(slots[:, int4_cpu_layout(INT4_CPU_BLOCK, k)].view(full, k))
        if rest := stop - start - full:  # the last, partial block
            slots = unpack_int4(self._packed[start + full:stop]).view(-1)
            out[full:].copy_(slots[int4_cpu_layout(rest, k)].view(rest, k))
        return out

    @property
    def device(self) -> torch.device:
        return self.scales.device

    @property
    def nbytes(self) -> int:
        """Bytes held for this matrix (what a step reads through the packed kernel)."""
        codes = self.qweight if self._packed is None else self._packed
        parts = [codes, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def to(self, device: torch.device | str) -> QuantizedLinear:
        if torch.device(device) == self.device:
            return self
        if self.qweight is None:
            codes = torch.empty(self.out_features, self.in_features, dtype=torch.uint8)
            self.qweight = pack_int4(self._int4_codes(slice(None), codes))
        self.qweight = self.qweight.to(device)
        self.scales = self.scales.to(device)
        self.zeros = None if self.zeros is None else self.zeros.to(device)
        self._packed = self._scales_zeros = self._scales_c = self._block_scales = self._block_offsets = None
        self._prepare()
        return self

    # -- the definition ---------------------------------------------------------------------------------
    def dequantize(self, rows: slice = slice(None), out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight rows [n, K] in the compute dtype: what every kernel multiplies by. Computed in fp32 (exact:
        an 8-bit code times a scale fits fp32's mantissa), then rounded once to the compute dtype; `out` (an
        [n, K] tensor of the compute dtype) receives it without allocating."""
        start, stop, _ = rows.indices(self.out_features)
        n = stop - start
        scratch = _scratch((n, self.in_features), torch.float32, self.device)
        if self.scheme == "int4":
            group = self.quant.group_size
            self._int4_codes(rows, scratch)
            grouped = scratch.view(n, -1, group)
            scales = self.scales[rows].float()[..., None]
            grouped.mul_(scales).add_(self.zeros[rows].float()[..., None] - 8.0 * scales)
        else:
            scratch.copy_(self.qweight[rows]).mul_(self.scales[rows, None].float())
        if out is None:
            return scratch.to(self.dtype, copy=True)
        return out.copy_(scratch)

    # -- kernels ----------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.device.type == "cuda" and self.scheme == "fp8" and self._scaled_mm_ok:
            out = self._fp8_scaled_mm(flat)
        elif self.device.type == "cpu" and 0 < flat.shape[0] <= self._packed_max_tokens:
            out = self._packed_mm(flat)
        else:
            out = self._dequantized_mm(flat)
        return out.view(*x.shape[:-1], self.out_features)

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "int8":
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.qweight, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self._packed, self.quant.group_size,
                                                          self._scales_zeros)

    def _dequantized_mm(self, x: torch.Tensor) -> torch.Tensor:
        """Tiles of output channels, each expanded into a reused buffer and multiplied while in cache.

        int8 and fp8 codes are exact in every compute dtype, so their tiles are the plain codes and the
        per-channel scale multiplies the tile's output columns: (x @ q.T) * s = x @ (q * s).T, one pass less."""
        if torch.is_grad_enabled():  # differentiable (training-style callers): the plain product, no reuse
            return F.linear(x, self.dequantize())
        if self._packed is not None and int4_blocks_interleave_halves(self.in_features):
            return self._int4_block_mm(x)
        tile = max(INT4_CPU_BLOCK, TILE_BYTES // (self.in_features * 4) // INT4_CPU_BLOCK * INT4_CPU_BLOCK)
        out = x.new_empty(x.shape[0], self.out_features)
        buffer = _scratch((min(tile, self.out_features), self.in_features), self.dtype, x.device, slot=1)
        per_channel = self.scheme != "int4"
        if per_channel and self._scales_c is None:
            self._scales_c = self.scales.to(self.dtype)
        for start in range(0, self.out_features, tile):
            rows = slice(start, min(start + tile, self.out_features))
            weight = buffer[: rows.stop - rows.start]
            if per_channel:
                weight.copy_(self.qweight[rows])
                torch.mul(F.linear(x, weight), self._scales_c[rows], out=out[:, rows])
            else:
                out[:, rows] = F.linear(x, self.dequantize(rows, weight))
        return out

    def _int4_block_mm(self, x: torch.Tensor) -> torch.Tensor:
        """int4 wide rows straight from torch's CPU layout: each 64-row block expands, with contiguous passes,
        into two [K, 32] fp32 matrices (rows r and r + 32 of the block), multiplied in one batched matmul; no
        transposition of codes. Computed in fp32 (the weights before their rounding to the compute dtype)."""
        k, group, half = self.in_features, self.quant.group_size, INT4_CPU_BLOCK // 2
        blocks = self.out_features // INT4_CPU_BLOCK
        if self._block_scales is None:
            full = blocks * INT4_CPU_BLOCK
            scales, zeros = self.scales[:full].float(), self.zeros[:full].float()
            layout = (blocks, 2, half, k // group)
            self._block_scales = scales.reshape(layout).permute(0, 1, 3, 2).contiguous()
            self._block_offsets = (zeros - 8.0 * scales).reshape(layout).permute(0, 1, 3, 2).contiguous()
        per_tile = max(1, 4 * TILE_BYTES // (INT4_CPU_BLOCK * k * 4))
        xf = x.float()
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        scratch = _scratch((per_tile * 2 * k, half), torch.float32, x.device, slot=2)
        for b0 in range(0, blocks, per_tile):
            count = min(per_tile, blocks - b0)
            packed = self._packed[b0 * INT4_CPU_BLOCK:(b0 + count) * INT4_CPU_BLOCK].view(count, k, half)
            weights = scratch[: count * 2 * k].view(count, 2, k, half)
            weights[:, 0].copy_(packed & 0xF)
            weights[:, 1].copy_(packed >> 4)
            grouped = weights.view(count, 2, k // group, group, half)
            grouped.mul_(self._block_scales[b0:b0 + count, :, :, None]).add_(
                self._block_offsets[b0:b0 + count, :, :, None])
            y = torch.matmul(xf, weights.view(count * 2, k, half))  # [2 * count, M, 32]
            columns = slice(b0 * INT4_CPU_BLOCK, (b0 + count) * INT4_CPU_BLOCK)
            out[:, columns] = y.permute(1, 0, 2).reshape(x.shape[0], count * INT4_CPU_BLOCK)
        if blocks * INT4_CPU_BLOCK < self.out_features:  # the partial last block
            tail = slice(blocks * INT4_CPU_BLOCK, self.out_features)
            out[:, tail] = F.linear(xf, self.dequantize(tail).float())
        return out.to(x.dtype)

    def _fp8_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """FP8 tensor cores: activations quantized per token, weights per channel, output in the compute dtype.
        Falls back to dequantizing (for good) where the device or shape is not supported."""
        x_scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
        xq = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        try:
            return torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.scales[None, :],
                                    out_dtype=self.dtype)
        except RuntimeError:
            self._scaled_mm_ok = False
            return self._dequantized_mm(x)


ALIGNMENT = 64


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor at a 64-byte aligned address (a copy if it is not). safetensors offsets are only 8-byte
    aligned, and torch's packed int8 kernel reads past that assumption: it crashed (SIGSEGV) on a
    memory-mapped weight at 4 and more rows, and runs on the same bytes copied to aligned memory."""
    if tensor.device.type == "cpu" and tensor.data_ptr() % ALIGNMENT:
        return tensor.clone()
    return tensor


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    """A per-thread buffer reused across calls (dequantized tiles would otherwise cost an allocation, and on
    glibc often a fresh mmap with its page faults, every tile of every matmul). Under autograd a fresh tensor
    (autograd may save it). Inference-mode tensors are kept apart: they may not be written outside it."""
    if torch.is_grad_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    key = (slot, dtype, device, torch.is_inference_mode_enabled())
    cache = getattr(_SCRATCH, "buffers", None)
    if cache is None:
        cache = _SCRATCH.buffers = {}
    numel = shape[0] * shape[1]
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedLinear) -> torch.Tensor:
    """x @ weight.T for a plain or a quantized weight (the network's one matmul entry point)."""
    if isinstance(weight, QuantizedLinear):
        return weight(x)
    return F.linear(x, weight)


def gather_quantized(weights: dict[str, torch.Tensor], quant: Quantization, dtype: torch.dtype
                     ) -> dict[str, torch.Tensor | QuantizedLinear]:
    """Stored tensors (name.qweight, name.scales, ...) -> one QuantizedLinear per quantized name."""
    out: dict[str, Any] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights.items():
        base, _, suffix = name.rpartition(".")
        if name.endswith(QUANTIZED_SUFFIXES) and base:
            parts.setdefault(base, {})[suffix] = tensor
        else:
            out[name] = tensor
    for base, stored in parts.items():
        out[base] = QuantizedLinear(quant, stored, dtype)
    return out
