"""ONNX export: ONE stateless step graph over a packed batch of rows (any mix of mask kinds).

The graph is built node by node with `onnx.helper` straight from the converted weights, not traced: every
name and every byte is fixed by the config and the weights, so the export is deterministic, and weights are
streamed into one external-data file a tensor at a time (no 2 GiB protobuf limit, no second copy in
memory). The graph has no state: the caller owns the paged KV cache, passes its pages in, and writes the
returned K/V of the writing rows into it itself, at the offsets `plugins.masks.written_offsets` names,
through the rows' page tables (no in-place updates inside the graph).

Graph inputs (N packed tokens, B rows, M logits, P cache pages of S positions, T page-table columns; dims are
symbolic). They are exactly the tensors of a `runtime.backends.step.StepBatch`:

    tokens      [N]   int64     the rows' chunk tokens, packed end to end (no padding)
    positions   [N]   int64     absolute position of each token (RoPE and the Llama-4 query scale)
    cu_seqlens  [B+1] int32     row b owns tokens cu_seqlens[b] .. cu_seqlens[b+1]-1
    page_table  [B, T] int32    cache position p of row b is in page page_table[b, p // S], offset p % S
    cache_lens  [B]   int32     valid cached positions of row b
    mask_kind   [B]   int32     0 causal | 1 bidirectional | 2 quad(L) | 3 prefix_block(m)
    mask_param  [B]   int32     quad: L; prefix_block: m; otherwise 0
    lora        [N]   bool      the draft adapter's delta is added to o_proj at this token (only in graphs
                                exported with an adapter)
    logit_index [M]   int64     packed tokens whose logits are wanted
    k_cache.{i}, v_cache.{i}  [P, S, Hkv, D] (serving dtype), one pair per layer i: the page pool; a row's
                positions >= its cache length are never read

Graph outputs:

    logits        [M, V] float32
    new_k, new_v  [layers, N, Hkv, D] (serving dtype): every token's key (RoPE applied) and value; the host
                  stores the writing rows' written offsets into the cache

Per-layer caches (rather than one [layers, ...] tensor) let TensorRT bind each input to a slice of one
preallocated cache without a copy.

Quantized engines (`--quantize`, builder/quantization.py): each quantized matrix is stored in its scheme's
bytes (transposed to [in, out]) and expanded by a standard `DequantizeLinear` in front of its MatMul, so
onnxruntime and TensorRT run the same graph; the quantized model is exactly runtime/model/quant.py's:

    int8  DequantizeLinear(q int8 [K, N], scales [N], axis=1)                          (opset 17)
    fp8   Cast(DequantizeLinear(q float8e4m3fn [K, N], scales fp32 [N], axis=1))         (opset 19)
    int4  DequantizeLinear(q - 8 as int4 [K, N], scales [K/g, N], axis=0, block_size=g)  (opset 21)
          plus the zero points' share: MatMul(ReduceSum over each group of x, zeros [K/g, N])

The attention node contract (one node per layer; `plugins/reference.py` semantics in onnxruntime, the
C++/CUDA plugin in TensorRT):

    op_type  "BlockAttention"
    domain   "ai.onnx.contrib" for onnxruntime-extensions; for TensorRT the op is resolved by name in the
             plugin registry, so the export uses domain "trimode" and adds the string attributes
             plugin_namespace="trimode" and plugin_version="1"
    inputs   q [N, Hq, D], k_new [N, Hkv, D], v_new [N, Hkv, D], k_cache [P, S, Hkv, D],
             v_cache [P, S, Hkv, D], cu_seqlens [B+1] int32, page_table [B, T] int32, cache_lens [B] int32,
             mask_kind [B] int32, mask_param [B] int32
    attrs    num_heads (int), num_kv_heads (int), head_dim (int), scale (float: head_dim ** -0.5)
    output   [N, Hq, D], same dtype as q: `block_attention_reference` with write = 0 for every row (the node
             never writes the cache; tokens owned by no row are zero); softmax in fp32
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .. import __version__
from ..runtime.model.rope import inverse_frequencies
from .checkpoint import Checkpoint, LoraAdapter
from .config import ModelConfig
from .convert import converted_names, iter_converted
from .engine_weights import tensor_bytes
from .manifest import FileEntry, HashingWriter
from .quantization import Quantization, unpack_int4

OPSET = 17
IR_VERSION = 8
# quantized graphs need DequantizeLinear's newer types: fp8 (opset 19), blocked int4 (opset 21)
QUANTIZED_OPSET = {"int8": 17, "fp8": 19, "int4": 21}
QUANTIZED_IR_VERSION = {17: 8, 19: 9, 21: 10}
ORT_DOMAIN = "ai.onnx.contrib"
TRT_DOMAIN = "trimode"
ATTENTION_OP = "BlockAttention"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DATA_ALIGNMENT = 4096  # page-aligned offsets, so runtimes may memory-map the weights

TOKENS, POSITIONS, CU_SEQLENS, PAGE_TABLE = "tokens", "positions", "cu_seqlens", "page_table"
CACHE_LENS, MASK_KIND, MASK_PARAM, LORA, LOGIT_INDEX = "cache_lens", "mask_kind", "mask_param", "lora", "logit_index"
ROW_INPUTS = (CU_SEQLENS, PAGE_TABLE, CACHE_LENS, MASK_KIND, MASK_PARAM)  # the node's int32 inputs, in order
LOGITS, NEW_K, NEW_V = "logits", "new_k", "new_v"
ONNX_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
               torch.bfloat16: TensorProto.BFLOAT16}

Progress = Callable[[int], None]


def k_cache_name(layer: int) -> str:
    return f"k_cache.{layer}"


def v_cache_name(layer: int) -> str:
    return f"v_cache.{layer}"


@dataclass(frozen=True)
class AttentionNode:
    """Where the attention op is looked up: an onnxruntime custom-op domain, or TensorRT's plugin registry."""

    domain: str = ORT_DOMAIN
    plugin_namespace: str | None = None
    plugin_version: str | None = None

    @classmethod
    def for_tensorrt(cls, namespace: str = TRT_DOMAIN, version: str = "1") -> AttentionNode:
        return cls(domain=TRT_DOMAIN, plugin_namespace=namespace, plugin_version=version)


def _transposed(name: str) -> bool:
    """2-D weights are stored [in, out] for MatMul; the embedding stays [vocab, hidden] for Gather."""
    return name != "embed" and not name.endswith("norm")


class _GraphBuilder:
    """Collects nodes and initializers with deterministic, readable names."""

    def __init__(self, dtype: int, opset: int = OPSET) -> None:
        self.dtype = dtype
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0
        self._shared: set[str] = set()

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "",
           **attrs: object) -> list[str]:
        self._count += 1
        out = [name] if outputs == 1 else [f"{name}.{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, out, name=f"n{self._count}.{name}", domain=domain,
                                           **attrs))
        return out

    def one(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        return self.op(op_type, inputs, name, **attrs)[0]

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def shared_const(self, name: str, value: np.ndarray) -> str:
        """A constant several nodes share: added the first time its name is asked for."""
        if name not in self._shared:
            self._shared.add(self.const(name, value))
        return name

    def scalar(self, name: str, value: float, dtype: int) -> str:
        """A 0-d constant of an ONNX dtype (bf16 via helper, which numpy cannot represent)."""
        self.initializers.append(helper.make_tensor(name, dtype, [], [value]))
        return name

    def cast(self, x: str, to: int, name: str, current: int) -> str:
        return x if to == current else self.one("Cast", [x], name, to=to)


def _external_tensor(name: str, dtype: int, shape: tuple[int, ...], offset: int, length: int) -> TensorProto:
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = dtype
    tensor.dims.extend(shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def onnx_opset(quant: Quantization | None) -> int:
    return OPSET if quant is None else QUANTIZED_OPSET[quant.scheme]


def _int4_bytes(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 values (flattened row-major) two per byte, the first in the low nibble (ONNX's INT4)."""
    flat = (codes.reshape(-1) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def _onnx_parts(name: str, stored: dict[str, torch.Tensor], quant: Quantization
                ) -> list[tuple[str, int, tuple[int, ...], torch.Tensor]]:
    """(initializer name, ONNX dtype, shape, bytes tensor) of one quantized matrix, laid out for MatMul."""
    q, scales = stored[f"{name}.qweight"], stored[f"{name}.scales"]
    if quant.scheme == "int4":
        codes = (unpack_int4(q).to(torch.int8) - 8).t().contiguous()
        zeros = stored[f"{name}.zeros"].t().contiguous()
        return [(f"{name}.qweight", TensorProto.INT4, tuple(codes.shape), _int4_bytes(codes)),
                (f"{name}.scales", ONNX_DTYPES[scales.dtype], tuple(scales.t().shape), scales.t().contiguous()),
                (f"{name}.zeros", ONNX_DTYPES[zeros.dtype], tuple(zeros.shape), zeros)]
    qtype = TensorProto.INT8 if quant.scheme == "int8" else TensorProto.FLOAT8E4M3FN
    qt = q.t().contiguous()
    return [(f"{name}.qweight", qtype, tuple(qt.shape), qt),
            (f"{name}.scales", ONNX_DTYPES[scales.dtype], tuple(scales.shape), scales)]


def write_weight_data(path: Path, checkpoint: Checkpoint, dtype: torch.dtype, lora: LoraAdapter | None,
                      progress: Progress | None = None, quant: Quantization | None = None
                      ) -> tuple[list[TensorProto], FileEntry]:
    """Stream every converted weight (2-D ones transposed; quantized ones as their parts) into one
    page-aligned external-data file."""
    makers = dict(iter_converted(checkpoint, dtype, lora))
    full = dict(iter_converted(checkpoint, torch.float32, lora)) if quant is not None else {}
    onnx_dtype = ONNX_DTYPES[dtype]
    tensors: list[TensorProto] = []
    with HashingWriter(path) as out:
        for name in converted_names(checkpoint.config, lora is not None):
            if quant is not None and quant.quantizes(name):
                parts = _onnx_parts(name, quant.quantize(name, full[name](), dtype), quant)
            else:
                tensor = makers[name]()
                if _transposed(name) and tensor.dim() == 2:
                    tensor = tensor.t()
                parts = [(name, onnx_dtype, tuple(tensor.shape), tensor)]
            for part, part_dtype, shape, tensor in parts:
                out.pad_to(DATA_ALIGNMENT)
                offset = out.size
                out.write(tensor_bytes(tensor))
                tensors.append(_external_tensor(part, part_dtype, shape, offset, out.size - offset))
                if progress is not None:
                    progress(tensor.numel() * tensor.element_size())
            del parts
        return tensors, out.close()


def _rotary_tables(g: _GraphBuilder, config: ModelConfig) -> tuple[str, str, str]:
    """cos/sin [N, 1, D] and the Llama-4 query scale [N, 1, 1], from positions, as runtime/model/rope.py."""
    dt = g.dtype
    pos = g.one("Cast", [POSITIONS], "rope/pos_f", to=TensorProto.FLOAT)
    axis_last = g.const("const/axis_last", np.array([-1], dtype=np.int64))
    inv_freq = g.const("rope/inv_freq", inverse_frequencies(config).numpy().astype(np.float32))
    freqs = g.one("Mul", [g.one("Unsqueeze", [pos, axis_last], "rope/pos_u"), inv_freq], "rope/freqs")
    emb = g.one("Concat", [freqs, freqs], "rope/emb", axis=-1)
    axis_head = g.const("const/axis_head", np.array([1], dtype=np.int64))
    tables = []
    for fn in ("Cos", "Sin"):
        value = g.one(fn, [emb], f"rope/{fn.lower()}_f")
        if config.attention_factor != 1.0:
            factor = g.const(f"rope/attention_factor_{fn.lower()}", np.array(config.attention_factor, np.float32))
            value = g.one("Mul", [value, factor], f"rope/{fn.lower()}_scaled")
        value = g.cast(value, dt, f"rope/{fn.lower()}_cast", TensorProto.FLOAT)
        tables.append(g.one("Unsqueeze", [value, axis_head], f"rope/{fn.lower()}"))
    rope = config.rope
    one = g.const("const/one_f", np.array(1.0, np.float32))
    original = g.const("rope/original", np.array(float(rope.original_max_position_embeddings or 1), np.float32))
    beta = g.const("rope/beta", np.array(rope.llama_4_scaling_beta, np.float32))
    steps = g.one("Floor", [g.one("Div", [pos, original], "qscale/div")], "qscale/floor")
    log = g.one("Log", [g.one("Add", [steps, one], "qscale/add1")], "qscale/log")
    scale = g.one("Add", [g.one("Mul", [log, beta], "qscale/mul"), one], "qscale/scale_f")
    scale = g.cast(scale, dt, "qscale/cast", TensorProto.FLOAT)
    axes = g.const("const/axes_head_dim", np.array([1, 2], dtype=np.int64))
    return tables[0], tables[1], g.one("Unsqueeze", [scale, axes], "qscale")


def _rms_norm(g: _GraphBuilder, x: str, weight: str, eps: str, name: str) -> str:
    """RMSNorm in fp32, cast back before the weight multiplies (runtime/model/network.py's rms_norm)."""
    xf = g.cast(x, TensorProto.FLOAT, f"{name}/x_f", g.dtype)
    square = g.one("Mul", [xf, xf], f"{name}/sq")
    if g.opset >= 18:  # ReduceMean's axes moved from an attribute to an input in opset 18
        mean = g.one("ReduceMean", [square, "const/axis_last"], f"{name}/mean", keepdims=1)
    else:
        mean = g.one("ReduceMean", [square], f"{name}/mean", axes=[-1], keepdims=1)
    inv = g.one("Reciprocal", [g.one("Sqrt", [g.one("Add", [mean, eps], f"{name}/eps")], f"{name}/sqrt")],
                f"{name}/inv")
    normed = g.cast(g.one("Mul", [xf, inv], f"{name}/normed_f"), g.dtype, f"{name}/normed", TensorProto.FLOAT)
    return g.one("Mul", [weight, normed], name)


def _rotate(g: _GraphBuilder, x: str, cos: str, sin: str, half: str, name: str) -> str:
    """x * cos + rotate_half(x) * sin (rotate-half convention of runtime/model/rope.py)."""
    x1, x2 = g.op("Split", [x, half], f"{name}/halves", outputs=2, axis=-1)
    rotated = g.one("Concat", [g.one("Neg", [x2], f"{name}/neg"), x1], f"{name}/rotated", axis=-1)
    return g.one("Add", [g.one("Mul", [x, cos], f"{name}/cos"), g.one("Mul", [rotated, sin], f"{name}/sin")], name)


def _matmul(g: _GraphBuilder, x: str, weight: str, in_features: int, quant: Quantization | None, name: str) -> str:
    """x @ weight, where a quantized weight is expanded by DequantizeLinear first (module docstring)."""
    if quant is None or not quant.quantizes(weight):
        return g.one("MatMul", [x, weight], name)
    parts = [f"{weight}.qweight", f"{weight}.scales"]
    if quant.scheme == "int4":
        group = quant.group_size
        w = g.one("DequantizeLinear", parts, f"{name}/dequantize", axis=0, block_size=group)
        codes = g.one("MatMul", [x, w], f"{name}/codes")
        shape = g.shared_const(f"const/groups_{in_features}", np.array([0, in_features // group, group], np.int64))
        sums = g.one("ReduceSum", [g.one("Reshape", [x, shape], f"{name}/grouped"), "const/axis_last"],
                     f"{name}/group_sums", keepdims=0)
        return g.one("Add", [codes, g.one("MatMul", [sums, f"{weight}.zeros"], f"{name}/zero_share")], name)
    w = g.one("DequantizeLinear", parts, f"{name}/dequantize", axis=1)
    if quant.scheme == "fp8":  # fp32 scales (runtime/model/quant.py rounds q * s once, to the serving dtype)
        w = g.cast(w, g.dtype, f"{name}/weight", TensorProto.FLOAT)
    return g.one("MatMul", [x, w], name)


def graph_inputs(config: ModelConfig, dtype: torch.dtype, with_lora: bool) -> list[onnx.ValueInfoProto]:
    """The graph's inputs in order (see the module docstring)."""
    c, dt = config, ONNX_DTYPES[dtype]
    inputs = [
        helper.make_tensor_value_info(TOKENS, TensorProto.INT64, ["tokens"]),
        helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, ["tokens"]),
        helper.make_tensor_value_info(CU_SEQLENS, TensorProto.INT32, ["rows_plus_one"]),
        helper.make_tensor_value_info(PAGE_TABLE, TensorProto.INT32, ["rows", "table_pages"]),
        *(helper.make_tensor_value_info(name, TensorProto.INT32, ["rows"]) for name in ROW_INPUTS[2:]),
    ]
    if with_lora:
        inputs.append(helper.make_tensor_value_info(LORA, TensorProto.BOOL, ["tokens"]))
    inputs.append(helper.make_tensor_value_info(LOGIT_INDEX, TensorProto.INT64, ["logits"]))
    for i in range(c.num_hidden_layers):
        for name in (k_cache_name(i), v_cache_name(i)):
            inputs.append(helper.make_tensor_value_info(name, dt, ["cache_pages", "page_size",
                                                                   c.num_key_value_heads, c.head_dim]))
    return inputs


def build_graph(config: ModelConfig, weights: list[TensorProto], dtype: torch.dtype, lora: LoraAdapter | None,
                attention: AttentionNode, quant: Quantization | None = None) -> onnx.ModelProto:
    """The step graph over the given (external) weight initializers; see the module docstring."""
    c = config
    dt = ONNX_DTYPES[dtype]
    opset = onnx_opset(quant)
    g = _GraphBuilder(dt, opset)
    g.initializers.extend(weights)
    heads, kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim

    eps = g.const("const/eps", np.array(c.rms_norm_eps, np.float32))
    qkv_split = g.const("const/qkv_split", np.array([q_dim, kv_dim, kv_dim], dtype=np.int64))
    gate_split = g.const("const/gate_split", np.array([c.intermediate_size] * 2, dtype=np.int64))
    half = g.const("const/rope_half", np.array([head_dim // 2] * 2, dtype=np.int64))
    q_shape = g.const("const/q_shape", np.array([0, heads, head_dim], dtype=np.int64))
    kv_shape = g.const("const/kv_shape", np.array([0, kv_heads, head_dim], dtype=np.int64))
    flat_shape = g.const("const/flat_shape", np.array([0, q_dim], dtype=np.int64))
    axis0 = g.const("const/axis0", np.array([0], dtype=np.int64))
    cos, sin, qscale = _rotary_tables(g, c)
    gate = None
    if lora is not None:  # [N, 1]: 1 where the adapter applies, so rows of one step may differ
        axis1 = g.const("const/axis1", np.array([1], dtype=np.int64))
        gate = g.one("Unsqueeze", [g.one("Cast", [LORA], "lora/gate_flat", to=dt), axis1], "lora/gate")
        lora_scale = g.scalar("lora/scale", lora.scale, dt)

    attn_attrs: dict[str, object] = {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
                                     "scale": float(head_dim ** -0.5)}
    if attention.plugin_namespace is not None:
        attn_attrs["plugin_namespace"] = attention.plugin_namespace
    if attention.plugin_version is not None:
        attn_attrs["plugin_version"] = attention.plugin_version

    h = g.one("Gather", ["embed", TOKENS], "embed/out", axis=0)  # [N, hidden]
    new_k, new_v = [], []
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}"
        x = _rms_norm(g, h, f"{p}.attn_norm", eps, f"{p}/attn_norm")
        qkv = _matmul(g, x, f"{p}.qkv", c.hidden_size, quant, f"{p}/qkv")
        q, k, v = g.op("Split", [qkv, qkv_split], f"{p}/split", outputs=3, axis=-1)
        q = g.one("Reshape", [q, q_shape], f"{p}/q_heads")
        k = g.one("Reshape", [k, kv_shape], f"{p}/k_heads")
        v = g.one("Reshape", [v, kv_shape], f"{p}/v")
        q = g.one("Mul", [_rotate(g, q, cos, sin, half, f"{p}/q_rope"), qscale], f"{p}/q")
        k = _rotate(g, k, cos, sin, half, f"{p}/k")
        attn = g.one(ATTENTION_OP, [q, k, v, k_cache_name(i), v_cache_name(i), *ROW_INPUTS], f"{p}/attention",
                     domain=attention.domain, **attn_attrs)
        flat = g.one("Reshape", [attn, flat_shape], f"{p}/attn_flat")
        out = _matmul(g, flat, f"{p}.o", q_dim, quant, f"{p}/o")
        if gate is not None:
            low = g.one("MatMul", [flat, f"{p}.lora_a"], f"{p}/lora_low")
            delta = g.one("Mul", [g.one("MatMul", [low, f"{p}.lora_b"], f"{p}/lora_up"), lora_scale],
                          f"{p}/lora_scaled")
            out = g.one("Add", [out, g.one("Mul", [delta, gate], f"{p}/lora_delta")], f"{p}/o_lora")
        h = g.one("Add", [h, out], f"{p}/attn_residual")
        x = _rms_norm(g, h, f"{p}.mlp_norm", eps, f"{p}/mlp_norm")
        gate_proj, up = g.op("Split", [_matmul(g, x, f"{p}.gate_up", c.hidden_size, quant, f"{p}/gate_up"), gate_split],
                             f"{p}/gate_up_split", outputs=2, axis=-1)
        silu = g.one("Mul", [gate_proj, g.one("Sigmoid", [gate_proj], f"{p}/sigmoid")], f"{p}/silu")
        down = _matmul(g, g.one("Mul", [silu, up], f"{p}/swiglu"), f"{p}.down", c.intermediate_size, quant,
                       f"{p}/down")
        h = g.one("Add", [h, down], f"{p}/mlp_residual")
        new_k.append(g.one("Unsqueeze", [k, axis0], f"{p}/k_out"))
        new_v.append(g.one("Unsqueeze", [v, axis0], f"{p}/v_out"))

    picked = g.one("Gather", [h, LOGIT_INDEX], "head/rows", axis=0)  # [M, hidden]
    x = _rms_norm(g, picked, "norm", eps, "head/norm")
    g.one("Cast", [_matmul(g, x, "head", c.hidden_size, quant, "head/matmul")], LOGITS, to=TensorProto.FLOAT)
    g.one("Concat", new_k, NEW_K, axis=0)
    g.one("Concat", new_v, NEW_V, axis=0)

    outputs = [
        helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["logits", c.vocab_size]),
        helper.make_tensor_value_info(NEW_K, dt, [c.num_hidden_layers, "tokens", kv_heads, head_dim]),
        helper.make_tensor_value_info(NEW_V, dt, [c.num_hidden_layers, "tokens", kv_heads, head_dim]),
    ]
    graph = helper.make_graph(g.nodes, "trimode_step", graph_inputs(c, dtype, lora is not None), outputs,
                              g.initializers)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(attention.domain, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="trimode", producer_version=__version__,
                             ir_version=QUANTIZED_IR_VERSION[opset] if quant is not None else IR_VERSION)


def export_onnx(out_dir: Path, checkpoint: Checkpoint, dtype: torch.dtype, lora: LoraAdapter | None,
                attention: AttentionNode = AttentionNode(), progress: Progress | None = None,
                quant: Quantization | None = None) -> dict[str, FileEntry]:
    """Write model.onnx and model.onnx.data into out_dir; returns their sizes and SHA-256 by file name."""
    weights, data_entry = write_weight_data(out_dir / DATA_FILE, checkpoint, dtype, lora, progress, quant)
    model = build_graph(checkpoint.config, weights, dtype, lora, attention, quant)
    with HashingWriter(out_dir / MODEL_FILE) as out:
        out.write(model.SerializeToString(deterministic=True))
        model_entry = out.close()
    return {MODEL_FILE: model_entry, DATA_FILE: data_entry}


def check_export(out_dir: Path) -> None:
    """onnx's structural checker over the exported files (external data included)."""
    onnx.checker.check_model(str(out_dir / MODEL_FILE))
