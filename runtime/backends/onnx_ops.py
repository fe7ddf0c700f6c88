"""The `BlockAttention` node for onnxruntime on CPU, as an onnxruntime-extensions Python custom op.

onnxruntime has no op for packed attention over a caller-owned KV cache with a mask kind per row, so the
exported graph carries one custom node per layer (builder/onnx_export.py documents its contract). Here it
is backed by `plugins/reference.py`, the same function the torch engine and the CUDA kernel are checked
against, so the ONNX engine differs from the torch engine only in the surrounding graph arithmetic. The
node never writes the cache: it calls the reference with every row's write flag 0 (the host stores the
returned K/V afterwards).

Importing this module registers the op (the decorator is the registration); `session_options()` returns
options with the extensions library attached, which is what makes the registered op visible to a session.
"""

from __future__ import annotations

import numpy as np
import torch

from ...plugins.reference import block_attention_reference


def _tensor(array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if dtype is None else tensor.to(dtype)


def block_attention_numpy(q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, k_cache: np.ndarray,
                          v_cache: np.ndarray, cu_seqlens: np.ndarray, page_table: np.ndarray,
                          cache_lens: np.ndarray, mask_kind: np.ndarray, mask_param: np.ndarray, scale: float
                          ) -> np.ndarray:
    """The node's computation: the reference contract over packed rows, reading the page pools only."""
    rows = int(cache_lens.shape[0])
    out = block_attention_reference(
        _tensor(q), _tensor(k_new), _tensor(v_new), _tensor(k_cache), _tensor(v_cache),
        _tensor(cu_seqlens, torch.long), _tensor(page_table, torch.long), _tensor(cache_lens, torch.long),
        _tensor(mask_kind, torch.long), _tensor(mask_param, torch.long), torch.zeros(rows, dtype=torch.long),
        float(scale))
    return out.numpy()


def _register() -> None:
    """Register the op for fp32 graphs (onnxruntime's CPU kernels cover fp32 fully; see docs/engine-format.md)."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    tensor, index = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32

    @onnx_op(op_type="BlockAttention",
             inputs=[tensor] * 5 + [index] * 5,
             outputs=[tensor],
             attrs={"num_heads": PyCustomOpDef.dt_int64, "num_kv_heads": PyCustomOpDef.dt_int64,
                    "head_dim": PyCustomOpDef.dt_int64, "scale": PyCustomOpDef.dt_float})
    def block_attention(q, k_new, v_new, k_cache, v_cache, cu_seqlens, page_table, cache_lens, mask_kind,
                        mask_param, **attrs):
        return block_attention_numpy(q, k_new, v_new, k_cache, v_cache, cu_seqlens, page_table, cache_lens,
                                     mask_kind, mask_param, attrs["scale"])


_register()


def session_options():
    """onnxruntime SessionOptions with the extensions library (and so the Python ops) registered."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's concern
    # A quantized graph's DequantizeLinear -> MatMul is fused into MatMulNBits, which by default (accuracy level
    # 4) also rounds the activations to int8: a different model from the one every other backend runs. Level 1
    # keeps the activations in fp32 (measured: logits within 2e-6 of the torch engine's, against 1-2% at 4).
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return options
