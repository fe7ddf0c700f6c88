"""The ONNX backend: the exported step graph run by onnxruntime on the CPU.

It is the portable check of the export: the same graph TensorRT compiles, with the attention node backed by
the reference contract (runtime/backends/onnx_ops.py), so every mix of rows can be compared with the torch
engine on any machine. The KV cache is the engine's paged `KVCache`; each step hands the graph only the pages
its rows read (renumbered 0..), and writes the returned K/V back through the rows' page tables per
`written_offsets` (graph_steps.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...builder.config import ModelConfig
from ...builder.onnx_export import LOGITS, NEW_K, NEW_V, k_cache_name, v_cache_name
from ..cache.pool import KVCache
from .graph_steps import GraphStepEngine, graph_inputs
from .limits import EngineLimits
from .step import StepBatch


class OnnxEngine(GraphStepEngine):
    """StepEngine on an onnxruntime InferenceSession of the exported step graph (CPU, fp32)."""

    backend = "onnx"

    def __init__(self, model_path: Path, config: ModelConfig, dtype: torch.dtype, limits: EngineLimits,
                 graph_has_lora: bool, use_lora: bool, tokenizer_path: Path | None, threads: int | None = None
                 ) -> None:
        super().__init__(config, dtype, limits, graph_has_lora and use_lora, tokenizer_path)
        import onnxruntime as ort

        from .onnx_ops import session_options

        options = session_options()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.graph_has_lora = graph_has_lora

    def _execute(self, cache: KVCache, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = cache.page_size
        read = [table[: -(-past // size)] for table, past in zip(batch.tables, batch.cache_lens, strict=True)]
        used = sorted({page for pages in read for page in pages}) or [0]  # at least one (unread) page
        renumber = {page: i for i, page in enumerate(used)}
        table = torch.full((len(read), max(1, max(len(p) for p in read))), -1, dtype=torch.int32)
        for b, pages in enumerate(read):
            table[b, : len(pages)] = torch.tensor([renumber[p] for p in pages], dtype=torch.int32)
        inputs = graph_inputs(batch, self.graph_has_lora, page_table=table)
        feeds: dict[str, np.ndarray] = {name: tensor.numpy() for name, tensor in inputs.items()}
        index = torch.as_tensor(used, dtype=torch.long)
        keys = cache.k[:, index].contiguous()  # [layers, pages read, S, Hkv, D]: only the pages read
        values = cache.v[:, index].contiguous()
        for layer in range(self.config.num_hidden_layers):
            feeds[k_cache_name(layer)] = keys[layer].numpy()
            feeds[v_cache_name(layer)] = values[layer].numpy()
        logits, new_k, new_v = self.session.run([LOGITS, NEW_K, NEW_V], feeds)
        return torch.from_numpy(logits), torch.from_numpy(new_k), torch.from_numpy(new_v)
