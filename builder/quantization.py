"""Quantization schemes: what `trimode build --quantize` stores for a matrix, defined once.

A quantized engine stores some [out, in] matrices (the projections and, by default, the LM head) in fewer
bytes; the embedding, the norms and the LoRA draft adapter stay in the serving dtype. Stored tensor names are
the converted name plus a suffix:

    int8  per output channel, symmetric:  W = q * scale          qweight int8 [N, K]      scales [N]
    int4  groups of `group_size` along K:  W = (q - 8) * s + z    qweight uint8 [N, K/2]   scales, zeros [N, K/g]
          (two 4-bit codes per byte, the even column in the low nibble: a portable layout; the CPU kernel's
          own layout is made when the engine is opened)
    fp8   E4M3 per output channel:        W = q * scale          qweight f8e4m3 [N, K]    scales [N] fp32

int8 and int4 scales (and int4 zero points) are stored in the serving dtype, the form torch's weight-only
kernels take; the kernels that compute with them are in runtime/model/quant.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a method needs it: the manifest (and `--help`) stay torch-free
    import torch

SCHEMES = ("int8", "int4", "fp8")
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
QUANTIZED_PARTS = ("qkv", "o", "gate_up", "down")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] in 0..15 -> the stored int4 layout uint8 [N, K/2], the even column in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4."""
    import torch

    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


@dataclass(frozen=True)
class Quantization:
    """What an engine's manifest records under build.quantization (absent for an unquantized engine)."""

    scheme: str
    group_size: int | None = None  # int4 only
    head: bool = True  # the LM head is quantized too (the embedding never is)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme '{self.scheme}' (this trimode knows "
                             f"{', '.join(SCHEMES)})")
        if self.scheme == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} "
                             f"(got {self.group_size})")
        if self.scheme != "int4" and self.group_size is not None:
            raise ValueError(f"--group-size applies to int4 only ({self.scheme} is per output channel)")

    @classmethod
    def parse(cls, scheme: str, group_size: int | None = None, head: bool = True) -> Quantization:
        """From build options: int4's group size defaults to 128."""
        if scheme == "int4" and group_size is None:
            group_size = DEFAULT_INT4_GROUP
        return cls(scheme, group_size, head)

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": self.group_size, "head": self.head}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Quantization:
        """Raises ValueError naming the scheme when this code does not know it (a newer engine)."""
        return cls(str(data.get("scheme")), data.get("group_size"), bool(data.get("head", True)))

    def quantizes(self, name: str) -> bool:
        """Whether the converted tensor `name` is stored quantized: the projections, and the head if chosen."""
        if name == "head":
            return self.head
        return name.rsplit(".", 1)[-1] in QUANTIZED_PARTS

    def check_shape(self, name: str, shape: tuple[int, ...]) -> str | None:
        """Why `name` of this shape cannot be quantized with this scheme, or None."""
        if self.scheme == "int4" and shape[1] % self.group_size:
            divisors = [g for g in INT4_GROUP_SIZES if shape[1] % g == 0]
            return (f"'{name}' has {shape[1]} input features, not a multiple of the int4 group size "
                    f"{self.group_size} (sizes that fit: {', '.join(map(str, divisors)) or 'none'})")
        return None

    def stored_specs(self, name: str, shape: tuple[int, ...], dtype: torch.dtype
                     ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The stored tensors (name -> dtype, shape) that hold one quantized [N, K] matrix."""
        import torch

        n, k = shape
        if self.scheme == "int8":
            return {f"{name}.qweight": (torch.int8, (n, k)), f"{name}.scales": (dtype, (n,))}
        if self.scheme == "int4":
            groups = (n, k // self.group_size)
            return {f"{name}.qweight": (torch.uint8, (n, k // 2)), f"{name}.scales": (dtype, groups),
                    f"{name}.zeros": (dtype, groups)}
        return {f"{name}.qweight": (torch.float8_e4m3fn, (n, k)), f"{name}.scales": (torch.float32, (n,))}

    def quantize(self, name: str, weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Quantize one fp32 [N, K] matrix (build time; deterministic: same weights, same bytes).

        Codes are computed against the scales as stored (already rounded to their dtype), so dequantizing
        reproduces the nearest representable weight."""
        import torch

        w = weight.float()
        if self.scheme == "int8":
            scale = (w.abs().amax(dim=1) / 127.0).to(dtype)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
            return {f"{name}.qweight": q, f"{name}.scales": scale}
        if self.scheme == "int4":
            g = w.view(w.shape[0], -1, self.group_size)
            low, high = g.amin(dim=2), g.amax(dim=2)
            scale = ((high - low) / 15.0).to(dtype)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = (low + 8.0 * scale.float()).to(dtype)
            codes = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8.0).clamp(0, 15)
            codes = codes.to(torch.uint8).view(w.shape)
            return {f"{name}.qweight": pack_int4(codes).contiguous(), f"{name}.scales": scale, f"{name}.zeros": zero}
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {f"{name}.qweight": q, f"{name}.scales": scale}
