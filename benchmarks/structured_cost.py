"""What structured output costs on the host (runtime/structured.py, llguidance): compile, mask and commit.

    python benchmarks/structured_cost.py [--threads 1] [--outputs 20] [--drafts 4] [--large]

For each kind (json_schema with a small object schema, regex), greedy generation over random logits (a
stand-in model: the grammar, not the model, is what is timed) on the demo model's tokenizer (4096 ids):
- compile: a cold compile of the grammar (cache cleared; the tokenizer load is reported apart), and a cached
  compile_constraint call (what every later request with the same grammar pays);
- mask: `masks([[]])` at a state not asked before (what AR pays per token; the bool [1, V] tensor included);
- commit: `commit([token])`, per token;
- draft: one `masks()` call for the `--drafts` + 1 verify positions of a speculative round (prefixes [],
  [d0], [d0, d1], ... of a greedy draft), per call and per row.
`--large` repeats it on a synthetic 131072-id tokenizer (the size of the real presets' vocabulary: the 252
byte tokens plus `<extra_N>` filler tokens, as `trimode random-checkpoint` writes it) - a vocabulary-size
stress test, not a real BPE.

Prints one JSON object (microseconds unless named _ms).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trimode.demo import demo_model_path  # noqa: E402
from trimode.runtime import structured  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 4},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "tags", "ok"],
    "additionalProperties": False,
}
KINDS = {"json_schema": json.dumps(SCHEMA), "regex": r"[A-Z][a-z]{2,12}( [a-z]{1,10}){0,6}\. [0-9]{2,4}-[0-9]{4}"}


def us(seconds: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(seconds) * 1e6, 1), "mean": round(statistics.fmean(seconds) * 1e6, 1),
            "p90": round(sorted(seconds)[int(0.9 * (len(seconds) - 1))] * 1e6, 1), "n": len(seconds)}


def measure(path: Path, vocab_size: int, eos: int, kind: str, spec: str, outputs: int, drafts: int) -> dict:
    structured.cache_clear()
    start = time.perf_counter()
    structured._load_tokenizer(path, structured._tokenizer_key(path), eos)
    tokenizer_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    structured.compile_constraint(path, vocab_size, eos, kind, spec)
    compile_ms = (time.perf_counter() - start) * 1e3
    cached = []
    for _ in range(50):
        start = time.perf_counter()
        structured.compile_constraint(path, vocab_size, eos, kind, spec)
        cached.append(time.perf_counter() - start)

    masks, commits, tokens = [], [], 0
    runs = []
    for seed in range(outputs):
        gen = torch.Generator().manual_seed(seed)
        c = structured.compile_constraint(path, vocab_size, eos, kind, spec)
        out: list[int] = []
        while len(out) < 400:
            start = time.perf_counter()
            row = c.masks([[]])[0]
            if out:  # the first mask of a request is the compiled start mask
                masks.append(time.perf_counter() - start)
            token = int(torch.randn(vocab_size, generator=gen).masked_fill(~row, float("-inf")).argmax())
            start = time.perf_counter()
            c.commit([token])
            commits.append(time.perf_counter() - start)
            out.append(token)
            if token == eos:
                break
        tokens += len(out)
        runs.append(out)

    rounds = []
    for out in runs:  # speculative rounds along the greedy outputs: every drafted prefix is a real one
        c = structured.compile_constraint(path, vocab_size, eos, kind, spec)
        at = 0
        while at < len(out) - 1:
            draft = out[at:at + drafts]
            start = time.perf_counter()
            c.masks([draft[:i] for i in range(len(draft) + 1)])
            rounds.append((time.perf_counter() - start, len(draft) + 1))
            c.commit(out[at:at + len(draft) + 1])
            at += len(draft) + 1
    per_round = [t for t, _ in rounds]
    per_row = [t / n for t, n in rounds]
    return {"tokenizer_load_ms": round(tokenizer_ms, 2), "compile_ms": round(compile_ms, 2),
            "compile_cached": us(cached), "mask": us(masks), "commit": us(commits),
            "draft_round": us(per_round), "draft_row": us(per_row),
            "tokens": tokens, "mean_output_tokens": round(tokens / outputs, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--outputs", type=int, default=20)
    parser.add_argument("--drafts", type=int, default=4)
    parser.add_argument("--large", action="store_true", help="also a synthetic 131072-id vocabulary")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import llguidance

    root = demo_model_path()
    config = json.loads((root / "config.json").read_text())
    result: dict = {"benchmark": "structured_cost", "engine": f"llguidance {llguidance.__version__}",
                    "threads": args.threads, "python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "drafts": args.drafts, "tokenizers": {}}
    tokenizers = [("demo", root / "tokenizer.json", config["vocab_size"], config["eos_token_id"])]
    tmp = tempfile.TemporaryDirectory()
    if args.large:
        from trimode.builder.presets import PRESETS
        from trimode.builder.random_checkpoint import make_config, write_tokenizer

        large = make_config(PRESETS["8b"], "bf16", {})
        write_tokenizer(Path(tmp.name) / "tokenizer.json", large)
        tokenizers.append(("synthetic_131072", Path(tmp.name) / "tokenizer.json", large.vocab_size,
                           large.eos_token_id))
    for name, path, vocab_size, eos in tokenizers:
        result["tokenizers"][name] = {"vocab_size": vocab_size, **{
            kind: measure(path, vocab_size, eos, kind, spec, args.outputs, args.drafts)
            for kind, spec in KINDS.items()}}
    tmp.cleanup()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
