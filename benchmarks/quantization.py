"""Quantized engines against unquantized ones, measured in one run (ratios; the machine is shared and noisy).

    python benchmarks/quantization.py [--threads 1] [--repeats 15] [--skip-demo]

1. kernels: one 8192 x 3072 projection (the 3B shape's), dense vs torch's packed weight-only kernel vs tiled
   dequantize-then-matmul, for M = 1 .. 128 tokens in bf16 and fp32; the crossover per scheme and dtype is
   what runtime/model/quant.py's PACKED_MAX_TOKENS holds.
2. the 3B shape with 2 layers (random weights, vocab 32768) built as bf16, int8 and int4 engines (head
   quantized): engine step time for batch-1 and batch-8 decode, a 16-token verify row, a spec draft block, a
   quad chunk (L = 4) and a 128-token prefill, interleaved across engines; tokens/s ratios against bf16.
3. size on disk and resident memory after a few steps (each engine in its own process).
4. the demo model (fp32) as fp32, int8, int4 and fp8 engines: held-out AR loss (train.py's 8 x 8 x 256 windows),
   with and without the head quantized; spec (L = 16) and quad (L = 4) tokens/s and tokens per forward at
   batch 1 on the held-out prompts, and whether their greedy output equals AR's on the same engine.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step_floor import step_rows  # noqa: E402

from trimode.builder.engine_build import BuildOptions, build_engine  # noqa: E402
from trimode.builder.quantization import Quantization  # noqa: E402
from trimode.plugins.masks import CAUSAL  # noqa: E402
from trimode.runtime.backends.engine_loader import open_engine  # noqa: E402
from trimode.runtime.backends.step import ChunkRow  # noqa: E402
from trimode.runtime.bench.direct import DirectSequences  # noqa: E402
from trimode.runtime.bench.runner import bench_modes  # noqa: E402
from trimode.runtime.model.quant import QuantizedLinear  # noqa: E402
from trimode.runtime.request import GenerationConfig  # noqa: E402

KERNEL_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
STEP_KINDS = (("decode", 1), ("decode", 8), ("verify16", 1), ("draft16", 1), ("quad4", 1), ("prefill128", 1))


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()  # as the engine's step runs (under autograd the layers take the plain path)
def kernels(repeats: int) -> dict:
    n, k = 8192, 3072
    weight = torch.randn(n, k) * 0.02
    report = {}
    for dtype in (torch.bfloat16, torch.float32):
        dense = weight.to(dtype)
        for scheme in ("int8", "int4"):
            q = Quantization.parse(scheme)
            lin = QuantizedLinear(q, {name.rsplit(".", 1)[1]: t for name, t in q.quantize("w", weight, dtype).items()},
                                  dtype)
            rows = {}
            for m in KERNEL_ROWS:
                x = torch.randn(m, k, dtype=dtype)
                entry = {"dense_ms": timed(lambda x=x, w=dense: F.linear(x, w), repeats),
                         "dequantized_ms": timed(lambda x=x, lin=lin: lin._dequantized_mm(x), repeats)}
                if dtype != torch.float32 or m <= 2:  # torch's fp32 packed kernels are scalar: minutes at large M
                    entry["packed_ms"] = timed(lambda x=x, lin=lin: lin._packed_mm(x), repeats)
                rows[m] = {key: round(1e3 * v, 3) for key, v in entry.items()}
            crossover = 0  # the largest M up to which the packed kernel wins at every measured M
            for m in KERNEL_ROWS:
                if rows[m].get("packed_ms", float("inf")) >= rows[m]["dequantized_ms"]:
                    break
                crossover = m
            report[f"{scheme}_{str(dtype).removeprefix('torch.')}"] = {"rows": rows, "packed_wins_up_to": crossover}
    return report


def time_steps(engines: dict, kind: str, batch: int, context: int, repeats: int) -> dict[str, float]:
    """Median step time per engine, the engines interleaved repeat by repeat."""
    seqs = {}
    for name, engine in engines.items():
        seqs[name] = DirectSequences(engine, batch)
        seqs[name].step(list(range(batch)), [ChunkRow([3] * context, CAUSAL, write=True) for _ in range(batch)])
    times: dict[str, list[float]] = {name: [] for name in engines}
    for repeat in range(repeats + 2):
        for name, engine in engines.items():
            rows = step_rows(kind, batch, context, engine.config.mask_token_id)
            step = seqs[name].batch(list(range(batch)), rows)
            start = time.perf_counter()
            engine.step(seqs[name].cache, step)
            if repeat >= 2:
                times[name].append(time.perf_counter() - start)
    for s in seqs.values():
        s.release()
    return {name: statistics.median(v) for name, v in times.items()}


RSS_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from trimode.plugins.masks import CAUSAL
from trimode.runtime.backends.engine_loader import open_engine
from trimode.runtime.backends.step import ChunkRow
from trimode.runtime.bench.direct import DirectSequences
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
base = rss()
engine = open_engine(sys.argv[1], kv_cache_memory='64MiB')
seqs = DirectSequences(engine, 1)
seqs.step([0], [ChunkRow([3] * 32, CAUSAL, write=True, logit_offsets=[31])])
for _ in range(4):
    seqs.step([0], [ChunkRow([5], CAUSAL, write=True, logit_offsets=[0])])
print(json.dumps({"rss_before_open": base, "rss_after_decode": rss(), "weight_bytes": engine.model.weight_bytes}))
"""


def resident(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], check=True, capture_output=True, text=True)
    data = json.loads(out.stdout)
    return {"weights_MB": round(data["weight_bytes"] / 1e6, 1),
            "rss_added_MB": round((data["rss_after_decode"] - data["rss_before_open"]) / 1e6, 1)}


def big_shape(tmp: Path, repeats: int, context: int) -> dict:
    source = tmp / "3b2"
    subprocess.run([sys.executable, "-m", "trimode", "random-checkpoint", str(source), "--preset", "3b",
                    "--num-hidden-layers", "2", "--vocab-size", "32768", "--dtype", "fp32"],
                   check=True, capture_output=True)
    paths = {}
    for name, quantize in (("bf16", None), ("int8", "int8"), ("int4", "int4")):
        paths[name] = tmp / f"3b2-{name}"
        build_engine(source, paths[name], BuildOptions(dtype="bf16", quantize=quantize, max_batch_size=8,
                                                       max_seq_len=512, lora=None))
    engines = {name: open_engine(path, kv_cache_memory="512MiB") for name, path in paths.items()}
    steps = {}
    for kind, batch in STEP_KINDS:
        ms = time_steps(engines, kind, batch, context, repeats)
        steps[f"{kind}_b{batch}"] = {
            **{f"{name}_ms": round(1e3 * v, 3) for name, v in ms.items()},
            **{f"{name}_speedup_vs_bf16": round(ms["bf16"] / v, 3) for name, v in ms.items() if name != "bf16"}}
    del engines
    disk = {name: round(sum(f.stat().st_size for f in path.iterdir()) / 1e6, 1) for name, path in paths.items()}
    memory = {name: {"disk_MB": disk[name], **resident(path)} for name, path in paths.items()}
    return {"steps": steps, "size": memory}


def demo_model(tmp: Path, repeats: int) -> dict:
    from tokenizers import Tokenizer

    from trimode.demo import demo_model_path

    sys.path.insert(0, str(ROOT / "examples" / "train_demo"))
    from data import corpus_files, token_stream
    from train_joint import held_out_ar_loss

    demo = demo_model_path()
    tokenizer = Tokenizer.from_file(str(demo / "tokenizer.json"))
    variants = {"fp32": None, "int8": ("int8", True), "int4": ("int4", True), "fp8": ("fp8", True),
                "int8_head_kept": ("int8", False), "int4_head_kept": ("int4", False)}
    paths = {}
    for name, choice in variants.items():
        paths[name] = tmp / f"demo-{name}"
        quantize, head = choice if choice else (None, True)
        build_engine(demo, paths[name], BuildOptions(quantize=quantize, quantize_head=head, max_seq_len=1024))
    engines = {name: open_engine(path) for name, path in paths.items()}
    config = engines["fp32"].config
    _, held = corpus_files()
    stream = token_stream(tokenizer, held, config.eos_token_id)
    losses = {name: held_out_ar_loss(engine.model, stream) for name, engine in engines.items()}
    report = {"held_out_ar_loss": {name: round(v, 4) for name, v in losses.items()},
              "loss_rise": {name: round(v - losses["fp32"], 4) for name, v in losses.items() if name != "fp32"},
              "modes": {}}
    prompts = [tokenizer.encode(p["prompt"]).ids for p in
               json.loads((ROOT / "examples" / "train_demo" / "prompts.json").read_text())][:4]
    configs = {"ar": GenerationConfig(mode="ar", max_new_tokens=64),
               "spec16": GenerationConfig(mode="spec", max_new_tokens=64, block_length=16),
               "quad4": GenerationConfig(mode="quad", max_new_tokens=64, block_length=4)}
    for name in ("fp32", "int8", "int4", "fp8"):
        modes = bench_modes(engines[name], prompts, configs, runs=repeats, warmup=1, batch_size=1)
        report["modes"][name] = {mode: {key: modes[mode].get(key) for key in
                                        ("tokens_per_s", "tokens_per_forward", "speedup_vs_ar", "matches_ar")}
                                 for mode in configs}
    base = report["modes"]["fp32"]
    report["vs_fp32"] = {name: {mode: {"tokens_per_s": round(report["modes"][name][mode]["tokens_per_s"]
                                                             / base[mode]["tokens_per_s"], 3),
                                       "tokens_per_forward": round(report["modes"][name][mode]["tokens_per_forward"]
                                                                   / base[mode]["tokens_per_forward"], 3)}
                                for mode in configs} for name in ("int8", "int4", "fp8")}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--context", type=int, default=64, help="cached tokens per sequence before each step")
    parser.add_argument("--skip-demo", action="store_true", help="only the kernels and the 3B shape")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"benchmark": "quantization", "date": date.today().isoformat(), "machine": platform.machine(),
              "threads": args.threads, "torch": torch.__version__,
              "command": " ".join(["python", "benchmarks/quantization.py"] + sys.argv[1:])}
    report["kernels_8192x3072"] = kernels(max(3, args.repeats // 3))
    print(json.dumps({"kernels": report["kernels_8192x3072"]}), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["3b_shape_2_layers"] = big_shape(Path(tmp), args.repeats, args.context)
        print(json.dumps({"3b": report["3b_shape_2_layers"]}), file=sys.stderr, flush=True)
        if not args.skip_demo:
            report["demo_model"] = demo_model(Path(tmp), 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
