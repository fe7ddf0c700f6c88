"""The TensorRT backend: building a plan from the ONNX export, and running it. The only module importing tensorrt.

NOT RUN in this project's CI: TensorRT is not installable on the CPU machines. It is written against the
TensorRT 10 Python API as documented, and engine loading refuses tensorrt engines with a clear message
where `import tensorrt` fails, so nothing else depends on it. It never imports builder/engine_build.py
(which imports this module lazily for `trimode build --backend tensorrt`): the build takes a
`TensorRTBuildSpec` and raises `TensorRTBuildError`, which the builder turns into its BuildError.

Build: the packed step graph is exported with the attention node in TensorRT's form (op `BlockAttention`,
attributes plugin_namespace="trimode", plugin_version="1", so the ONNX parser resolves it by name in the
plugin registry after the plugin library is loaded), parsed into a STRONGLY_TYPED network (precisions come
from the graph's own types, no builder precision flags), and compiled with optimization profiles over the
packed sizes - N tokens, B rows (the graph sees B + 1: the padding row), M logits - rather than per step
kind, since one step mixes kinds:

    decode   N, M in [1, max_batch]                  (one token per row)
    block    N, M in [1, max_batch * longest block]   (draft / verify / diffusion blocks, mixed with decodes)
    prefill  N, M in [1, max_step_tokens]             (prompts, quad rows, anything larger)

The page pools are inputs of [1 .. max_kv_pages] pages of a page size fixed at build (the largest pool the
engine's requests can use: max_batch x ceil(max_seq_len / page_size) pages), and the page table is
[B, ceil(max_seq_len / page_size)]. The plan and a copy of the plugin library go into the engine.

Run: one paged KV cache on the GPU, allocated once (sized by --kv-cache-memory or the free memory, at most
max_kv_pages), whose layer slices are bound directly as the k_cache.{i} / v_cache.{i} inputs (no copy). Each
step is padded to its bucket exactly as the torch GPU path does (`cuda_graphs.Bucketing` / `StaticStep`:
padding rows with cache length 0, no pages, write 0) and run
from that bucket's static buffers; buckets up to `max_graph_tokens` tokens are captured into a CUDA graph
once per (profile, bucket) (`execute_async_v3` inside `torch.cuda.graph`) and replayed, larger ones run
eagerly. The plan is stateless: the writing rows' K/V come back as new_k/new_v and are stored on the device
per `written_offsets` (graph_steps.py). All execution contexts share one user-managed activation buffer,
since steps run one after another on one stream. Block lengths the engine was not built for are refused
(`EngineLimits.check_block_length`, a CapacityError).
"""

from __future__ import annotations

import ctypes
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tensorrt as trt
import torch
from tqdm import tqdm

from ...builder.checkpoint import Checkpoint, LoraAdapter
from ...builder.convert import resolve_dtype
from ...builder.errors import CheckpointError
from ...builder.manifest import FileEntry, HashingWriter, Manifest
from ...builder.onnx_export import (
    CACHE_LENS,
    CU_SEQLENS,
    LOGIT_INDEX,
    LOGITS,
    LORA,
    MASK_KIND,
    MASK_PARAM,
    MODEL_FILE,
    NEW_K,
    NEW_V,
    PAGE_TABLE,
    POSITIONS,
    TOKENS,
    TRT_DOMAIN,
    AttentionNode,
    export_onnx,
    k_cache_name,
    onnx_opset,
    v_cache_name,
)
from ...builder.quantization import Quantization
from ..cache.pool import KVCache
from ..cache.sizing import DEFAULT_PAGE_SIZE
from ..errors import CapacityError
from .cuda_graphs import Bucketing, BucketKey, StaticStep
from .graph_steps import GraphStepEngine, choose_profile, optimization_profiles, profile_input_shapes
from .limits import EngineLimits
from .step import StepBatch

PLAN_FILE = "model.plan"
PLUGIN_DIR = "plugins"
PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION = "BlockAttention", TRT_DOMAIN, "1"
PLUGIN_LIBRARY = "libtrimode_trt_plugin.so"  # what plugins/Makefile's `tensorrt` target builds
DEFAULT_MAX_STEP_TOKENS = 2048
MAX_GRAPH_TOKENS = 256


class TensorRTBuildError(ValueError):
    """The TensorRT build cannot proceed (the builder reports it as a BuildError: one line, exit status 2)."""


@dataclass(frozen=True)
class TensorRTBuildSpec:
    """What the plan must serve (the builder's resolved plan, as plain fields)."""

    dtype: torch.dtype
    max_batch_size: int
    max_seq_len: int
    block_lengths: tuple[int, ...]
    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS
    page_size: int = DEFAULT_PAGE_SIZE
    quantization: Quantization | None = None  # fp8 only: FP8 weights behind DequantizeLinear (onnx_export.py)

    @property
    def table_pages(self) -> int:
        return -(-self.max_seq_len // self.page_size)

    @property
    def max_kv_pages(self) -> int:
        return self.max_batch_size * self.table_pages


# -- plugin library ----------------------------------------------------------------------------------------
def find_plugin_library(explicit: Path | None) -> Path:
    """The BlockAttention plugin library: given, or the one `make -C plugins tensorrt` builds."""
    if explicit is not None:
        return explicit
    default = Path(__file__).resolve().parents[2] / "plugins" / "build" / PLUGIN_LIBRARY  # the package's plugins/
    if not default.is_file():
        raise TensorRTBuildError(f"TensorRT plugin library {default} not found; run `make -C plugins tensorrt "
                                 "TRT_INCLUDE=...` on a machine with CUDA and TensorRT, or pass --plugin-library")
    return default


def load_plugin_library(path: Path) -> None:
    """Load the library and make sure it registered BlockAttention (static registration, else load_library)."""
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    registry = trt.get_plugin_registry()
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        registry.load_library(str(path))
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise CheckpointError(path, f"does not register the TensorRT plugin {PLUGIN_NAMESPACE}::{PLUGIN_NAME} "
                                    f"version {PLUGIN_VERSION}")


# -- build ---------------------------------------------------------------------------------------------------
class _BuildProgress(trt.IProgressMonitor):
    """TensorRT's build phases as tqdm bars (TensorRT calls this from several threads)."""

    def __init__(self, show: bool | None) -> None:
        trt.IProgressMonitor.__init__(self)
        self.show = show
        self.bars: dict[str, tqdm] = {}
        self.lock = threading.Lock()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self.lock:
            self.bars[phase_name] = tqdm(total=num_steps, desc=f"compiling: {phase_name}", leave=False,
                                         disable=None if self.show is None else not self.show)

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self.lock:
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(1)
        return True

    def phase_finish(self, phase_name: str) -> None:
        with self.lock:
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()


def build_tensorrt(staging: Path, checkpoint: Checkpoint, spec: TensorRTBuildSpec, lora: LoraAdapter | None,
                   plugin_library: Path | None, show: bool | None
                   ) -> tuple[dict[str, FileEntry], dict[str, str], dict[str, Any], dict[str, str]]:
    """Export, parse and compile into `staging`; returns (files, artifacts, backend options, tool versions)."""
    library = find_plugin_library(plugin_library)
    try:
        load_plugin_library(library)
    except CheckpointError as exc:
        raise TensorRTBuildError(str(exc)) from None
    scratch = staging / ".onnx-export"
    scratch.mkdir()
    with tqdm(desc="exporting ONNX for TensorRT", unit="B", unit_scale=True, leave=False,
              disable=None if show is None else not show) as bar:
        export_onnx(scratch, checkpoint, spec.dtype, lora, AttentionNode.for_tensorrt(), bar.update, spec.quantization)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(scratch / MODEL_FILE)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected the export: {errors}")
    graph_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    config = builder.create_builder_config()
    profiles = []
    for ranges in optimization_profiles(spec.max_batch_size, spec.max_step_tokens, spec.block_lengths):
        shapes = {name: value for name, value in profile_input_shapes(checkpoint.config, ranges, spec.max_kv_pages,
                                                                      spec.page_size, spec.table_pages).items()
                  if name in graph_inputs}  # `lora` exists only in graphs with an adapter
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        profiles.append({**{k: list(v) for k, v in ranges.items() if k != "name"}, "name": ranges["name"],
                         "shapes": shapes})
    monitor = _BuildProgress(show)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError("TensorRT could not build the plan (its log above says why)")
    with HashingWriter(staging / PLAN_FILE) as out:
        out.write(memoryview(serialized))
        files = {PLAN_FILE: out.close()}
    shutil.rmtree(scratch)

    (staging / PLUGIN_DIR).mkdir()
    plugin_name = f"{PLUGIN_DIR}/{library.name}"
    with HashingWriter(staging / plugin_name) as out:
        out.write(library.read_bytes())
        files[plugin_name] = out.close()
    options = {"opset": onnx_opset(spec.quantization), "attention_domain": TRT_DOMAIN,
               "plugin": {"name": PLUGIN_NAME, "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION},
               "max_step_tokens": spec.max_step_tokens, "page_size": spec.page_size,
               "max_kv_pages": spec.max_kv_pages, "profiles": profiles}
    return files, {"plan": PLAN_FILE, "plugin_library": plugin_name}, options, {"tensorrt": trt.__version__}


# -- run -----------------------------------------------------------------------------------------------------
class _Outputs:
    """The plan's output buffers for one bucket."""

    def __init__(self, engine: TensorRTEngine, key: BucketKey) -> None:
        c, dev = engine.config, engine.device
        kv_shape = (c.num_hidden_layers, key.tokens, c.num_key_value_heads, c.head_dim)
        self.tensors = {LOGITS: torch.empty(key.logits, c.vocab_size, dtype=torch.float32, device=dev),
                        NEW_K: torch.empty(kv_shape, dtype=engine.dtype, device=dev),
                        NEW_V: torch.empty(kv_shape, dtype=engine.dtype, device=dev)}


class TensorRTEngine(GraphStepEngine):
    """StepEngine on a deserialized TensorRT plan, with CUDA graphs per (profile, bucket)."""

    backend = "tensorrt"

    def __init__(self, root: Path, manifest: Manifest, use_lora: bool, limits: EngineLimits,
                 max_graph_tokens: int = MAX_GRAPH_TOKENS) -> None:
        tokenizer = root / manifest.artifacts["tokenizer"] if "tokenizer" in manifest.artifacts else None
        options = manifest.backend_options
        self.profiles: list[dict[str, Any]] = list(options["profiles"])
        max_step = int(options.get("max_step_tokens", DEFAULT_MAX_STEP_TOKENS))
        self.max_kv_pages = int(options["max_kv_pages"])
        limits = EngineLimits(limits.max_batch_size, limits.max_seq_len, min(limits.max_step_tokens, max_step),
                              tuple(manifest.block_lengths), page_size=int(options["page_size"]))
        super().__init__(manifest.config(root / "manifest.json"), resolve_dtype(manifest.dtype), limits,
                         manifest.lora is not None and use_lora, tokenizer)
        self.device = torch.device("cuda")
        self.graph_has_lora = manifest.lora is not None
        load_plugin_library(root / manifest.artifacts["plugin_library"])
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        plan_path = root / manifest.artifacts["plan"]
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise CheckpointError(plan_path, "TensorRT could not deserialize the plan (built by another TensorRT "
                                             "version or for another GPU?); rebuild the engine here")
        self.profile_index = {spec["name"]: index for index, spec in enumerate(self.profiles)}
        self.stream = torch.cuda.Stream()
        self.activations = torch.empty(self.engine.device_memory_size_v2, dtype=torch.uint8, device=self.device)
        self.contexts: dict[str, trt.IExecutionContext] = {}
        self.bucketing = Bucketing(manifest.max_batch_size, limits.max_step_tokens, manifest.max_seq_len)
        self.max_graph_tokens = max_graph_tokens
        self.steps: dict[BucketKey, tuple[StaticStep, _Outputs]] = {}

    def size_cache(self, kv_cache_memory: int | str | None = None, page_size: int | None = None,
                   prefix_caching: bool = True, identity: str = "") -> None:
        """As every engine, but the page size is the plan's and the pool at most the plan's max_kv_pages."""
        if page_size not in (None, self.limits.page_size):
            raise CapacityError(f"this TensorRT engine was built for pages of {self.limits.page_size} positions "
                                f"(asked for {page_size}); rebuild with --page-size {page_size}")
        super().size_cache(kv_cache_memory, self.limits.page_size, prefix_caching, identity)
        self.limits = replace(self.limits, kv_pages=min(self.limits.kv_pages, self.max_kv_pages))

    def allocate_cache(self, num_pages: int | None = None, prefix_caching: bool | None = None) -> KVCache:
        raise ValueError("a TensorRT engine serves only its own cache (`engine.cache`): its captured graphs "
                         "point into it")

    def _context(self, profile: str) -> trt.IExecutionContext:
        if profile not in self.contexts:
            context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            context.set_device_memory(self.activations.data_ptr(), self.activations.numel())
            context.set_optimization_profile_async(self.profile_index[profile], self.stream.cuda_stream)
            self.contexts[profile] = context
        return self.contexts[profile]

    def _bind(self, context: trt.IExecutionContext, static: StaticStep, outputs: _Outputs) -> None:
        inputs = {TOKENS: static.tokens, POSITIONS: static.positions, CU_SEQLENS: static.cu_seqlens,
                  PAGE_TABLE: static.page_table, CACHE_LENS: static.cache_lens, MASK_KIND: static.mask_kind,
                  MASK_PARAM: static.mask_param, LOGIT_INDEX: static.logit_index}
        if self.graph_has_lora:
            inputs[LORA] = static.lora
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        for layer in range(self.config.num_hidden_layers):
            for name, cache in ((k_cache_name(layer), self.cache.k), (v_cache_name(layer), self.cache.v)):
                context.set_input_shape(name, tuple(cache.shape[1:]))
                context.set_tensor_address(name, cache[layer].data_ptr())  # one layer: contiguous
        for name, tensor in outputs.tensors.items():
            context.set_tensor_address(name, tensor.data_ptr())

    def _execute(self, cache: KVCache, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if cache is not self.cache:
            raise ValueError("TensorRT engine steps must use the engine's own cache (`engine.cache`)")
        key = self.bucketing.key(batch)
        if key is None:
            raise CapacityError(f"a step of {batch.num_tokens} tokens exceeds this TensorRT engine's "
                                f"{self.limits.max_step_tokens}")
        key = BucketKey(key.rows, key.tokens, key.logits, self.graph_has_lora, 0)  # the plan sizes itself
        profile = choose_profile(self.profiles, key.tokens, key.rows + 1, key.logits)
        context = self._context(profile)
        self.stream.wait_stream(torch.cuda.current_stream())  # the last step's cache writes come first
        with torch.cuda.stream(self.stream):
            if key not in self.steps:
                self.steps[key] = (StaticStep(key, self.limits.max_pages_per_sequence, self.device),
                                   _Outputs(self, key))
            static, outputs = self.steps[key]
            static.fill(batch)
            if key.tokens > self.max_graph_tokens:  # eager; a context serves every bucket of its profile
                self._bind(context, static, outputs)
                context.execute_async_v3(self.stream.cuda_stream)
            else:
                if static.graph is None:
                    self._bind(context, static, outputs)
                    context.execute_async_v3(self.stream.cuda_stream)  # warm-up (the plan writes nothing)
                    self.stream.synchronize()
                    static.graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(static.graph, stream=self.stream):
                        context.execute_async_v3(self.stream.cuda_stream)
                static.graph.replay()  # the capture's addresses and shapes, whatever was bound since
            logits = outputs.tensors[LOGITS][: batch.logit_index.shape[0]].clone()
        torch.cuda.current_stream().wait_stream(self.stream)
        return logits, outputs.tensors[NEW_K], outputs.tensors[NEW_V]
