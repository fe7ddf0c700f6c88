"""The GPU path of the torch backend: static buffers, shape buckets and CUDA graphs.

A decode step of a small batch is dominated by kernel-launch overhead, not by math. Capturing a step once
into a `torch.cuda.CUDAGraph` and replaying it turns it into one graph launch. Graphs replay fixed
addresses and fixed shapes, so everything a step touches lives in static buffers: the engine owns ONE
preallocated paged KV cache, and each step's packed tensors - page tables included - are copied into the
static tensors of its bucket before the replay.

Mask kind, write flag, LoRA and the page tables are per-row (per-token) *data* of a `StepBatch`, read by the
kernel on the device, so one captured graph per bucket serves any mix of modes and any pages. A bucket is (row
bucket, token bucket, logit bucket, whether any row uses the adapter, cache-length bucket): the last two are
the only host-side choices baked into a capture (the LoRA matmuls are skipped when no row needs them; the
kernel's grid is sized for the cache-length bound). A step smaller than its bucket is padded:

* the static buffers hold `rows + 1` rows of page tables as wide as the longest sequence's; rows past the
  batch's are padding rows with cache length 0, causal mask, write 0 and no pages, so they read nothing and
  write nothing;
* the first padding row owns the padding tokens (N..N_bucket-1, token 0 at position 0); the others own none;
* padding logit indices point at token 0 and their logits are dropped; page-table entries past a row's pages
  are -1 (never read).

There is always at least one padding row, so the adapter is always applied through the per-token mask
(never the all-rows shortcut), whatever rows a capture saw.

The bookkeeping (`Bucketing`, `StaticStep`) is plain tensor code with no CUDA call, so it runs and is tested
on the CPU: with `use_graphs=False` the engine runs the same static buffers eagerly. Only `_capture` and
`replay` need a GPU. Steps of more tokens than the largest graph bucket (long prefills) run eagerly on the
engine's cache. The TensorRT backend reuses the same bucketing and padding for its graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...plugins.masks import CAUSAL
from ..cache.pool import KVCache
from ..model.network import Transformer
from .limits import EngineLimits
from .step import ChunkRow, StepBatch
from .torch_engine import TorchEngine

MIN_CACHE_BUCKET = 64
ALIGN_BYTES = 256  # every static input starts at a 256-byte boundary (TensorRT binds them as tensor addresses)


def buckets(maximum: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below the maximum, and the maximum itself."""
    out, size = [], smallest
    while size < maximum:
        out.append(size)
        size *= 2
    return out + [maximum]


def _first_at_least(options: list[int], value: int) -> int:
    return next(b for b in options if b >= value)


@dataclass(frozen=True)
class BucketKey:
    """The static shape of a step: rows, packed tokens, logits, LoRA matmuls or not, cache-length bound."""

    rows: int
    tokens: int
    logits: int
    lora: bool
    cache_len: int


class Bucketing:
    """Which bucket a step falls in (None: beyond the largest token bucket; run it eagerly)."""

    def __init__(self, max_rows: int, max_tokens: int, max_cache_len: int) -> None:
        self.rows = buckets(max_rows)
        self.tokens = buckets(max_tokens)
        self.cache = buckets(max_cache_len, MIN_CACHE_BUCKET)

    def key(self, batch: StepBatch) -> BucketKey | None:
        n, m = batch.num_tokens, int(batch.logit_index.shape[0])
        if n > self.tokens[-1] or max(m, 1) > self.tokens[-1] or len(batch.rows) > self.rows[-1]:
            return None
        return BucketKey(_first_at_least(self.rows, len(batch.rows)), _first_at_least(self.tokens, n),
                         _first_at_least(self.tokens, max(m, 1)), batch.any_lora,
                         _first_at_least(self.cache, max(batch.cache_lens)))


class StaticStep:
    """The static input buffers of one bucket, its captured graph and that graph's output."""

    def __init__(self, key: BucketKey, max_pages: int, device: torch.device | str) -> None:
        rows = key.rows + 1  # always one padding row at least
        self.key = key
        self.max_pages = max_pages
        self.device = torch.device(device)
        # Three device buffers (int64, int32, bool), each static input a 256-byte aligned slice of one of them,
        # so a step is three host-to-device copies from pinned staging buffers rather than ten.
        layout = {torch.long: [("tokens", key.tokens), ("positions", key.tokens), ("logit_index", key.logits)],
                  torch.int32: [("cu_seqlens", rows + 1), ("page_table", rows * max_pages), ("cache_lens", rows),
                                ("mask_kind", rows), ("mask_param", rows), ("write", rows)],
                  torch.bool: [("lora", key.tokens)]}
        pinned = self.device.type == "cuda"
        self._buffers: list[tuple[torch.Tensor, torch.Tensor, list[tuple[str, int, int]]]] = []
        for dtype, fields in layout.items():
            align = ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
            spans, offset = [], 0
            for name, size in fields:
                spans.append((name, offset, size))
                offset += -(-size // align) * align
            device_buffer = torch.zeros(offset, dtype=dtype, device=self.device)
            host_buffer = torch.zeros(offset, dtype=dtype, pin_memory=pinned)
            for name, start, size in spans:
                setattr(self, name, device_buffer[start: start + size])
            self._buffers.append((device_buffer, host_buffer, spans))
        self.page_table = self.page_table.view(rows, max_pages)
        self.page_table.fill_(-1)
        self._copied: torch.cuda.Event | None = None
        self.output: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.uses = 0

    @property
    def num_rows(self) -> int:
        return int(self.cache_lens.shape[0])

    def padded(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """The batch's tensors padded to this bucket (host tensors): see the module docstring."""
        n, rows, m = batch.num_tokens, len(batch.rows), int(batch.logit_index.shape[0])
        key = self.key
        if n > key.tokens or rows > key.rows or m > key.logits:
            raise ValueError(f"a step of {rows} rows, {n} tokens and {m} logits does not fit bucket {key}")
        if batch.page_table.shape[1] > self.max_pages:
            raise ValueError(f"a page table of {batch.page_table.shape[1]} pages is wider than {self.max_pages}")
        pad_rows, pad_tokens = self.num_rows - rows, key.tokens - n
        table = torch.full((self.num_rows, self.max_pages), -1, dtype=torch.int32)
        table[:rows, : batch.page_table.shape[1]] = batch.page_table

        def pad(t: torch.Tensor, count: int, value: int) -> torch.Tensor:
            return torch.cat([t.cpu(), torch.full((count,), value, dtype=t.dtype)])

        return {
            "tokens": pad(batch.tokens.long(), pad_tokens, 0),
            "positions": pad(batch.positions.long(), pad_tokens, 0),
            "lora": pad(batch.lora.bool(), pad_tokens, False),
            "cu_seqlens": pad(batch.cu_seqlens.int(), pad_rows, key.tokens),
            "page_table": table.view(-1),
            "cache_lens": pad(batch.cache_lens_t.int(), pad_rows, 0),
            "mask_kind": pad(batch.mask_kind.int(), pad_rows, CAUSAL),
            "mask_param": pad(batch.mask_param.int(), pad_rows, 0),
            "write": pad(batch.write.int(), pad_rows, 0),
            "logit_index": pad(batch.logit_index.long(), key.logits - m, 0),
        }

    def fill(self, batch: StepBatch) -> None:
        """Copy the batch, padded, into the static buffers (same addresses every step): the padded tensors are
        laid out in the pinned staging buffers, then each goes over in one asynchronous copy. The staging
        buffers are rewritten only once the previous step's copies are done."""
        padded = self.padded(batch)
        if self._copied is not None:
            self._copied.synchronize()
        for device_buffer, host_buffer, spans in self._buffers:
            for name, start, size in spans:
                host_buffer[start: start + size] = padded[name].view(-1)
            device_buffer.copy_(host_buffer, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.uses += 1

    def view(self, batch: StepBatch, exact: bool) -> StepBatch:
        """A StepBatch over the static buffers. Its host lists are the padded layout itself (`exact`, what the
        CPU attention loops over) or only the bounds a capture may bake in (the token bucket as the longest
        row, the cache-length bucket as the longest cache): the kernel reads the actual rows on the device."""
        key, rows = self.key, len(batch.rows)
        pad_rows = self.num_rows - rows
        padding = [ChunkRow([0] * (key.tokens - batch.num_tokens))]  # reads nothing, writes nothing
        padding += [ChunkRow([]) for _ in range(pad_rows - 1)]
        if exact:
            cu = list(batch.cu) + [key.tokens] * pad_rows
            cache_lens = list(batch.cache_lens) + [0] * pad_rows
        else:
            cu = [0] + [key.tokens] * self.num_rows
            cache_lens = [key.cache_len] + [0] * (self.num_rows - 1)
        logit_rows = list(batch.logit_rows) + [rows] * (key.logits - int(batch.logit_index.shape[0]))
        return StepBatch(rows=list(batch.rows) + padding, cache_lens=cache_lens,
                         tables=list(batch.tables) + [[] for _ in range(pad_rows)], cu=cu, tokens=self.tokens,
                         positions=self.positions, cu_seqlens=self.cu_seqlens, page_table=self.page_table,
                         cache_lens_t=self.cache_lens, mask_kind=self.mask_kind, mask_param=self.mask_param,
                         write=self.write, lora=self.lora, logit_index=self.logit_index, logit_rows=logit_rows)


class GraphEngine(TorchEngine):
    """TorchEngine whose steps run from static buffers per bucket, replayed as CUDA graphs on a GPU."""

    backend = "torch-cuda-graphs"

    def __init__(self, model: Transformer, limits: EngineLimits, tokenizer_path: Path | None = None,
                 use_graphs: bool | None = None, max_graph_tokens: int = 256) -> None:
        super().__init__(model, limits, tokenizer_path)
        self.use_graphs = model.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device (use_graphs=False runs them eagerly)")
        self.bucketing = Bucketing(self.limits.max_batch_size, min(max_graph_tokens, self.limits.max_step_tokens),
                                   self.limits.max_seq_len)
        self.steps: dict[BucketKey, StaticStep] = {}
        self.eager_steps = 0
        self.pool = None

    def allocate_cache(self, num_pages: int | None = None, prefix_caching: bool | None = None) -> KVCache:
        raise ValueError("a GraphEngine serves only its own cache (`engine.cache`): its CUDA graphs captured "
                         "that cache's addresses")

    def static_step(self, key: BucketKey) -> StaticStep:
        """The bucket's static buffers, allocated on first use and reused by every later step of the bucket."""
        static = self.steps.get(key)
        if static is None:
            static = self.steps[key] = StaticStep(key, self.limits.max_pages_per_sequence, self.model.device)
        return static

    def step(self, cache: KVCache, batch: StepBatch) -> torch.Tensor:
        if cache is not self.cache:
            raise ValueError("GraphEngine steps must use the engine's own cache (`engine.cache`)")
        self.limits.check_step(batch, cache.num_pages)
        key = self.bucketing.key(batch)
        if key is None:
            self.eager_steps += 1
            return super().step(cache, batch)
        if batch.any_lora and not self.model.has_lora:
            raise ValueError("this model has no LoRA adapter")
        static = self.static_step(key)
        static.fill(batch)
        view = static.view(batch, exact=self.model.device.type != "cuda")
        if self.use_graphs:
            if static.graph is None:
                self._capture(static, view)
            static.graph.replay()
            logits = static.output
        else:
            logits = self.model.forward_step(cache, view)
        return logits[: batch.num_logits].clone()

    def _capture(self, static: StaticStep, view: StepBatch) -> None:
        """Warm up on a side stream, then capture (GPU only). The warm-up runs the filled step itself: a
        writing row stores the same K/V at the same positions each time, and padding rows write nothing."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model.forward_step(self.cache, view)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static.output = self.model.forward_step(self.cache, view)
        self.pool = graph.pool()
        static.graph = graph
