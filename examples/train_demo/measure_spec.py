"""Measure the demo model for self-speculation: acceptance per round, tokens per forward, tokens/s, AR loss.

    python examples/train_demo/measure_spec.py --model trimode/demo_model [--prompts 48] [--json OUT]

* held-out prompts (prompts.json, then more `def` prompts of held-out files), 64 new tokens, greedy, batch 1;
* linear self-speculation run end to end at each --blocks L: drafts accepted per round (mean over rounds),
  tokens per forward (generated / forwards after the prefill), output checked equal to AR greedy;
* the same acceptance measured "teacher-forced": c(p) for EVERY state p of the greedy trajectory (what a
  per-block offline metric reports) next to the per-round mean that speculation realises;
* tokens/s, AR vs spec, batch 1, 1 thread, in one process with the modes interleaved prompt by prompt,
  through the runtime's generate() (`--timing runtime`, default) or the recipe's own loops (`recipe`);
* held-out AR loss (fp32, the fixed windows of train.py's evaluate).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import corpus_files, token_stream  # noqa: E402
from spec_lib import ar_generate, draft_run_lengths, greedy, spec_generate  # noqa: E402
from train_joint import held_out_ar_loss, held_out_prompts  # noqa: E402

from trimode.builder.checkpoint import load_checkpoint  # noqa: E402
from trimode.builder.convert import convert_checkpoint  # noqa: E402
from trimode.runtime.model.network import Transformer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[2] / "trimode/demo_model")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--blocks", type=str, default="4,8,16")
    parser.add_argument("--timing", choices=("runtime", "recipe", "none"), default="runtime")
    parser.add_argument("--timing-runs", type=int, default=2)
    parser.add_argument("--timing-only", action="store_true", help="Skip the acceptance and loss measurements.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    checkpoint = load_checkpoint(args.model, with_lora=False)
    config = checkpoint.config
    mask_id = config.mask_token_id
    model = Transformer(config, convert_checkpoint(checkpoint, torch.float32, use_lora=False))
    prompts = held_out_prompts(tokenizer, args.prompts)
    blocks = [int(b) for b in args.blocks.split(",")]
    report: dict = {"model": str(args.model), "prompts": len(prompts), "new_tokens": args.new}

    _, held = corpus_files()
    if args.timing_only:
        blocks_measured = []
    else:
        blocks_measured = blocks
        report["held_out_ar_loss"] = held_out_ar_loss(model, token_stream(tokenizer, held, config.eos_token_id))
    ar = [ar_generate(model, p, args.new) for p in prompts]
    for block in blocks_measured:
        results = [spec_generate(model, p, args.new, block, mask_id) for p in prompts]
        rounds = sum(len(r.accepted) for r in results)
        report[f"L{block}"] = {
            "accepted_per_round": sum(sum(r.accepted) for r in results) / rounds,
            "tokens_per_forward": sum(len(r.tokens) for r in results) / sum(r.forwards for r in results),
            "equals_ar": all(r.tokens == a for r, a in zip(results, ar, strict=True)),
        }
        states = []
        for p in prompts:
            cont = greedy(model, torch.tensor([p]), args.new + block - 1)[0].tolist()
            states += draft_run_lengths(model, p, cont, block, mask_id)[: args.new - 1]
        report[f"L{block}"]["teacher_forced_accepted_all_states"] = sum(states) / len(states)
        print(f"L={block}: {report[f'L{block}']}", flush=True)
    report["sample"] = tokenizer.decode(prompts[0] + ar[0])

    if args.timing != "none":
        if args.timing == "runtime":
            from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
            from trimode.runtime.generate import generate
            from trimode.runtime.request import GenerationConfig

            engine = engine_from_checkpoint(args.model, dtype="fp32", use_lora=False)

            def run(mode: str, prompt: list[int], block: int) -> list[int]:
                cfg = GenerationConfig(mode=mode, max_new_tokens=args.new, block_length=block)
                return generate(engine, [prompt], cfg)[0].tokens
        else:
            def run(mode: str, prompt: list[int], block: int) -> list[int]:
                if mode == "ar":
                    return ar_generate(model, prompt, args.new)
                return spec_generate(model, prompt, args.new, block, mask_id).tokens

        modes = [("ar", 0)] + [("spec", b) for b in blocks]
        for mode, block in modes:  # warm-up
            run(mode, prompts[0], block or 16)
        seconds = {f"{m}{b or ''}": 0.0 for m, b in modes}
        tokens = dict.fromkeys(seconds, 0)
        for _ in range(args.timing_runs):
            for prompt in prompts:
                for mode, block in modes:
                    t0 = time.perf_counter()
                    out = run(mode, prompt, block or 16)
                    seconds[f"{mode}{block or ''}"] += time.perf_counter() - t0
                    tokens[f"{mode}{block or ''}"] += len(out)
        rates = {k: tokens[k] / seconds[k] for k in seconds}
        report["tokens_per_s"] = {"via": args.timing, "batch": 1, "threads": args.threads, **rates,
                                  **{f"{k}_over_ar": rates[k] / rates["ar"] for k in rates if k != "ar"}}
        print(f"tokens/s: {report['tokens_per_s']}", flush=True)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
