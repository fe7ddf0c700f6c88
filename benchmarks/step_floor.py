"""Step time against the weight-read floor, per step kind, batch 1 and 8, measured in one run.

    python benchmarks/step_floor.py [--threads 1] [--repeats 30]

A forward must at least read every weight once, so `weight bytes / copy bandwidth` is its physical floor;
the bandwidth is measured in the same run: a large tensor copy (bytes copied per second, the "copy
bandwidth") and a large reduction (bytes read per second, which is what reading weights needs; usually
higher, so its floor is the stricter one), medians of several. For the demo model and
a random checkpoint large enough to be bandwidth-bound (the 3B shape with 2 layers), each step kind - decode,
a spec draft and verify block, a quad chunk, a prefill - is timed through the engine's real `step` at
batch 1 and 8, and reported as a multiple of the floor. Also AR tokens/s against Hugging Face transformers'
`generate` on the same weights at batch 1. Prints one JSON object.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL, QUAD  # noqa: E402
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint  # noqa: E402
from trimode.runtime.backends.step import ChunkRow  # noqa: E402
from trimode.runtime.bench.direct import DirectSequences  # noqa: E402
from trimode.runtime.generate import generate  # noqa: E402
from trimode.runtime.modes.quad import quad_layout, quad_logit_offsets  # noqa: E402
from trimode.runtime.request import GenerationConfig  # noqa: E402


def copy_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """Bytes copied per second by a large tensor copy (the usual "copy bandwidth"; each byte is read once)."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return src.numel() * 4 / statistics.median(times)


def read_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """Bytes per second read by a reduction over a large tensor (each byte read once, nothing written)."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).normal_()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - start)
    return src.numel() * 4 / statistics.median(times)


def weight_bytes(engine) -> int:
    return engine.model.weight_bytes


def step_rows(kind: str, batch: int, context: int, mask: int) -> list[ChunkRow]:
    rows = []
    for _ in range(batch):
        if kind == "decode":
            rows.append(ChunkRow([5], CAUSAL, write=True, logit_offsets=[0]))
        elif kind == "draft16":
            rows.append(ChunkRow([5] + [mask] * 15, BIDIRECTIONAL, logit_offsets=list(range(16))))
        elif kind == "verify16":
            rows.append(ChunkRow([5] * 16, CAUSAL, write=True, logit_offsets=list(range(16))))
        elif kind == "quad4":
            tokens, positions = quad_layout(context, [5, 6, 7, 8], mask)
            rows.append(ChunkRow(tokens, QUAD, mask_param=4, write=True, positions=positions,
                                 logit_offsets=quad_logit_offsets(4, False)))
        elif kind == "prefill128":
            rows.append(ChunkRow([5] * 128, CAUSAL, write=True, logit_offsets=[127]))
    return rows


def time_step(engine, kind: str, batch: int, context: int, repeats: int) -> float:
    seqs = DirectSequences(engine, batch)
    seqs.step(list(range(batch)), [ChunkRow([3] * context, CAUSAL, write=True) for _ in range(batch)])
    times = []
    for _ in range(repeats + 2):
        rows = step_rows(kind, batch, context, engine.config.mask_token_id)
        batch_in = seqs.batch(list(range(batch)), rows)
        start = time.perf_counter()
        engine.step(seqs.cache, batch_in)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def ar_vs_transformers(path: Path, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    from trimode.runtime.bench.peers import HFGenerate

    engine = engine_from_checkpoint(path, dtype="fp32", max_batch_size=1)
    hf = HFGenerate(path, torch.float32)
    config = GenerationConfig(mode="ar", max_new_tokens=new_tokens)
    ours_t, theirs_t = [], []
    generate(engine, [prompt], config)
    hf(prompt, new_tokens)
    same = None
    for _ in range(repeats):
        start = time.perf_counter()
        ours = generate(engine, [prompt], config)[0].tokens
        ours_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = hf(prompt, new_tokens)
        theirs_t.append(time.perf_counter() - start)
        same = ours == theirs[: len(ours)]
    ours_s, theirs_s = statistics.median(ours_t), statistics.median(theirs_t)
    return {"ours_tokens_per_s": round(new_tokens / ours_s, 1), "hf_generate_tokens_per_s": round(
        new_tokens / theirs_s, 1), "ratio": round(theirs_s / ours_s, 2), "greedy_tokens_equal": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--context", type=int, default=64, help="cached tokens per sequence before the step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from trimode.demo import demo_model_path

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "3b2"
        subprocess.run([sys.executable, "-m", "trimode", "random-checkpoint", str(big), "--preset", "3b",
                        "--num-hidden-layers", "2", "--vocab-size", "32768", "--dtype", "fp32"],
                       check=True, capture_output=True)
        models = {"demo": Path(demo_model_path()), "3b_2layers": big}
        bandwidth = copy_bandwidth()
        reading = read_bandwidth()
        report = {"benchmark": "step_floor", "date": date.today().isoformat(), "machine": platform.machine(),
                  "threads": args.threads, "context": args.context,
                  "command": " ".join(["python", "benchmarks/step_floor.py"] + sys.argv[1:]),
                  "copy_bandwidth_GBps": round(bandwidth / 1e9, 2), "read_bandwidth_GBps": round(reading / 1e9, 2),
                  "models": {}}
        for name, path in models.items():
            engine = engine_from_checkpoint(path, dtype="fp32", max_batch_size=8)
            floor = weight_bytes(engine) / bandwidth
            read_floor = weight_bytes(engine) / reading
            entry = {"weight_MB": round(weight_bytes(engine) / 1e6, 1), "floor_ms": round(1e3 * floor, 3),
                     "read_floor_ms": round(1e3 * read_floor, 3), "steps": {}}
            for kind in ("decode", "draft16", "verify16", "quad4", "prefill128"):
                for batch in (1, 8):
                    seconds = time_step(engine, kind, batch, args.context, args.repeats)
                    entry["steps"][f"{kind}_b{batch}"] = {"ms": round(1e3 * seconds, 3),
                                                          "x_floor": round(seconds / floor, 2),
                                                          "x_read_floor": round(seconds / read_floor, 2)}
            report["models"][name] = entry
            del engine
        demo_prompt = list(range(5, 45))
        report["ar_vs_transformers_generate_b1"] = {
            "demo": ar_vs_transformers(models["demo"], demo_prompt, 64, 5),
            "3b_2layers": ar_vs_transformers(big, demo_prompt, 32, 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
