"""The `BlockAttention` node for onnxruntime on CPU, as an onnxruntime-extensions Python custom op.

onnxruntime has no op for attention over a caller-owned KV cache with a per-sequence mask kind, so the
exported graph carries one custom node per layer (builder/onnx_export.py documents its contract). Here it
is backed by `plugins/reference.py`, the same function the torch engine and the CUDA kernel are checked
against, so the ONNX engine differs from the torch engine only in the surrounding graph arithmetic.

Importing this module registers the op (the decorator is the registration); `session_options()` returns
options with the extensions library attached, which is what makes the registered op visible to a session.
"""

from __future__ import annotations

import numpy as np
import torch

from ...plugins.reference import block_attention_reference


def block_attention_numpy(q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, k_cache: np.ndarray,
                          v_cache: np.ndarray, cache_lens: np.ndarray, chunk_lens: np.ndarray,
                          mask_kind: np.ndarray, scale: float) -> np.ndarray:
    """The node's computation: row b of the batch uses row b of the caches; the caches are only read."""
    batch = q.shape[0]
    out = block_attention_reference(
        torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(np.ascontiguousarray(k_new)),
        torch.from_numpy(np.ascontiguousarray(v_new)), torch.from_numpy(np.ascontiguousarray(k_cache)),
        torch.from_numpy(np.ascontiguousarray(v_cache)), torch.arange(batch),
        torch.from_numpy(cache_lens.astype(np.int64)), torch.from_numpy(chunk_lens.astype(np.int64)),
        int(mask_kind.reshape(-1)[0]), False, float(scale))
    return out.numpy()


def _register() -> None:
    """Register the op for fp32 graphs (onnxruntime's CPU kernels cover fp32 fully; see docs/engine-format.md)."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    tensor, index = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32

    @onnx_op(op_type="BlockAttention",
             inputs=[tensor, tensor, tensor, tensor, tensor, index, index, index],
             outputs=[tensor],
             attrs={"num_heads": PyCustomOpDef.dt_int64, "num_kv_heads": PyCustomOpDef.dt_int64,
                    "head_dim": PyCustomOpDef.dt_int64, "scale": PyCustomOpDef.dt_float})
    def block_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, chunk_lens, mask_kind, **attrs):
        return block_attention_numpy(q, k_new, v_new, k_cache, v_cache, cache_lens, chunk_lens, mask_kind,
                                     attrs["scale"])


_register()


def session_options():
    """onnxruntime SessionOptions with the extensions library (and so the Python ops) registered."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's concern
    return options
