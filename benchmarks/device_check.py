"""One prepared check for a machine with a GPU (`make device-check`); it must finish well inside 8 minutes.

1. kernel: the CUDA block-attention kernel (`torch.ops.trimode.block_attention`) against the PyTorch reference
   on packed rows over a paged cache (shuffled page tables, page size 16): every mask kind (causal,
   bidirectional, quad(L), prefix_block(m)) alone and mixed in one call with an empty padding row and rows
   sharing prefix pages; fp32, bf16 and fp16; GQA 1, 4 and 4 with 32 heads; head dims 64 and 128; cache
   lengths 0 to 3000; writing and read-only rows (written K/V exact, every other page byte untouched); exact
   and loose host bounds (max_chunk, max_cache_len).
2. engine: on a small random checkpoint (head_dim 64, fp32), greedy tokens of the GPU engine, eager and with
   CUDA graphs (`GraphEngine`), equal the CPU engine's in every mode and in one generate() mixing all modes;
   one mixed step's logits within 1e-3; bf16 graphs vs bf16 eager reported.
3. cli: the real command line on a random 3b-shaped checkpoint with 2 layers: `trimode generate --device cuda`
   in every mode (fp32 tokens == `--device cpu` tokens; bf16 runs), `trimode build` + `generate` of the built
   engine on the GPU (the GraphEngine path), and `trimode bench --device cuda` with its step latencies set
   against the memory-bandwidth floor (weight bytes read per step / measured device copy bandwidth).
4. quant: an fp8 engine (`trimode build --quantize fp8`, bf16) opened on the GPU with CUDA graphs: whether
   the FP8 tensor-core path (`torch._scaled_mm`, activations quantized per token) ran, one mixed step's logits
   against the same engine on the CPU (weight-only there), greedy spec and quad against AR on the GPU engine
   (reported), and the 8B shape's projections at 1, 8 and 32 tokens, bf16 against fp8.
5. timing (optional, --skip-8b to leave out): the 8B shape on random GPU weights: decode step eager vs graph
   (with consecutive and with scattered pages), verify block 32, AR vs self-speculation tokens/s, against
   the bandwidth floor.

Sections run in the order kernel, engine, quant, timing, cli; one that fails is reported and the next still runs; a
section is skipped (and said so) when the time budget (--budget) is spent. Prints one line per check and
writes JSON to $OUT/device_check.json (or --out). Exit status 0 only if every check passed.

`--dry-run` runs the same code on the CPU without a GPU (kernel cases against the CPU op, the CPU engine against
the static-buffer engine run eagerly, the CLI with --device cpu on a small checkpoint, no timings): it is how
this script is tested where there is no GPU. It proves the script runs, not the GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trimode.builder.presets import PRESETS
from trimode.builder.random_checkpoint import make_config, write_random_checkpoint
from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL, PREFIX_BLOCK, QUAD, written_offsets
from trimode.plugins.reference import block_attention_reference
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.backends.cuda_graphs import GraphEngine
from trimode.runtime.backends.limits import EngineLimits
from trimode.runtime.backends.step import ChunkRow, StepBatch
from trimode.runtime.backends.torch_engine import TorchEngine
from trimode.runtime.bench.direct import DirectSequences
from trimode.runtime.generate import generate
from trimode.runtime.model.network import Transformer
from trimode.runtime.request import GenerationConfig

BUDGET_S = 360.0  # no section starts after this; the last (8B timing, ~1 min) still ends inside 8 minutes
MASK = 100


@dataclass
class Report:
    device: str
    dry_run: bool
    started: float = field(default_factory=time.perf_counter)
    checks: list[dict] = field(default_factory=list)
    sections: dict[str, dict] = field(default_factory=dict)

    def check(self, section: str, name: str, ok: bool, **detail) -> bool:
        self.checks.append({"section": section, "name": name, "ok": bool(ok), **detail})
        extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in detail.items())
        print(f"[{'ok' if ok else 'FAIL'}] {section}: {name} {extra}", flush=True)
        return ok

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.checks) and not any("error" in s for s in self.sections.values())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# -- 1. kernel ---------------------------------------------------------------------------------------------
# rows: (mask kind, mask param, tokens, cache length, write)
KERNEL_CASES: dict[str, list[tuple[int, int, int, int, int]]] = {
    "decode": [(CAUSAL, 0, 1, 0, 1), (CAUSAL, 0, 1, 5, 1), (CAUSAL, 0, 1, 300, 1), (CAUSAL, 0, 1, 3000, 1)],
    "prefill": [(CAUSAL, 0, 77, 0, 1), (CAUSAL, 0, 32, 1000, 1), (CAUSAL, 0, 129, 17, 0)],
    "bidirectional": [(BIDIRECTIONAL, 0, 32, 17, 0), (BIDIRECTIONAL, 0, 8, 2500, 0), (BIDIRECTIONAL, 0, 1, 0, 0)],
    "quad": [(QUAD, 2, 6, 3000, 1), (QUAD, 4, 20, 100, 1), (QUAD, 8, 72, 0, 1), (QUAD, 4, 20, 64, 0)],
    "prefix_block": [(PREFIX_BLOCK, 8, 40, 0, 1), (PREFIX_BLOCK, 0, 16, 64, 1), (PREFIX_BLOCK, 16, 16, 10, 1),
                     (PREFIX_BLOCK, 32, 45, 700, 0)],
    "mixed": [(CAUSAL, 0, 1, 900, 1), (BIDIRECTIONAL, 0, 32, 900, 0), (QUAD, 4, 20, 33, 1), (CAUSAL, 0, 60, 0, 1),
              (PREFIX_BLOCK, 8, 24, 5, 1), (CAUSAL, 0, 32, 2048, 1), (CAUSAL, 0, 0, 0, 0)],  # last: padding row
}
KERNEL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


PAGE = 16


def kernel_case(op, gen: torch.Generator, device: str, dtype: torch.dtype, heads: int, kv_heads: int,
                head_dim: int, rows: list[tuple[int, int, int, int, int]], shared: int = 0) -> dict:
    """The op on one packed case vs the fp32 reference; returns the errors and the cache-contract verdicts.
    Each row's pages are drawn at random from the pool; `shared` leading pages are the same for every row
    that has that many cached full pages (a common prefix nobody writes)."""
    count = len(rows)
    lengths = [r[2] for r in rows]
    cu = [0, *itertools.accumulate(lengths)]
    tokens = cu[-1]
    used = [-(-(r[3] + (len(written_offsets(r[0], r[1], r[2])) if r[4] else 0)) // PAGE) for r in rows]
    pages = sum(used) + 8
    order = torch.randperm(pages, generator=gen, device=device).tolist()
    common, order = order[:shared], order[shared:]
    tables = []
    for (_, _, _, past, _), need in zip(rows, used, strict=True):
        share = min(shared, past // PAGE, need)
        tables.append(common[:share] + order[: need - share])
        order = order[need - share:]
    width = max(1, max(used))

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    table = torch.full((count, width), -1, dtype=torch.int32, device=device)
    for b, t in enumerate(tables):
        table[b, : len(t)] = i32(t)
    q, k, v = rnd(tokens, heads, head_dim), rnd(tokens, kv_heads, head_dim), rnd(tokens, kv_heads, head_dim)
    k_cache, v_cache = rnd(pages, PAGE, kv_heads, head_dim), rnd(pages, PAGE, kv_heads, head_dim)
    args = [i32(cu), table, i32([r[3] for r in rows]), i32([r[0] for r in rows]), i32([r[1] for r in rows]),
            i32([r[4] for r in rows])]
    want = block_attention_reference(q.float(), k.float(), v.float(), k_cache.float(), v_cache.float(), *args,
                                     head_dim ** -0.5)
    result = {"rel_err": 0.0, "loose_rel_err": 0.0, "cache_ok": True, "finite": True, "padding_zero": True}
    for bounds, name in (((max(max(lengths), 1), max(r[3] for r in rows)), "rel_err"), ((max(tokens, 1), 0),
                                                                                          "loose_rel_err")):
        kc, vc = k_cache.clone(), v_cache.clone()
        got = op.block_attention(q, k, v, kc, vc, *args, head_dim ** -0.5, *bounds)
        if device == "cuda":
            torch.cuda.synchronize()
        for b, (_, _, n, _, _) in enumerate(rows):
            if n:
                part = slice(cu[b], cu[b + 1])
                result[name] = max(result[name], rel(got[part], want[part]))
                result["finite"] &= bool(torch.isfinite(got[part]).all())
        expected_k = k_cache.clone()
        expected_v = v_cache.clone()
        for b, (kind, param, n, past, write) in enumerate(rows):
            if write and n:
                for i, offset in enumerate(written_offsets(kind, param, n)):
                    page, slot = tables[b][(past + i) // PAGE], (past + i) % PAGE
                    expected_k[page, slot] = k[cu[b] + offset]
                    expected_v[page, slot] = v[cu[b] + offset]
        result["cache_ok"] &= bool(torch.equal(kc, expected_k) and torch.equal(vc, expected_v))
    return result


def kernel_checks(report: Report) -> None:
    from trimode.plugins import torch_op

    device = report.device
    gen = torch.Generator(device=device).manual_seed(0)
    configs = itertools.product((torch.float32, torch.bfloat16, torch.float16), ((8, 8), (8, 2), (32, 8)), (64, 128))
    if report.dry_run:  # the CPU op is the reference itself: one configuration proves the script runs
        configs = [(torch.float32, (8, 2), 64)]
    worst: dict[str, dict] = {}
    for dtype, (heads, kv_heads), head_dim in configs:
        for case, rows in KERNEL_CASES.items():
            out = kernel_case(torch_op, gen, device, dtype, heads, kv_heads, head_dim, rows,
                              shared=2 if case == "mixed" else 0)
            key = f"{case} {str(dtype)[6:]}"
            entry = worst.setdefault(key, {"rel_err": 0.0, "loose_rel_err": 0.0, "cache_ok": True, "finite": True,
                                           "tolerance": KERNEL_TOLERANCE[dtype]})
            entry["rel_err"] = max(entry["rel_err"], out["rel_err"])
            entry["loose_rel_err"] = max(entry["loose_rel_err"], out["loose_rel_err"])
            entry["cache_ok"] &= out["cache_ok"]
            entry["finite"] &= out["finite"]
    for key, e in sorted(worst.items()):
        ok = e["rel_err"] < e["tolerance"] and e["loose_rel_err"] < e["tolerance"] and e["cache_ok"] and e["finite"]
        report.check("kernel", key, ok, rel_err=e["rel_err"], loose_rel_err=e["loose_rel_err"],
                     cache_ok=e["cache_ok"], finite=e["finite"])


# -- 2. engine ---------------------------------------------------------------------------------------------
MODES = [("ar", {}), ("diffusion", {}), ("diffusion", {"threshold": 0.3}), ("spec", {}), ("spec", {"threshold": 0.5}),
         ("quad", {"block_length": 4}), ("infill", {"suffix": (7, 8, 9)})]
PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8], list(range(20, 60))]


def mode_name(mode: str, extra: dict) -> str:
    return mode + "".join(f" {k}={v}" for k, v in extra.items())


def mixed_rows(seqs: DirectSequences) -> list[ChunkRow]:
    past = seqs.lengths[2]
    return [ChunkRow([40], write=True, logit_offsets=[0]),
            ChunkRow([3] + [MASK] * 7, mask_kind=BIDIRECTIONAL, lora=True, logit_offsets=list(range(8))),
            ChunkRow([5, MASK, MASK, 6, MASK, MASK], mask_kind=QUAD, mask_param=2, write=True,
                     logit_offsets=list(range(6)), positions=[past + j + o for j in range(2) for o in range(3)]),
            ChunkRow([9, 8, 7, MASK, MASK], mask_kind=PREFIX_BLOCK, mask_param=2, write=True, logit_offsets=[2, 4])]


def engine_checks(report: Report, tmp: Path) -> None:
    config = make_config(PRESETS["tiny"], "fp32", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                                   "head_dim": 64, "hidden_size": 256})
    root = write_random_checkpoint(tmp / "engine-ckpt", config, dtype="fp32", lora_rank=8)
    device = report.device
    cpu = engine_from_checkpoint(root, dtype="fp32", max_batch_size=8, max_seq_len=512)
    gpu = engine_from_checkpoint(root, dtype="fp32", device=device, max_batch_size=8, max_seq_len=512)
    graphs = GraphEngine(gpu.model, EngineLimits(8, 512), use_graphs=device == "cuda")
    for engine in (gpu, graphs):  # several engines share the device here: each gets a small pool
        engine.size_cache(kv_cache_memory="512MiB")

    # one mixed step, logits
    logits = {}
    for name, engine in (("cpu", cpu), ("gpu", gpu), ("graphs", graphs)):
        seqs = DirectSequences(engine, 4, cache=engine.cache)
        seqs.step(list(range(4)), [ChunkRow(PROMPTS[s % 3] + [s], write=True, logit_offsets=[0]) for s in range(4)])
        logits[name] = seqs.step(list(range(4)), mixed_rows(seqs)).cpu()
        seqs.release()
    for name in ("gpu", "graphs"):
        err = rel(logits[name], logits["cpu"])
        report.check("engine", f"mixed step logits {name} vs cpu (fp32)", err < 1e-3, rel_err=err)

    for mode, extra in MODES:
        cfg = GenerationConfig(**{"mode": mode, "max_new_tokens": 16, "block_length": 8, **extra})
        want = [r.tokens for r in generate(cpu, PROMPTS, cfg)]
        for name, engine in (("eager", gpu), ("graphs", graphs)):
            got = [r.tokens for r in generate(engine, PROMPTS, cfg)]
            report.check("engine", f"{mode_name(mode, extra)}: {name} tokens == cpu (fp32)", got == want)
    configs = [GenerationConfig(**{"mode": m, "max_new_tokens": 8, "block_length": 4, **kw}) for m, kw in MODES[:7]]
    prompts = [PROMPTS[i % 3] for i in range(len(configs))]
    want = [r.tokens for r in generate(cpu, prompts, configs)]
    got = [r.tokens for r in generate(graphs, prompts, configs)]
    report.check("engine", "all modes in one generate: graphs tokens == cpu (fp32)", got == want)
    report.check("engine", "every page given back", graphs.cache.pages.in_use == 0,
                 in_use=graphs.cache.pages.in_use)
    captured = sum(s.graph is not None for s in graphs.steps.values())
    report.sections["engine"] = {"buckets": len(graphs.steps), "captured_graphs": captured,
                                 "eager_steps": graphs.eager_steps}
    if device == "cuda":
        report.check("engine", "graphs were captured", captured > 0, captured=captured)
        bf16 = engine_from_checkpoint(root, dtype="bf16", device=device, max_batch_size=8, max_seq_len=512)
        bf16_graphs = GraphEngine(bf16.model, EngineLimits(8, 512))
        for engine in (bf16, bf16_graphs):
            engine.size_cache(kv_cache_memory="512MiB")
        same = 0
        for mode, extra in MODES:
            cfg = GenerationConfig(**{"mode": mode, "max_new_tokens": 16, "block_length": 8, **extra})
            same += [r.tokens for r in generate(bf16, PROMPTS, cfg)] == \
                [r.tokens for r in generate(bf16_graphs, PROMPTS, cfg)]
        report.sections["engine"]["bf16_graphs_equal_eager_modes"] = f"{same}/{len(MODES)}"  # informational


# -- 4. quantized weights --------------------------------------------------------------------------------
def quant_checks(report: Report, tmp: Path) -> None:
    from trimode.builder.engine_build import BuildOptions, build_engine
    from trimode.builder.quantization import Quantization
    from trimode.runtime.backends.engine_loader import open_engine
    from trimode.runtime.model.quant import QuantizedLinear

    config = make_config(PRESETS["tiny"], "fp32", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                                   "head_dim": 64, "hidden_size": 256})
    root = write_random_checkpoint(tmp / "quant-ckpt", config, dtype="fp32", lora_rank=8)
    engine_dir = tmp / "quant-fp8"
    build_engine(root, engine_dir, BuildOptions(dtype="bf16", quantize="fp8", max_seq_len=512))
    cpu = open_engine(engine_dir, device="cpu", kv_cache_memory="256MiB")
    gpu = open_engine(engine_dir, device=report.device, kv_cache_memory="512MiB")
    logits = {}
    for name, engine in (("cpu", cpu), ("gpu", gpu)):
        seqs = DirectSequences(engine, 4, cache=engine.cache)
        seqs.step(list(range(4)), [ChunkRow(PROMPTS[s % 3] + [s], write=True, logit_offsets=[0]) for s in range(4)])
        logits[name] = seqs.step(list(range(4)), mixed_rows(seqs)).cpu()
        seqs.release()
    layers = [w for w in gpu.model.w.values() if isinstance(w, QuantizedLinear)]
    scaled_mm = report.device == "cuda" and all(w._scaled_mm_ok for w in layers)
    err = rel(logits["gpu"], logits["cpu"])
    report.check("quant", f"fp8 step logits {report.device} vs cpu weight-only (bf16)", err < 5e-2, rel_err=err,
                 scaled_mm=scaled_mm)
    ar_cfg = GenerationConfig(mode="ar", max_new_tokens=24)
    ar = [r.tokens for r in generate(gpu, PROMPTS, ar_cfg)]
    equal = {}
    for mode, extra in (("spec", {"block_length": 8}), ("quad", {"block_length": 4})):
        got = [r.tokens for r in generate(gpu, PROMPTS, GenerationConfig(mode=mode, max_new_tokens=24, **extra))]
        equal[mode] = got == ar
    report.sections["quant"] = {"scaled_mm_used": scaled_mm, "greedy_equals_ar_bf16": equal}  # bf16: reported
    if report.device != "cuda":
        return
    report.check("quant", "the FP8 tensor-core path ran", scaled_mm)
    big = make_config(PRESETS["8b"], "bf16", {})
    shapes = {"qkv": ((big.num_attention_heads + 2 * big.num_key_value_heads) * big.head_dim, big.hidden_size),
              "gate_up": (2 * big.intermediate_size, big.hidden_size), "down": (big.hidden_size, big.intermediate_size)}
    fp8 = Quantization.parse("fp8")
    for name, (n, k) in shapes.items():
        weight = torch.randn(n, k, device="cuda") / math.sqrt(k)
        dense = weight.to(torch.bfloat16)
        stored = {key.rsplit(".", 1)[1]: t for key, t in fp8.quantize(name, weight, torch.bfloat16).items()}
        layer = QuantizedLinear(fp8, stored, torch.bfloat16)
        for m in (1, 8, 32):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16_ms = 1000 * timed(lambda x=x, w=dense: torch.nn.functional.linear(x, w), 50)
            fp8_ms = 1000 * timed(lambda x=x, layer=layer: layer(x), 50)
            report.sections["quant"][f"8b_{name}_m{m}"] = {"bf16_ms": bf16_ms, "fp8_ms": fp8_ms,
                                                          "speedup": bf16_ms / fp8_ms}
            print(f"  fp8 8b {name} M={m}: bf16 {bf16_ms:.4f} ms, fp8 {fp8_ms:.4f} ms", flush=True)


# -- 3. the command line -----------------------------------------------------------------------------------
def trimode(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimode", *args], capture_output=True, text=True, timeout=timeout)


def cli_generate(model: Path, device: str, mode: str, extra: list[str], dtype: str | None = None) -> dict:
    args = ["generate", "--model", str(model), "--device", device, "--mode", mode, "--prompt-ids", "1,5,6,7,8",
            "--prompt-ids", "1,9,3", "--max-new-tokens", "16", "--block-length", "4", "--json", *extra]
    if dtype:
        args += ["--dtype", dtype]
    start = time.perf_counter()
    proc = trimode(*args)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    data = json.loads(proc.stdout)
    return {"tokens": [o["tokens"] for o in data["outputs"]], "wall_s": time.perf_counter() - start,
            "elapsed_s": data.get("elapsed_s")}


CLI_MODES = [("ar", []), ("diffusion", []), ("spec", []), ("quad", []), ("infill", ["--suffix-ids", "7,8,9"])]


def weight_bytes_per_step(config, dtype_bytes: int) -> int:
    """Bytes a decode step reads: every layer's matrices and the head (the embedding is gathered, not read)."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return dtype_bytes * (c.num_hidden_layers * layer + c.vocab_size * c.hidden_size)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy (read + write), the floor's denominator."""
    buffer = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(buffer)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(buffer)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del buffer, target
    return 2 * (1 << 30) / statistics.median(times)


def cli_checks(report: Report, tmp: Path, budget: float = BUDGET_S) -> None:
    device = report.device
    ckpt = tmp / "cli-ckpt"
    shape = ["--preset", "3b", "--num-hidden-layers", "2"]
    if report.dry_run:  # the same commands on a checkpoint the CPU handles in seconds
        shape = ["--preset", "tiny", "--head-dim", "64", "--hidden-size", "256"]
    proc = trimode("random-checkpoint", str(ckpt), *shape, "--with-lora", timeout=300)
    if not report.check("cli", "random-checkpoint " + " ".join(shape), proc.returncode == 0,
                        stderr=proc.stderr.strip()[-200:]):
        return
    results: dict[str, dict] = {}
    for mode, extra in CLI_MODES:
        want = cli_generate(ckpt, "cpu", mode, extra, "fp32")
        got = cli_generate(ckpt, device, mode, extra, "fp32")
        results[mode] = {"cpu_fp32": want, f"{device}_fp32": got}
        report.check("cli", f"generate --device {device} --mode {mode} (fp32) tokens == --device cpu",
                     "error" not in got and got.get("tokens") == want.get("tokens"),
                     error=got.get("error", want.get("error", "")))
        if device == "cuda":
            bf16 = cli_generate(ckpt, device, mode, extra)
            results[mode]["cuda_bf16"] = bf16
            report.check("cli", f"generate --device cuda --mode {mode} (bf16) runs", "error" not in bf16,
                         error=bf16.get("error", ""))
        if report.elapsed() > budget:
            report.check("cli", "time budget reached; remaining cli modes skipped", True)
            break
    engine = tmp / "cli-engine"
    proc = trimode("build", str(ckpt), "-o", str(engine), "--max-seq-len", "1024", "--block-length", "4",
                   "--no-progress", timeout=300)
    if report.check("cli", "build (torch engine)", proc.returncode == 0, stderr=proc.stderr.strip()[-200:]):
        got = cli_generate(engine, device, "spec", [])
        want = cli_generate(engine, "cpu", "spec", [])
        report.check("cli", f"generate --model ENGINE --device {device} --mode spec runs (GraphEngine on cuda)",
                     "error" not in got and "error" not in want, error=got.get("error", want.get("error", "")))
        results["engine_spec"] = {device: got, "cpu": want}
    bench_model = engine if (engine / "manifest.json").is_file() else ckpt
    args = ["bench", "--model", str(bench_model), "--device", device, "--modes", "ar,spec,quad", "--batch-size", "1",
            "--prompt-length", "64", "--max-new-tokens", "32", "--block-length", "4", "--runs", "2", "--warmup", "1",
            "--json"]
    proc = trimode(*args, timeout=300)
    if not report.check("cli", f"bench --device {device}", proc.returncode == 0, stderr=proc.stderr.strip()[-300:]):
        report.sections["cli"] = results
        return
    bench = json.loads(proc.stdout)
    results["bench"] = bench
    if device == "cuda":
        from trimode.builder.config import parse_config

        config = parse_config(json.loads((ckpt / "config.json").read_text()), ckpt / "config.json")
        floor_ms = 1000 * weight_bytes_per_step(config, 2) / copy_bandwidth(device)
        results["bandwidth_floor_ms"] = floor_ms
        for mode, data in bench["modes"].items():
            for kind, lat in data.get("step_latency_ms", {}).items():
                results.setdefault("latency_vs_floor", {})[f"{mode}/{kind}"] = round(lat["median"] / floor_ms, 2)
        print(f"  bandwidth floor per step (3b shape, 2 layers, bf16): {floor_ms:.3f} ms; "
              f"step latency / floor: {json.dumps(results.get('latency_vs_floor', {}))}")
    for mode, data in bench["modes"].items():
        print(f"  bench {mode}: {data.get('tokens_per_s')} tokens/s, {data.get('tokens_per_forward')} tokens/forward")
    report.sections["cli"] = results


# -- 4. 8B timing ------------------------------------------------------------------------------------------
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


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing_8b(report: Report, context: int = 1024, block: int = 32) -> None:
    config = make_config(PRESETS["8b"], "bf16", {})
    model = Transformer(config, random_weights(config, torch.bfloat16, "cuda"))
    floor_ms = 1000 * weight_bytes_per_step(config, 2) / copy_bandwidth("cuda")
    limits = EngineLimits(1, context + 512)
    eager, graphs = TorchEngine(model, limits), GraphEngine(model, limits)
    prompt = torch.randint(200, 1000, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    results: dict = {"bandwidth_floor_ms": floor_ms}
    for name, engine in (("eager", eager), ("graph", graphs)):
        engine.size_cache(kv_cache_memory="4GiB")
        pages = engine.cache.pages
        for layout in ("consecutive", "scattered"):
            taken = pages.take(pages.pages_for(context + block) + (64 if layout == "scattered" else 0))
            table = taken if layout == "consecutive" else taken[::-1][: pages.pages_for(context + block)]
            size = engine.cache.page_size

            def run(rows, past, engine=engine, table=table, size=size):
                return engine.step(engine.cache, StepBatch.from_rows(rows, [table] * len(rows), [past], size))

            run([ChunkRow(prompt, write=True, logit_offsets=[context - 1])], 0)
            decode = lambda run=run: run([ChunkRow([5], write=True, logit_offsets=[0])], context)  # noqa: E731
            decode()
            results[f"decode_ms_{name}_{layout}"] = 1000 * timed(decode, 20)
            if layout == "consecutive":
                verify = lambda run=run: run([ChunkRow(prompt[:block], write=True,  # noqa: E731
                                                       logit_offsets=list(range(block)))], context)
                verify()
                results[f"verify{block}_ms_{name}"] = 1000 * timed(verify, 10)
            pages.release(taken)
        results[f"decode_ms_{name}"] = results[f"decode_ms_{name}_consecutive"]
    for mode in ("ar", "spec"):
        cfg = GenerationConfig(mode=mode, max_new_tokens=128, block_length=block)
        generate(graphs, [prompt[:256]], cfg)  # warm-up: captures the buckets
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(graphs, [prompt[:256]], cfg)[0]
        torch.cuda.synchronize()
        results[f"{mode}_tokens_per_s"] = len(out.tokens) / (time.perf_counter() - start)
        results[f"{mode}_tokens_per_forward"] = out.tokens_per_forward
    report.sections["timing_8b"] = results
    for key, value in results.items():
        print(f"  8b {key:<24} {value:10.3f}")
    report.check("timing_8b", "graph decode within 3x of the bandwidth floor",
                 results["decode_ms_graph"] < 3 * floor_ms, decode_ms=results["decode_ms_graph"], floor_ms=floor_ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run every CPU-runnable part on the CPU (no GPU)")
    parser.add_argument("--skip-8b", action="store_true", help="leave out the 8B-shape timings")
    parser.add_argument("--only", choices=("kernel", "engine", "quant", "cli", "timing"), action="append",
                        help="run only these sections (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="folder for the JSON")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help="seconds after which no further section starts (default %(default)s)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("device check: no CUDA device (use --dry-run to exercise the script on the CPU)")
        return 2
    report = Report("cpu" if args.dry_run else "cuda", args.dry_run)
    if not args.dry_run:
        report.sections["device"] = {"name": torch.cuda.get_device_name(), "torch": torch.__version__}
    wanted = args.only or ["kernel", "engine", "quant", "cli", "timing"]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        sections = [("kernel", lambda: kernel_checks(report)), ("engine", lambda: engine_checks(report, tmp)),
                    ("quant", lambda: quant_checks(report, tmp))]
        if not args.dry_run and not args.skip_8b:
            sections.append(("timing", lambda: timing_8b(report)))
        sections.append(("cli", lambda: cli_checks(report, tmp, args.budget)))
        for name, run in sections:
            if name not in wanted:
                continue
            if report.elapsed() > args.budget:
                report.sections[name] = {"skipped": f"time budget ({args.budget:.0f} s) spent"}
                print(f"[skip] {name}: time budget spent", flush=True)
                continue
            start = time.perf_counter()
            try:
                run()
            except Exception as exc:  # report and go on: the other sections still inform
                report.sections.setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"
                print(f"[FAIL] {name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            report.sections.setdefault(name, {})["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "device_check.json"
    out.write_text(json.dumps({"device": report.device, "dry_run": report.dry_run, "passed": report.passed,
                               "elapsed_s": round(report.elapsed(), 1), "sections": report.sections,
                               "checks": report.checks}, indent=2, default=str))
    failed = [c for c in report.checks if not c["ok"]]
    print(f"device check {'PASSED' if report.passed else 'FAILED'}: {len(report.checks) - len(failed)}/"
          f"{len(report.checks)} checks in {report.elapsed():.0f} s; wrote {out}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
