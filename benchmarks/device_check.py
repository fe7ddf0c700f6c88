"""One prepared check for a machine with a GPU (`make device-check`), sized to finish within 8 minutes.

1. The CUDA kernel against the PyTorch reference on random inputs: every mask kind, bf16 and fp16, GQA ratios,
   head dims 64/128, cache lengths from 0 to a few thousand, padded chunks, cache writes on and off.
2. The GPU engine against the reference: greedy tokens of the kernel path (eager and CUDA graphs) equal the
   reference-attention path on the GPU, and the fp32 GPU engine equals the CPU engine on a tiny checkpoint.
3. Timings at the real 8B shape (random weights made on the GPU): decode step latency eager vs CUDA graph,
   draft/verify latency at block 32, AR vs self-speculation tokens/s, against the memory-bandwidth floor
   (weight bytes / measured device copy bandwidth).
Prints a table and writes JSON to $OUT/device_check.json (or ./device_check.json).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from trimode.builder.presets import PRESETS
from trimode.builder.random_checkpoint import make_config, write_random_checkpoint
from trimode.plugins.reference import block_attention_reference
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.cuda_graphs import GraphEngine
from trimode.runtime.backends.torch_engine import TorchEngine
from trimode.runtime.generate import GenerationConfig, generate
from trimode.runtime.model.network import Transformer

REPORT: dict = {"kernel": [], "engine": {}, "timing": {}}


KERNEL_CASES = [  # (batch, chunk, chunk_lens, cache_lens)
    (1, 1, [1], [0]), (3, 1, [1, 1, 1], [5, 300, 3000]), (2, 32, [32, 32], [0, 1000]),
    (3, 32, [32, 7, 1], [17, 64, 2500]), (2, 77, [77, 40], [0, 129]),
]


def check_kernel_case(op, gen: torch.Generator, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                      mask_kind: int, write_kv: bool, case: tuple) -> float:
    """Relative error of the kernel vs the fp32 reference on one case; asserts the cache contract."""
    batch, chunk, chunk_lens, cache_lens = case

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    q = rnd(batch, chunk, heads, head_dim)
    k, v = rnd(batch, chunk, kv_heads, head_dim), rnd(batch, chunk, kv_heads, head_dim)
    kc, vc = rnd(batch + 2, 4096, kv_heads, head_dim), rnd(batch + 2, 4096, kv_heads, head_dim)
    slots = torch.arange(batch, device="cuda", dtype=torch.int32).flip(0) + 1
    cl = torch.tensor(cache_lens, device="cuda", dtype=torch.int32)
    nl = torch.tensor(chunk_lens, device="cuda", dtype=torch.int32)
    kc_before = kc.clone()
    want = block_attention_reference(q.float(), k.float(), v.float(), kc.float(), vc.float(), slots, cl, nl,
                                     mask_kind, False, head_dim ** -0.5)
    got = op.block_attention(q, k, v, kc, vc, slots, cl, nl, mask_kind, write_kv, head_dim ** -0.5)
    torch.cuda.synchronize()
    err = 0.0
    for b in range(batch):
        n, slot, p = chunk_lens[b], int(slots[b]), cache_lens[b]
        err = max(err, float((got[b, :n].float() - want[b, :n]).norm() / want[b, :n].norm()))
        assert torch.isfinite(got[b, :n]).all(), "non-finite output"
        assert (got[b, n:] == 0).all(), "padding rows not zeroed"
        if write_kv:
            assert torch.equal(kc[slot, p:p + n], k[b, :n]), "cache write wrong"
            assert torch.equal(kc[slot, :p], kc_before[slot, :p]), "cache prefix touched"
    if not write_kv:
        assert torch.equal(kc, kc_before), "cache written without write_kv"
    return err


def kernel_checks() -> None:
    from trimode.plugins import torch_op

    gen = torch.Generator(device="cuda").manual_seed(0)
    worst: dict[str, float] = {}
    grid = itertools.product((torch.bfloat16, torch.float16), ((8, 8), (8, 2), (32, 8)), (64, 128), (0, 1),
                             (False, True), KERNEL_CASES)
    for dtype, (heads, kv_heads), head_dim, mask_kind, write_kv, case in grid:
        err = check_kernel_case(torch_op, gen, dtype, heads, kv_heads, head_dim, mask_kind, write_kv, case)
        key = f"{str(dtype)[6:]} mask{mask_kind} gqa{heads // kv_heads} d{head_dim}"
        worst[key] = max(worst.get(key, 0.0), err)
    for key, err in sorted(worst.items()):
        ok = err < 2e-2
        REPORT["kernel"].append({"case": key, "max_rel_err": err, "ok": ok})
        print(f"kernel {key:<28} max rel err {err:.2e} {'ok' if ok else 'FAIL'}")


def engine_checks(tmp: Path) -> None:
    config = make_config(PRESETS["tiny"], "fp32", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                                   "head_dim": 64, "hidden_size": 256})
    root = write_random_checkpoint(tmp / "tiny", config, dtype="fp32", lora_rank=8)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    cpu = engine_from_checkpoint(root, dtype="fp32")
    for mode in ("ar", "diffusion", "spec"):
        cfg = GenerationConfig(mode=mode, max_new_tokens=32, block_length=8)
        want = [r.tokens for r in generate(cpu, prompts, cfg)]
        results = {}
        for dtype in ("fp32", "bf16"):
            try:
                gpu = engine_from_checkpoint(root, dtype=dtype, device="cuda")
                graphs = GraphEngine(gpu.model, max_batch_size=4, max_seq_len=512)
                eager_tokens = [r.tokens for r in generate(gpu, prompts, cfg)]
                graph_tokens = [r.tokens for r in generate(graphs, prompts, cfg)]
                results[dtype] = {"eager_equals_cpu_fp32": eager_tokens == want,
                                  "graphs_equal_eager": graph_tokens == eager_tokens}
            except Exception as exc:  # report, keep going: the rest of the check still informs
                results[dtype] = {"error": f"{type(exc).__name__}: {exc}"}
        REPORT["engine"][mode] = results
        print(f"engine {mode:<10} {json.dumps(results)}")


def random_weights(config, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    h, inter = config.hidden_size, config.intermediate_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim

    def mat(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen, device=device) / math.sqrt(cols)).to(dtype)

    w = {"embed": torch.randn(config.vocab_size, h, generator=gen, device=device).to(dtype),
         "norm": torch.ones(h, device=device, dtype=dtype), "head": mat(config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        w[f"layers.{i}.attn_norm"] = torch.ones(h, device=device, dtype=dtype)
        w[f"layers.{i}.mlp_norm"] = torch.ones(h, device=device, dtype=dtype)
        w[f"layers.{i}.qkv"] = mat(qkv, h)
        w[f"layers.{i}.o"] = mat(h, config.num_attention_heads * config.head_dim)
        w[f"layers.{i}.gate_up"] = mat(2 * inter, h)
        w[f"layers.{i}.down"] = mat(h, inter)
    return w


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def timing_8b(context: int = 1024, block: int = 32) -> None:
    config = make_config(PRESETS["8b"], "bf16", {})
    model = Transformer(config, random_weights(config, torch.bfloat16, "cuda"))
    weight_bytes = sum(t.numel() * t.element_size() for t in model.w.values())
    buffer = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(buffer)
    copy_s = statistics.median(timed(lambda: target.copy_(buffer), 5))
    bandwidth = 2 * buffer.numel() / copy_s  # read + write
    floor_ms = 1000 * weight_bytes / bandwidth
    eager = TorchEngine(model, max_batch_size=1, max_seq_len=context + 512)
    graphs = GraphEngine(model, max_batch_size=1, max_seq_len=context + 512)
    prompt = torch.randint(200, 1000, (context,)).tolist()
    results: dict = {"weight_gib": weight_bytes / 2**30, "copy_bandwidth_gbs": bandwidth / 1e9,
                     "bandwidth_floor_ms": floor_ms}
    for name, engine in (("eager", eager), ("graph", graphs)):
        cache = engine.new_cache(1)
        engine.prefill(cache, [0], [prompt])
        engine.decode(cache, [0], [5])

        def step(engine=engine, cache=cache):
            engine.decode(cache, [0], [5])
            cache.rollback([0], [context])
        results[f"decode_ms_{name}"] = 1000 * statistics.median(timed(step, 30))
    blocks = torch.randint(200, 1000, (1, block))
    cache = graphs.new_cache(1)
    graphs.prefill(cache, [0], [prompt])
    results["draft_ms_block32"] = 1000 * statistics.median(timed(lambda: graphs.draft(cache, [0], blocks), 20))

    def verify():
        graphs.verify(cache, [0], blocks)
        cache.rollback([0], [context])
    results["verify_ms_block32"] = 1000 * statistics.median(timed(verify, 20))
    for mode in ("ar", "spec"):
        cfg = GenerationConfig(mode=mode, max_new_tokens=128, block_length=block)
        generate(graphs, [prompt[:256]], cfg)  # warm-up (captures graphs)
        start = time.perf_counter()
        out = generate(graphs, [prompt[:256]], cfg)[0]
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        results[f"{mode}_tokens_per_s"] = len(out.tokens) / elapsed
        results[f"{mode}_tokens_per_forward"] = out.tokens_per_forward
    REPORT["timing"] = results
    print("8B shape, bf16, batch 1, context", context)
    for key, value in results.items():
        print(f"  {key:<26} {value:10.3f}")


def main() -> int:
    if not torch.cuda.is_available():
        print("device check: no CUDA device; nothing to do")
        return 2
    REPORT["device"] = torch.cuda.get_device_name()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, step in (("kernel", kernel_checks), ("engine", lambda: engine_checks(Path(tmp))),
                           ("timing", timing_8b)):
            try:
                step()
            except Exception as exc:
                REPORT[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
                print(f"{name} check failed: {exc}", file=sys.stderr)
    REPORT["elapsed_s"] = time.perf_counter() - start
    out = Path(os.environ.get("OUT", ".")) / "device_check.json"
    out.write_text(json.dumps(REPORT, indent=2))
    print(f"wrote {out}")
    failed = any(not k["ok"] for k in REPORT["kernel"]) or any(k.endswith("_error") for k in REPORT)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
