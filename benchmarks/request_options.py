"""What request options cost, per mode, on the demo model (CPU) - every ratio measured in one process.

    python benchmarks/request_options.py [--threads 1] [--tokens 64] [--repeats 3]

For AR, spec (block 8) and quad (block 4), the same held-out prompts run one at a time (batch 1, greedy)
plain, with penalties (repetition 1.1, frequency 0.2, presence 0.1, a logit bias), with logprobs (top 5),
and with structured output (a JSON schema; the outputs are checked to parse). Reported per mode and option:
tokens/s (median of `--repeats` runs), tokens per forward after the prefill, and the ratio of tokens/s to the
same mode's plain run (runs interleaved over options and modes); plus whether spec and quad gave AR's
tokens under each option (they must).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
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
from trimode.runtime.scheduler.scheduler import Scheduler  # noqa: E402
from trimode.runtime.serving.text import load_tokenizer  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "args": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                                           "returns": {"type": "string", "maxLength": 16}},
          "required": ["name", "args", "returns"], "additionalProperties": False}
OPTIONS = {
    "plain": {},
    "penalties": dict(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1,
                      logit_bias=((11, -3.0), (25, 2.0))),
    "logprobs": dict(logprobs=5),
    "json_schema": dict(structured=("json_schema", json.dumps(SCHEMA))),
}
MODES = [("ar", 1), ("spec", 8), ("quad", 4)]


def prompts(tokenizer) -> list[list[int]]:
    held_out = json.loads((ROOT / "examples" / "train_demo" / "prompts.json").read_text())
    texts = held_out["code"][:4] if isinstance(held_out, dict) else held_out[:4]
    return [tokenizer.encode(t if isinstance(t, str) else t["prompt"]).ids for t in texts]


def run_once(engine, batch, mode: str, block: int, options: dict, tokens: int) -> dict:
    """One pass over the prompts, one request at a time: tokens/s, generated tokens, forwards, outputs."""
    config = GenerationConfig(mode=mode, block_length=max(block, 2), max_new_tokens=tokens, **options)
    scheduler = Scheduler(engine)
    start = time.perf_counter()
    results = [generate(engine, [p], config, scheduler=scheduler)[0] for p in batch]
    elapsed = time.perf_counter() - start
    generated = sum(len(r.tokens) for r in results)
    return {"rate": generated / elapsed, "tokens": generated, "forwards": sum(r.forwards - 1 for r in results),
            "outputs": [r.tokens for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = demo_model_path()
    engine = open_engine(path, dtype="fp32")
    tokenizer = load_tokenizer(path / "tokenizer.json")
    batch = prompts(tokenizer)
    generate(engine, batch[:1], GenerationConfig(mode="ar", max_new_tokens=8))  # warm up
    runs: dict = {}
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the shared machine hits every cell
        for option, values in OPTIONS.items():
            for mode, block in MODES:
                runs.setdefault(option, {}).setdefault(mode, []).append(
                    run_once(engine, batch, mode, block, values, args.tokens))
    table = {option: {mode: {"tok_s": round(statistics.median(r["rate"] for r in rs), 1),
                             "tpf": round(rs[0]["tokens"] / max(rs[0]["forwards"], 1), 3),
                             "outputs": rs[0]["outputs"]}
                      for mode, rs in by_mode.items()}
             for option, by_mode in runs.items()}
    report: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                    "date": date.today().isoformat(), "torch": torch.__version__, "prompts": len(batch),
                    "tokens": args.tokens, "results": {}}
    for option, by_mode in table.items():
        row = {}
        for mode, result in by_mode.items():
            plain = table["plain"][mode]["tok_s"]
            row[mode] = {"tok_s": result["tok_s"], "tpf": result["tpf"],
                         "vs_plain": round(result["tok_s"] / plain, 3)}
            if mode != "ar":
                row[mode]["equals_ar"] = result["outputs"] == by_mode["ar"]["outputs"]
        if option == "json_schema":
            eos = engine.config.eos_token_id
            row["outputs_parse"] = all(_parses(tokenizer.decode([t for t in out if t != eos]))
                                       for out in by_mode["ar"]["outputs"])
        report["results"][option] = row
    print(json.dumps(report, indent=1))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
