"""Choosing the engine's device: one rule for every command and the Python API."""

from __future__ import annotations

import torch

from ..errors import DeviceError


def resolve_device(name: str | None, backend: str = "torch") -> str:
    """"auto"/None: where `backend` runs best here (onnx: cpu; torch: cuda when a GPU is visible, else cpu;
    tensorrt: cuda). An explicit "cuda" without a GPU or without the CUDA plugin is a clear error."""
    if name in (None, "auto"):
        if backend == "onnx":
            return "cpu"
        if backend == "tensorrt":
            return "cuda"  # opening the engine says precisely what is missing (TensorRT, a GPU)
        if not torch.cuda.is_available():
            return "cpu"
        name = "cuda"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is visible to torch on this machine "
                              f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)")
        check_cuda_plugin()
        return name
    if name != "cpu":
        raise DeviceError(f"unknown device {name!r} (choose auto, cpu or cuda)")
    return name


def check_cuda_plugin() -> None:
    """The CUDA engine needs the plugin's kernel; never fall back silently to the slow reference."""
    from ..model.attention import _cuda_op

    _cuda_op()
