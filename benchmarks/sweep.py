"""How the modes' ratios change with prompt length, output length, block length and batch size.

    python benchmarks/sweep.py --model trimode/demo_model --output benchmarks/sweep.json

One axis varies at a time around a base point; every point measures all modes in the same process
(interleaved runs, medians), so each row's ratios are comparable even on a noisy shared machine. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trimode.runtime.backends.engine_loader import open_engine
from trimode.runtime.bench.runner import bench_modes
from trimode.runtime.request import GenerationConfig

BASE = {"prompt_length": 32, "max_new_tokens": 64, "block_length": 16, "batch_size": 1}
AXES = {"prompt_length": [8, 32, 128], "max_new_tokens": [32, 64, 128], "block_length": [4, 8, 16, 32],
        "batch_size": [1, 4, 8]}


def prompts_from(engine, texts: list[str] | None, count: int, length: int, seed: int) -> list[list[int]]:
    """Held-out code prompts cut/padded to `length` tokens when a tokenizer exists, else random ids."""
    if texts and engine.tokenizer_path:
        from trimode.runtime.serving.text import load_tokenizer

        tokenizer = load_tokenizer(engine.tokenizer_path)
        joined = tokenizer.encode("\n".join(texts)).ids
        room = max(1, len(joined) - length)
        return [joined[(i * 997) % room:][:length] for i in range(count)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(128, engine.config.vocab_size, (length,), generator=gen).tolist() for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts-file", type=Path, default=None, help="JSON list of {prompt: text}.")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--axes", default=",".join(AXES), help="Comma-separated axes to sweep.")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    engine = open_engine(args.model)
    texts = [p["prompt"] for p in json.loads(args.prompts_file.read_text())] if args.prompts_file else None
    rows = []
    for axis in args.axes.split(","):
        for value in AXES[axis]:
            point = {**BASE, axis: value}
            length = point["block_length"]
            new_tokens = -(-point["max_new_tokens"] // length) * length
            configs = {m: GenerationConfig(mode=m, max_new_tokens=new_tokens, block_length=length)
                       for m in ("ar", "diffusion", "spec")}
            prompts = prompts_from(engine, texts, point["batch_size"], point["prompt_length"], seed=len(rows))
            report = bench_modes(engine, prompts, configs, runs=args.runs, warmup=1)
            row = {"axis": axis, **point, "max_new_tokens": new_tokens,
                   **{f"{m}_tokens_per_s": r["tokens_per_s"] for m, r in report.items()},
                   **{f"{m}_tpf": r["tokens_per_forward"] for m, r in report.items()},
                   "diffusion_over_ar": report["diffusion"]["speedup_vs_ar"],
                   "spec_over_ar": report["spec"]["speedup_vs_ar"], "spec_matches_ar": report["spec"]["matches_ar"]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    text = json.dumps({"model": str(args.model), "threads": torch.get_num_threads(), "rows": rows}, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
