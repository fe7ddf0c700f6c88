"""How many KV pages an engine gets: from `--kv-cache-memory`, or a default that fits the machine.

* An explicit size (`512MiB`, `4GiB`, `1.5GB`, or bytes) buys `size // bytes_per_page` pages.
* On CUDA the default is what is free after the weights, times `--gpu-memory-utilization` (0.9), less a
  reserve for activations (like vLLM's `gpu_memory_utilization`).
* On the CPU the default is what the engine's requests can use at most (`max_batch_size` sequences of
  `max_seq_len` positions), capped at CPU_MEMORY_SHARE (20%) of the memory the weights leave free
  (MemTotal minus the weights' bytes). The 8B shape (16 GB of bf16 weights) therefore opens with about
  1.4 GiB of KV on a 23 GiB machine.

A pool too small for even one page, or more than the device has, is a clear error, never a crash later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import CapacityError

DEFAULT_PAGE_SIZE = 16
CPU_MEMORY_SHARE = 0.2
GPU_MEMORY_UTILIZATION = 0.9
GPU_ACTIVATION_RESERVE = 1 << 30
UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
         "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str | int) -> int:
    """Bytes from `4GiB`, `512MiB`, `1.5GB`, `2048` (decimal units: kB/MB/GB, binary: KiB/MiB/GiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in UNITS:
            raise CapacityError(f"'{text}' is not a memory size (examples: 512MiB, 4GiB, 1.5GB, 1073741824)")
        value = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if value <= 0:
        raise CapacityError(f"a memory size must be positive, got {text!r}")
    return value


def bytes_per_page(num_layers: int, kv_heads: int, head_dim: int, itemsize: int, page_size: int) -> int:
    """K and V of `page_size` positions across every layer."""
    return 2 * num_layers * kv_heads * head_dim * itemsize * page_size


@dataclass(frozen=True)
class MemoryInfo:
    total: int       # bytes of the device (RAM for the CPU)
    available: int   # bytes free now


def cpu_memory() -> MemoryInfo:
    """MemTotal and MemAvailable from /proc/meminfo (or os.sysconf where that is missing)."""
    try:
        fields = {}
        with open("/proc/meminfo") as handle:
            for line in handle:
                name, value = line.split(":", 1)
                fields[name] = int(value.split()[0]) * 1024
        return MemoryInfo(fields["MemTotal"], fields.get("MemAvailable", fields["MemFree"]))
    except (OSError, KeyError, ValueError):
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return MemoryInfo(total, total // 2)


def default_cpu_kv_bytes(need: int, weight_bytes: int, memory: MemoryInfo) -> int:
    """The CPU default: what the requests can use (`need`), at most CPU_MEMORY_SHARE of what the weights leave."""
    share = int(CPU_MEMORY_SHARE * max(memory.total - weight_bytes, 0))
    return min(need, share)


def default_gpu_kv_bytes(free: int, total: int, utilization: float = GPU_MEMORY_UTILIZATION) -> int:
    """The CUDA default: free memory after the weights, within `utilization` of the device, less a reserve."""
    used = total - free
    return int(total * utilization) - used - GPU_ACTIVATION_RESERVE


def plan_pages(kv_bytes: int, page_bytes: int, page_size: int, max_seq_len: int, what: str) -> int:
    """Pages bought by `kv_bytes`; a CapacityError if that cannot hold even one page."""
    pages = kv_bytes // page_bytes
    if pages < 1:
        raise CapacityError(f"{what} ({kv_bytes} bytes) cannot hold one KV page of {page_size} positions "
                            f"({page_bytes} bytes); give more with --kv-cache-memory")
    return pages
