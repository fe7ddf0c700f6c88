"""The ONNX backend: the exported step graph run by onnxruntime on the CPU.

It is the portable check of the export: the same graph TensorRT compiles, with the attention node backed by
the reference contract (runtime/onnx_ops.py), so every step kind can be compared with the torch engine on
any machine. The KV cache is a normal `KVCache`; each step hands the graph the rows of the batch's slots,
trimmed to the longest cached prefix (positions beyond a row's cache length are never read).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...builder.config import ModelConfig
from ...builder.onnx_export import (
    CACHE_LENS,
    CHUNK_LENS,
    INPUT_IDS,
    LOGIT_INDEX,
    LOGITS,
    MASK_KIND,
    NEW_K,
    NEW_V,
    POSITIONS,
    USE_LORA,
    k_cache_name,
    v_cache_name,
)
from ..model.kv_cache import KVCache
from .graph_steps import GraphStepEngine, StepInputs


class OnnxEngine(GraphStepEngine):
    """StepEngine on an onnxruntime InferenceSession of the exported step graph (CPU)."""

    backend = "onnx"

    def __init__(self, model_path: Path, config: ModelConfig, dtype: torch.dtype, max_batch_size: int,
                 max_seq_len: int, graph_has_lora: bool, use_lora: bool, tokenizer_path: Path | None,
                 block_lengths: tuple[int, ...], threads: int | None = None) -> None:
        super().__init__(config, dtype, max_batch_size, max_seq_len, graph_has_lora and use_lora, tokenizer_path,
                         block_lengths)
        import onnxruntime as ort

        from .onnx_ops import session_options

        options = session_options()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.graph_has_lora = graph_has_lora

    def _execute(self, cache: KVCache, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(inputs.slots, dtype=torch.long)
        cached = max(1, int(inputs.cache_lens.max()))  # at least one (unread) position: no empty tensors
        feeds: dict[str, np.ndarray] = {
            INPUT_IDS: inputs.tokens.numpy(),
            POSITIONS: inputs.positions.numpy(),
            CACHE_LENS: inputs.cache_lens.numpy().astype(np.int32),
            CHUNK_LENS: inputs.chunk_lens.numpy().astype(np.int32),
            MASK_KIND: np.array([inputs.mask_kind], dtype=np.int32),
            LOGIT_INDEX: inputs.logit_index.numpy(),
        }
        if self.graph_has_lora:
            feeds[USE_LORA] = np.array([1 if inputs.lora else 0], dtype=np.int32)
        for layer in range(self.config.num_hidden_layers):
            feeds[k_cache_name(layer)] = cache.k[layer, rows, :cached].numpy()
            feeds[v_cache_name(layer)] = cache.v[layer, rows, :cached].numpy()
        logits, new_k, new_v = self.session.run([LOGITS, NEW_K, NEW_V], feeds)
        return torch.from_numpy(logits), torch.from_numpy(new_k), torch.from_numpy(new_v)
