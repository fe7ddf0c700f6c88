"""Infill evaluation: held-out functions with one line removed from the middle; infill vs an AR baseline.

    python examples/train_demo/eval_infill.py --model trimode/demo_model [--count 50] [--suffix 32]

Each example is a function from a held-out stdlib file (the train/held-out split of data.py) with at least
three body lines; the hole is the middle body line, taken in token space: from the token that starts the line
(byte-level BPE joins the newline with the line's indentation) up to the token holding the line's own newline,
so the hole is n whole tokens of the file's own tokenization (n given to both methods, 1 <= n <= 24). The
previous and next lines must not be blank.

* infill: the prefix (up to --prefix tokens) goes through a causal pass into the KV cache; the chunk
  [MASK x n][next --suffix tokens] is denoised bidirectionally (masks see each other and the suffix),
  committing the most confident masked slot per pass (n passes; `--threshold` also commits every slot at or
  above it), as in diffusion mode.
* AR baseline: greedy generation of n tokens from the prefix alone.

Token accuracy = matching tokens / total hole tokens (position by position); line exact-match rate too.
`--decoder recipe` (default) decodes with `spec_lib.infill` (built on the network's layers only, so it runs
whatever state the runtime is in); `--decoder runtime` uses the runtime's `generate(mode="infill")` and its
AR mode instead (same semantics: one slot per pass, a slot given the mask id stays masked).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import corpus_files, read_text  # noqa: E402
from spec_lib import greedy, infill  # noqa: E402

from trimode.builder.checkpoint import load_checkpoint  # noqa: E402
from trimode.builder.convert import convert_checkpoint  # noqa: E402
from trimode.runtime.model.network import Transformer  # noqa: E402


def function_holes(text: str) -> list[tuple[int, int]]:
    """(start, end) char offsets of the newline before and the newline after each function's middle line."""
    lines = text.split("\n")
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    holes = []
    for number, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped.startswith("def "):
            continue
        indent = len(line) - len(stripped)
        body = []
        for k in range(number + 1, len(lines)):
            if lines[k].strip() and len(lines[k]) - len(lines[k].lstrip()) <= indent:
                break
            body.append(k)
        while body and not lines[body[-1]].strip():
            body.pop()
        if len(body) < 3:
            continue
        mid = body[len(body) // 2]
        if not (lines[mid].strip() and lines[mid - 1].strip() and lines[mid + 1].strip()):
            continue
        holes.append((starts[mid] - 1, starts[mid] + len(lines[mid])))
    return holes


def examples(tokenizer, count: int, prefix: int, suffix: int, per_file: int = 2, max_hole: int = 24
             ) -> list[dict]:
    _, held = corpus_files()
    out = []
    for path in held:
        text = read_text(path)
        enc = tokenizer.encode(text)
        starts = {s: i for i, (s, _) in enumerate(enc.offsets)}
        taken = 0
        for c0, c1 in function_holes(text):
            i, j = starts.get(c0), starts.get(c1)
            if i is None or j is None or not 1 <= j - i <= max_hole or i < 8:
                continue
            ids = enc.ids
            out.append({"file": path.name, "prefix": ids[max(0, i - prefix) : i], "hole": ids[i:j],
                        "suffix": ids[j : j + suffix]})
            taken += 1
            if taken == per_file or len(out) == count:
                break
        if len(out) == count:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[2] / "trimode/demo_model")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--prefix", type=int, default=192, help="Prefix tokens kept before the hole.")
    parser.add_argument("--suffix", type=int, default=32, help="Suffix tokens after the hole.")
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--decoder", choices=("recipe", "runtime"), default="recipe")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="Also write the summary here.")
    parser.add_argument("--show", type=int, default=3, help="Print this many examples.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    checkpoint = load_checkpoint(args.model, with_lora=False)
    config = checkpoint.config
    model = Transformer(config, convert_checkpoint(checkpoint, torch.float32, use_lora=False))
    items = examples(tokenizer, args.count, args.prefix, args.suffix)
    if args.decoder == "runtime":
        from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
        from trimode.runtime.generate import generate
        from trimode.runtime.request import GenerationConfig

        engine = engine_from_checkpoint(args.model, dtype="fp32", use_lora=False)

        def fill(item: dict, n: int) -> list[int]:
            cfg = GenerationConfig(mode="infill", max_new_tokens=n, suffix=item["suffix"],
                                   threshold=args.threshold)
            out = generate(engine, [item["prefix"]], cfg)[0].tokens
            return (out + [config.mask_token_id] * n)[:n]

        def continue_ar(item: dict, n: int) -> list[int]:
            out = generate(engine, [item["prefix"]], GenerationConfig(mode="ar", max_new_tokens=n))[0].tokens
            return (out + [-1] * n)[:n]
    else:
        def fill(item: dict, n: int) -> list[int]:
            return infill(model, item["prefix"], item["suffix"], n, config.mask_token_id, args.threshold)

        def continue_ar(item: dict, n: int) -> list[int]:
            return greedy(model, torch.tensor([item["prefix"]]), n)[0].tolist()
    started = time.time()
    totals = {"tokens": 0, "infill": 0, "ar": 0, "infill_lines": 0, "ar_lines": 0}
    for k, item in enumerate(items):
        n = len(item["hole"])
        truth = torch.tensor(item["hole"])
        filled = torch.tensor(fill(item, n))
        ar = torch.tensor(continue_ar(item, n))
        totals["tokens"] += n
        totals["infill"] += int((filled == truth).sum())
        totals["ar"] += int((ar == truth).sum())
        totals["infill_lines"] += int(torch.equal(filled, truth))
        totals["ar_lines"] += int(torch.equal(ar, truth))
        if k < args.show:
            print(f"--- {item['file']} (n={n})\n  truth : {tokenizer.decode(item['hole'])!r}\n"
                  f"  infill: {tokenizer.decode(filled.tolist())!r}\n  ar    : {tokenizer.decode(ar.tolist())!r}")
    summary = {"model": str(args.model), "decoder": args.decoder, "examples": len(items),
               "hole_tokens": totals["tokens"],
               "suffix_tokens": args.suffix, "prefix_tokens": args.prefix, "threshold": args.threshold,
               "infill_token_accuracy": totals["infill"] / totals["tokens"],
               "ar_token_accuracy": totals["ar"] / totals["tokens"],
               "infill_line_exact": totals["infill_lines"] / len(items),
               "ar_line_exact": totals["ar_lines"] / len(items),
               "seconds": round(time.time() - started, 1)}
    summary["gain_points"] = 100 * (summary["infill_token_accuracy"] - summary["ar_token_accuracy"])
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
