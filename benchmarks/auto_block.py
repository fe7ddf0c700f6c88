"""`--block-length auto` on one-shot requests, against every fixed block length and the model's default.

    python benchmarks/auto_block.py [--threads 1] [--prompts 8] [--runs 3] [--new-tokens 64]

One-shot means what `trimode generate` does: a new process per request. Each `auto` request here starts from
the statistics a new process would load - the cache file (`TRIMODE_CACHE_DIR`, a fresh temporary folder) -
and writes them back when it ends, as a process does at exit. The first `auto` request of the run is the
first ever on this engine and device: it calibrates (its time is reported separately, not in the medians).
For spec and quad, greedy, and spec sampled at temperature 0.8 (where drafts are rarely accepted, so plain AR
is a candidate), each held-out prompt runs once per configuration, configurations interleaved, `--runs`
times; the report gives the median seconds per request and each configuration over the default block length
and over the best fixed one. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trimode.demo import demo_model_path  # noqa: E402
from trimode.runtime.backends.engine_loader import open_engine  # noqa: E402
from trimode.runtime.generate import generate  # noqa: E402
from trimode.runtime.request import GenerationConfig  # noqa: E402
from trimode.runtime.scheduler import auto_block  # noqa: E402
from trimode.runtime.serving.text import load_tokenizer  # noqa: E402

FIXED = (2, 3, 4, 6, 8, 12, 16)


def one_shot(engine, prompt: list[int], config: GenerationConfig) -> tuple[float, int, int]:
    """Seconds, forwards and the block length of one request, as a new process would run it."""
    if config.block_length == "auto":
        auto_block._STATS.pop(engine, None)  # what a new process knows: the cache file
    start = time.perf_counter()
    result = generate(engine, [prompt], config)[0]
    seconds = time.perf_counter() - start
    if config.block_length == "auto":
        auto_block.stats_for(engine).save()  # what a process writes back at exit
    engine.cache.pages.clear_cache()  # no prompt is read from an earlier request's pages
    return seconds, result.forwards, result.block_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = tempfile.mkdtemp(prefix="trimode-auto-")
    os.environ["TRIMODE_CACHE_DIR"] = folder
    engine = open_engine(demo_model_path(), dtype="fp32")
    tokenizer = load_tokenizer(engine.tokenizer_path)
    texts = json.loads((ROOT / "examples/train_demo/prompts.json").read_text())
    prompts = [tokenizer.encode(t["prompt"] if isinstance(t, dict) else t).ids for t in texts][: args.prompts]
    default = engine.config.block_size
    report = {"benchmark": "auto_block", "date": date.today().isoformat(), "machine": platform.machine(),
              "threads": args.threads, "default_block_length": default, "prompts": len(prompts),
              "new_tokens": args.new_tokens,
              "command": " ".join(["python", "benchmarks/auto_block.py"] + sys.argv[1:]), "cases": {}}
    generate(engine, [prompts[0]], GenerationConfig(mode="ar", max_new_tokens=8))  # warm-up
    for mode, temperature in (("spec", 0.0), ("quad", 0.0), ("spec", 0.8)):
        def config(length, mode=mode, temperature=temperature) -> GenerationConfig:
            return GenerationConfig(mode=mode, max_new_tokens=args.new_tokens, block_length=length,
                                    temperature=temperature, seed=1)
        configs = {f"L={length}": config(length) for length in FIXED}
        configs["ar"] = GenerationConfig(mode="ar", max_new_tokens=args.new_tokens, temperature=temperature,
                                         seed=1)
        configs["auto"] = config("auto")
        first = time.perf_counter()
        _, _, first_choice = one_shot(engine, prompts[0], configs["auto"])  # the first ever: calibrates
        calibration_s = time.perf_counter() - first
        times = {name: [] for name in configs}
        forwards = {name: [] for name in configs}
        chosen: list[int] = []
        for _ in range(args.runs):
            for prompt in prompts:
                for name, cfg in configs.items():
                    seconds, count, length = one_shot(engine, prompt, cfg)
                    times[name].append(seconds)
                    forwards[name].append(count)
                    if name == "auto":
                        chosen.append(length)
        per_request = {name: statistics.median(t) for name, t in times.items()}
        best_fixed = min((n for n in configs if n.startswith("L=")), key=per_request.get)
        case = {"seconds_per_request": {n: round(s, 4) for n, s in per_request.items()},
                "forwards_per_request": {n: statistics.median(f) for n, f in forwards.items()},
                "first_auto_request_s": round(calibration_s, 3), "first_choice": first_choice,
                "auto_choices": {str(k): chosen.count(k) for k in sorted(set(chosen))},
                "best_fixed": best_fixed,
                "auto_over_default": round(per_request["auto"] / per_request[f"L={default}"], 3),
                "auto_over_best_fixed": round(per_request["auto"] / per_request[best_fixed], 3),
                "auto_over_ar": round(per_request["auto"] / per_request["ar"], 3),
                "targets": "auto_over_default <= 1.05, auto_over_best_fixed <= 1.10"}
        report["cases"][f"{mode} T={temperature}"] = case
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
