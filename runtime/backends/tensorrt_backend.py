"""The TensorRT backend: building a plan from the ONNX export, and running it. The only module importing tensorrt.

NOT RUN in this project's CI: TensorRT is not installable on the CPU machines. It is written against the
TensorRT 10 Python API as documented, and engine loading refuses tensorrt engines with a clear message
where `import tensorrt` fails, so nothing else depends on it.

Build: the step graph is exported with the attention node in TensorRT's form (op `BlockAttention`,
attributes plugin_namespace="trimode", plugin_version="1", so the ONNX parser resolves it by name in the
plugin registry after the plugin library is loaded), parsed into a STRONGLY_TYPED network (precisions
come from the graph's own types, no builder precision flags), and compiled with one optimization profile
per step shape: `prefill` (T from 1 to max_seq_len, last-token logits), `decode` (T = 1) and `block{n}`
for every built block length n (draft and verify passes, all n logits). The KV-cache inputs are bound at
their full built length L = max_seq_len, so their shape never changes. The plan and a copy of the plugin
library go into the engine directory.

Run: one KV cache on the GPU, allocated once; graph row r is cache slot r, so each layer's cache input is
bound to a slice of that cache with no copy (rows of a batch that do not take part get chunk length 0:
they read nothing, and their outputs are ignored). Every (profile, batch bucket) except prefill gets its
own static input/output buffers and is captured into a CUDA graph once (`execute_async_v3` inside
`torch.cuda.graph`), then replayed; prefill runs eagerly. All execution contexts share one
user-managed activation buffer, since steps run one after another on one stream.
"""

from __future__ import annotations

import ctypes
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorrt as trt
import torch
from tqdm import tqdm

from ...builder.checkpoint import Checkpoint, LoraAdapter
from ...builder.convert import resolve_dtype
from ...builder.engine_build import BuildError, BuildPlan
from ...builder.errors import CheckpointError
from ...builder.manifest import FileEntry, HashingWriter, Manifest
from ...builder.onnx_export import (
    CACHE_LENS,
    CHUNK_LENS,
    INPUT_IDS,
    LOGIT_INDEX,
    LOGITS,
    MASK_KIND,
    MODEL_FILE,
    NEW_K,
    NEW_V,
    OPSET,
    POSITIONS,
    TRT_DOMAIN,
    USE_LORA,
    AttentionNode,
    export_onnx,
    k_cache_name,
    v_cache_name,
)
from ..model.kv_cache import KVCache
from .cuda_graphs import batch_buckets
from .graph_steps import GraphStepEngine, StepInputs
from .torch_engine import CapacityError

PLAN_FILE = "model.plan"
PLUGIN_DIR = "plugins"
PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION = "BlockAttention", TRT_DOMAIN, "1"
PREFILL, DECODE = "prefill", "decode"
PLUGIN_LIBRARY = "libtrimode_trt_plugin.so"  # what plugins/Makefile's `tensorrt` target builds


# -- plugin library ----------------------------------------------------------------------------------------
def find_plugin_library(explicit: Path | None) -> Path:
    """The BlockAttention plugin library: given, or the one `make -C plugins tensorrt` builds."""
    if explicit is not None:
        return explicit
    default = Path(__file__).resolve().parent.parent / "plugins" / "build" / PLUGIN_LIBRARY
    if not default.is_file():
        raise BuildError(f"TensorRT plugin library {default} not found; run `make -C plugins tensorrt "
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
def profile_shapes(checkpoint_config: Any, plan: BuildPlan) -> list[dict[str, Any]]:
    """Optimization profiles: name plus (min, opt, max) shapes of every dynamic input."""
    c = checkpoint_config
    batch, length = plan.max_batch_size, plan.max_seq_len

    def shapes(t: tuple[int, int, int], n: tuple[int, int, int], b_opt: int) -> dict[str, list[list[int]]]:
        b = (1, b_opt, batch)
        out = {
            INPUT_IDS: [[b[k], t[k]] for k in range(3)],
            POSITIONS: [[b[k], t[k]] for k in range(3)],
            CACHE_LENS: [[b[k]] for k in range(3)],
            CHUNK_LENS: [[b[k]] for k in range(3)],
            LOGIT_INDEX: [[b[k], n[k]] for k in range(3)],
        }
        for layer in range(c.num_hidden_layers):
            for name in (k_cache_name(layer), v_cache_name(layer)):
                out[name] = [[b[k], length, c.num_key_value_heads, c.head_dim] for k in range(3)]
        return out

    profiles = [{"name": PREFILL, "shapes": shapes((1, min(length, 512), length), (1, 1, 1), 1)},
                {"name": DECODE, "shapes": shapes((1, 1, 1), (1, 1, 1), batch)}]
    for n in plan.block_lengths:
        profiles.append({"name": f"block{n}", "shapes": shapes((n, n, n), (n, n, n), batch)})
    return profiles


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


def build_tensorrt(staging: Path, checkpoint: Checkpoint, plan: BuildPlan, lora: LoraAdapter | None,
                   plugin_library: Path | None, show: bool | None
                   ) -> tuple[dict[str, FileEntry], dict[str, str], dict[str, Any], dict[str, str]]:
    """Export, parse and compile into `staging`; returns (files, artifacts, backend options, tool versions)."""
    library = find_plugin_library(plugin_library)
    load_plugin_library(library)
    scratch = staging / ".onnx-export"
    scratch.mkdir()
    with tqdm(desc="exporting ONNX for TensorRT", unit="B", unit_scale=True, leave=False,
              disable=None if show is None else not show) as bar:
        export_onnx(scratch, checkpoint, plan.torch_dtype, lora, AttentionNode.for_tensorrt(), bar.update)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(scratch / MODEL_FILE)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT's ONNX parser rejected the export: {errors}")
    config = builder.create_builder_config()
    profiles = profile_shapes(checkpoint.config, plan)
    for spec in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in spec["shapes"].items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    monitor = _BuildProgress(show)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT could not build the plan (its log above says why)")
    with HashingWriter(staging / PLAN_FILE) as out:
        out.write(memoryview(serialized))
        files = {PLAN_FILE: out.close()}
    shutil.rmtree(scratch)

    (staging / PLUGIN_DIR).mkdir()
    plugin_name = f"{PLUGIN_DIR}/{library.name}"
    with HashingWriter(staging / plugin_name) as out:
        out.write(library.read_bytes())
        files[plugin_name] = out.close()
    options = {"opset": OPSET, "attention_domain": TRT_DOMAIN,
               "plugin": {"name": PLUGIN_NAME, "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION},
               "profiles": profiles}
    return files, {"plan": PLAN_FILE, "plugin_library": plugin_name}, options, {"tensorrt": trt.__version__}


# -- run -----------------------------------------------------------------------------------------------------
@dataclass
class _StaticStep:
    """Device buffers of one (profile, bucket) step and its captured graph (None for eager prefill)."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None


class TensorRTEngine(GraphStepEngine):
    """StepEngine on a deserialized TensorRT plan, with CUDA graphs per (profile, batch bucket)."""

    backend = "tensorrt"

    def __init__(self, root: Path, manifest: Manifest, use_lora: bool, max_batch_size: int, max_seq_len: int
                 ) -> None:
        tokenizer = root / manifest.artifacts["tokenizer"] if "tokenizer" in manifest.artifacts else None
        super().__init__(manifest.config(root / "manifest.json"), resolve_dtype(manifest.dtype), max_batch_size,
                         max_seq_len, manifest.lora is not None and use_lora, tokenizer, manifest.block_lengths)
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
        self.profiles = {spec["name"]: index for index, spec in enumerate(manifest.backend_options["profiles"])}
        self.stream = torch.cuda.Stream()
        self.activations = torch.empty(self.engine.device_memory_size_v2, dtype=torch.uint8, device=self.device)
        self.contexts: dict[str, trt.IExecutionContext] = {}
        c = self.config
        self.cache = KVCache(c.num_hidden_layers, manifest.max_batch_size, manifest.max_seq_len,
                             c.num_key_value_heads, c.head_dim, self.dtype, self.device)
        self.buckets = batch_buckets(manifest.max_batch_size)
        self.steps: dict[tuple[str, int], _StaticStep] = {}

    def new_cache(self, num_slots: int) -> KVCache:
        """The engine's one cache, emptied: the plan's inputs and the captured graphs point into it."""
        self.check_batch(num_slots)
        self.cache.reset()
        return self.cache

    def _context(self, profile: str) -> trt.IExecutionContext:
        if profile not in self.contexts:
            context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            context.set_device_memory(self.activations.data_ptr(), self.activations.numel())
            context.set_optimization_profile_async(self.profiles[profile], self.stream.cuda_stream)
            self.contexts[profile] = context
        return self.contexts[profile]

    def _profile_for(self, inputs: StepInputs) -> str:
        length, rows = inputs.tokens.shape[1], inputs.logit_index.shape[1]
        if length == 1:
            return DECODE
        if rows == length and length in self.block_lengths:
            return f"block{length}"
        if rows == 1:
            return PREFILL
        raise CapacityError(f"block length {length} was not built into this TensorRT engine (built: "
                            f"{', '.join(map(str, self.block_lengths))}); rebuild with --block-length {length}")

    def _bind(self, context: trt.IExecutionContext, step: _StaticStep, bucket: int) -> None:
        for name, tensor in step.inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        c = self.config
        for layer in range(c.num_hidden_layers):
            for name, cache in ((k_cache_name(layer), self.cache.k), (v_cache_name(layer), self.cache.v)):
                context.set_input_shape(name, (bucket, self.cache.max_len, c.num_key_value_heads, c.head_dim))
                context.set_tensor_address(name, cache[layer].data_ptr())  # rows 0..bucket-1: contiguous
        for name, tensor in step.outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())

    def _allocate(self, bucket: int, length: int, rows: int) -> _StaticStep:
        c, dev = self.config, self.device
        inputs = {
            INPUT_IDS: torch.zeros(bucket, length, dtype=torch.long, device=dev),
            POSITIONS: torch.zeros(bucket, length, dtype=torch.long, device=dev),
            CACHE_LENS: torch.zeros(bucket, dtype=torch.int32, device=dev),
            CHUNK_LENS: torch.zeros(bucket, dtype=torch.int32, device=dev),
            MASK_KIND: torch.zeros(1, dtype=torch.int32, device=dev),
            LOGIT_INDEX: torch.zeros(bucket, rows, dtype=torch.long, device=dev),
        }
        if self.graph_has_lora:
            inputs[USE_LORA] = torch.zeros(1, dtype=torch.int32, device=dev)
        kv_shape = (c.num_hidden_layers, bucket, length, c.num_key_value_heads, c.head_dim)
        outputs = {LOGITS: torch.empty(bucket, rows, c.vocab_size, dtype=torch.float32, device=dev),
                   NEW_K: torch.empty(kv_shape, dtype=self.dtype, device=dev),
                   NEW_V: torch.empty(kv_shape, dtype=self.dtype, device=dev)}
        return _StaticStep(inputs, outputs)

    def _fill(self, step: _StaticStep, inputs: StepInputs, bucket: int) -> None:
        """Scatter the batch's rows to their slots' rows; other rows get chunk length 0."""
        rows = torch.as_tensor(inputs.slots, dtype=torch.long, device=self.device)
        length = inputs.tokens.shape[1]
        buf = step.inputs
        buf[INPUT_IDS].zero_()
        buf[INPUT_IDS][rows] = inputs.tokens.to(self.device)
        buf[CHUNK_LENS].zero_()
        buf[CHUNK_LENS][rows] = inputs.chunk_lens.to(self.device)
        buf[CACHE_LENS].copy_(self.cache.lens[:bucket])
        buf[POSITIONS].copy_(buf[CACHE_LENS][:, None].long() + torch.arange(length, device=self.device))
        buf[LOGIT_INDEX].zero_()
        buf[LOGIT_INDEX][rows] = inputs.logit_index.to(self.device)
        buf[MASK_KIND].fill_(inputs.mask_kind)
        if USE_LORA in buf:
            buf[USE_LORA].fill_(1 if inputs.lora else 0)

    def _execute(self, cache: KVCache, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if cache is not self.cache:
            raise ValueError("TensorRT engine steps must use the cache returned by its new_cache()")
        profile = self._profile_for(inputs)
        bucket = next(b for b in self.buckets if b >= max(inputs.slots) + 1)
        length, rows = inputs.tokens.shape[1], inputs.logit_index.shape[1]
        context = self._context(profile)
        with torch.cuda.stream(self.stream):
            if profile == PREFILL:
                step = self._allocate(bucket, length, rows)
                self._fill(step, inputs, bucket)
                self._bind(context, step, bucket)
                context.execute_async_v3(self.stream.cuda_stream)
            else:
                step = self.steps.get((profile, bucket))
                if step is None:
                    step = self.steps[(profile, bucket)] = self._allocate(bucket, length, rows)
                    self._bind(context, step, bucket)
                    context.execute_async_v3(self.stream.cuda_stream)  # all rows length 0: reads/writes nothing
                    self.stream.synchronize()
                    step.graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(step.graph, stream=self.stream):
                        context.execute_async_v3(self.stream.cuda_stream)
                self._fill(step, inputs, bucket)
                step.graph.replay()
            index = torch.as_tensor(inputs.slots, dtype=torch.long, device=self.device)
            logits = step.outputs[LOGITS][index].clone()
            new_k = step.outputs[NEW_K][:, index].clone()
            new_v = step.outputs[NEW_V][:, index].clone()
        torch.cuda.current_stream().wait_stream(self.stream)
        return logits, new_k, new_v
