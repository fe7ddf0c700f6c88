"""The GPU path of the torch backend: static buffers, batch buckets and CUDA graphs.

A decode step of a small batch is dominated by kernel-launch overhead, not by math. Capturing each
(step kind, batch bucket, chunk length) once into a `torch.cuda.CUDAGraph` and replaying it turns a step
into one graph launch. Graphs replay fixed addresses, so everything a step touches lives in static
buffers: the engine owns ONE preallocated KV cache (plus a scratch slot), and inputs are copied into
static tensors before each replay. A batch smaller than its bucket is padded with rows that point at the
scratch slot with a chunk length of 0, so they read nothing and write nothing.

Prefill (variable length) runs eagerly. With `use_graphs=False` the same static-buffer machinery runs
eagerly; that is how the bucketing and padding are tested on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...plugins.reference import CAUSAL
from ..model.kv_cache import KVCache
from ..model.network import Transformer
from .torch_engine import TorchEngine


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to the maximum, and the maximum itself."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return buckets + [max_batch_size]


@dataclass
class StaticStep:
    """Input/output buffers of one captured step, and its graph (None when running eagerly)."""

    tokens: torch.Tensor
    chunk_lens: torch.Tensor
    slots: torch.Tensor
    output: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class GraphEngine(TorchEngine):
    """TorchEngine whose decode/draft/verify steps replay captured graphs from static buffers."""

    backend = "torch-cuda-graphs"

    def __init__(self, model: Transformer, max_batch_size: int = 8, max_seq_len: int = 4096,
                 tokenizer_path=None, use_graphs: bool | None = None, max_graph_chunk: int = 64) -> None:
        super().__init__(model, max_batch_size, max_seq_len, tokenizer_path)
        self.use_graphs = model.device.type == "cuda" if use_graphs is None else use_graphs
        self.max_graph_chunk = max_graph_chunk
        self.buckets = batch_buckets(max_batch_size)
        self.scratch_slot = max_batch_size
        self.cache = model.new_cache(max_batch_size + 1, self.max_seq_len)
        self.steps: dict[tuple, StaticStep] = {}
        self.pool = None

    def new_cache(self, num_slots: int) -> KVCache:
        """The engine's one cache, emptied: graphs captured its addresses, so it is never reallocated."""
        super().new_cache(num_slots)  # capacity check
        self.cache.reset()
        return self.cache

    def _bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def _static(self, key: tuple, bucket: int, length: int) -> StaticStep:
        device = self.model.device
        return StaticStep(tokens=torch.zeros(bucket, length, dtype=torch.long, device=device),
                          chunk_lens=torch.zeros(bucket, dtype=torch.int32, device=device),
                          slots=torch.full((bucket,), self.scratch_slot, dtype=torch.long, device=device))

    def _forward(self, step: StaticStep, mask_kind: int, write_kv: bool, lora: bool, last_only: bool) -> torch.Tensor:
        return self.model.forward_chunk(step.tokens, step.chunk_lens, step.slots, self.cache, mask_kind, write_kv,
                                        lora=lora, last_only=last_only)

    def _capture(self, step: StaticStep, mask_kind: int, write_kv: bool, lora: bool, last_only: bool) -> None:
        """Warm up on a side stream (all rows padding: nothing is written), then capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(step, mask_kind, write_kv, lora, last_only)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step.output = self._forward(step, mask_kind, write_kv, lora, last_only)
        self.pool = graph.pool()
        step.graph = graph

    def _run(self, cache: KVCache, slots: list[int], tokens: torch.Tensor, chunk_lens: torch.Tensor,
             mask_kind: int, write_kv: bool, lora: bool, last_only: bool) -> torch.Tensor:
        if cache is not self.cache:
            raise ValueError("GraphEngine steps must use the cache returned by its new_cache()")
        length = tokens.shape[1]
        prefill = mask_kind == CAUSAL and last_only and length > 1
        if prefill or length > self.max_graph_chunk:
            return super()._run(cache, slots, tokens, chunk_lens, mask_kind, write_kv, lora, last_only)
        self._check_room(cache, slots, [int(n) for n in chunk_lens])
        batch = len(slots)
        bucket = self._bucket(batch)
        key = (mask_kind, write_kv, lora, last_only, bucket, length)
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = self._static(key, bucket, length)
            if self.use_graphs:
                self._capture(step, mask_kind, write_kv, lora, last_only)
        step.tokens.zero_()
        step.tokens[:batch] = tokens.to(step.tokens.device)
        step.chunk_lens.zero_()
        step.chunk_lens[:batch] = chunk_lens.to(step.chunk_lens.device)
        step.slots.fill_(self.scratch_slot)
        step.slots[:batch] = torch.as_tensor(slots, device=step.slots.device)
        if step.graph is not None:
            step.graph.replay()
            output = step.output
        else:
            output = self._forward(step, mask_kind, write_kv, lora, last_only)
        return output[:batch].clone()
