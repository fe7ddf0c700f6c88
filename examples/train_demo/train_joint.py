"""Continue training the demo model for self-speculation and infill: on-policy draft self-distillation + AR + infill.

    python examples/train_demo/train_joint.py --init-from trimode/demo_model --out /tmp/joint \
        --time-budget-min 55 --threads 1

One joint continued training of the whole model (no adapter), every step:

* AR next-token loss on real corpus windows, plus the KL from the starting model's causal predictions on
  the same windows (an anchor: a first run without it, at lr 1e-3, drafted well after 200 steps but its
  held-out AR loss rose from 3.86 to 4.11);
* draft self-distillation, on-policy: contexts are held-in prompts (a `def` line and what follows, from the
  training files) continued by the CURRENT model's own greedy tokens (rollouts regenerated every
  `--refresh` steps with the weights being trained, so the targets follow the model as it changes). Draft
  blocks [t, MASK x (L-1)] start at every offset of the continuation (sampled), L in --draft-blocks, each
  seeing the clean causal stream before it exactly as the draft pass sees the KV cache; slot k's target is
  the model's greedy next token after the first k tokens of the block (the causal argmax of the same forward,
  detached) - what the verify pass will produce, so a matching draft is accepted;
* infill: chunks [hole (masked, ratio 1 or U(0,1]) ; clean suffix] after a causal prefix, half of the holes
  one source line; and a few plain diffusion blocks (the family's masked block objective).

The training metric is end-to-end: linear self-speculation actually run (greedy, 64 tokens) on held-in and
held-out prompts, drafts accepted per round and tokens per forward, printed every --eval-every-min.
Writes a real-format checkpoint to --out (bf16 weights, config, tokenizer, training.json).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import corpus_files, read_text, token_stream  # noqa: E402
from draft_data import IGNORE, draft_chunk, infill_chunk, pack, resolve_targets  # noqa: E402
from spec_lib import greedy, spec_generate  # noqa: E402
from train import to_checkpoint, windows  # noqa: E402

from trimode.builder.checkpoint import load_checkpoint  # noqa: E402
from trimode.builder.convert import convert_checkpoint  # noqa: E402
from trimode.builder.safetensors_io import write_safetensors  # noqa: E402
from trimode.runtime.model.network import Transformer  # noqa: E402

WEIGHT_NAMES = ("embed", "norm", "head", "attn_norm", "mlp_norm", "qkv", "o", "gate_up", "down")


def def_snippets(files: list[Path], lines: int = 4) -> list[str]:
    """Every `def` line (module level or method) and the lines after it: the shape of the demo prompts."""
    out = []
    for path in files:
        text = read_text(path).splitlines()
        for number, line in enumerate(text):
            if line.startswith(("def ", "    def ")):
                out.append("\n".join(text[number : number + lines]) + "\n")
    return out


def held_out_prompts(tokenizer, count: int) -> list[list[int]]:
    """The 16 prompts of prompts.json, then more of the same kind from the held-out files (3 per file)."""
    from make_prompts import prompts_from

    recipe = Path(__file__).resolve().parent
    texts = [p["prompt"] for p in json.loads((recipe / "prompts.json").read_text())]
    _, held = corpus_files()
    for path in held:
        for text in prompts_from(path)[:3]:
            if text not in texts:
                texts.append(text)
    return [tokenizer.encode(t).ids for t in texts[:count]]


def newline_ids(tokenizer) -> torch.Tensor:
    """Boolean over the vocabulary: does the token contain a newline (it starts a source line)."""
    vocab = tokenizer.get_vocab_size()
    return torch.tensor(["\n" in tokenizer.decode([i]) for i in range(vocab)])


class Rollouts:
    """On-policy contexts: prompt (held-in def snippet cut to P tokens, or a corpus window) + greedy tokens."""

    def __init__(self, snippets: list[list[int]], stream: torch.Tensor, lengths: tuple[int, ...], new: int,
                 window_share: float, rng: random.Random) -> None:
        self.snippets = [s for s in snippets if len(s) >= min(lengths)]
        self.stream, self.lengths, self.new, self.window_share, self.rng = stream, lengths, new, window_share, rng
        self.items: list[tuple[torch.Tensor, int]] = []

    def refill(self, model, count: int) -> None:
        """`count` fresh rollouts from the current weights (fp32, batched per prompt length)."""
        length = self.rng.choice(self.lengths)
        prompts = []
        for _ in range(count):
            if self.rng.random() < self.window_share:
                start = self.rng.randrange(0, len(self.stream) - length)
                prompts.append(self.stream[start : start + length])
            else:
                pool = [s for s in (self.rng.choice(self.snippets) for _ in range(8)) if len(s) >= length]
                prompts.append(torch.tensor((pool or [self.stream[:length].tolist()])[0][:length]))
        prompts_t = torch.stack(prompts)
        with torch.no_grad():
            cont = greedy(model, prompts_t, self.new)
        self.items = [(torch.cat([prompts_t[b], cont[b]]), length) for b in range(count)] + self.items

    def take(self, count: int) -> list[tuple[torch.Tensor, int]]:
        taken, self.items = self.items[:count], self.items[count:]
        return taken


def infill_chunks(clean: torch.Tensor, count: int, newline: torch.Tensor, mask_id: int, max_hole: int,
                  max_suffix: int, rng: random.Random, gen: torch.Generator) -> list:
    """Infill chunks at random places of a real window; half of the holes are one source line."""
    out = []
    n = len(clean)
    line_starts = [j for j in range(8, n - 4) if bool(newline[clean[j]])]
    for _ in range(count):
        if line_starts and rng.random() < 0.5:
            start = rng.choice(line_starts)
            end = next((j for j in range(start + 1, n) if bool(newline[clean[j]])), n)
            hole = max(1, min(end - start, max_hole, n - start - 1))
        else:
            start = rng.randrange(8, n - 2)
            hole = rng.randint(1, min(max_hole, n - start - 1))
        suffix = rng.randint(1, max_suffix)
        suffix = min(suffix, n - start - hole)
        if suffix < 1:
            continue
        out.append(infill_chunk(clean, start, hole, suffix, mask_id, gen))
    return out


def diffusion_chunks(clean: torch.Tensor, count: int, blocks: tuple[int, ...], mask_id: int,
                     rng: random.Random, gen: torch.Generator) -> list:
    out = []
    for _ in range(count):
        block = rng.choice(blocks)
        start = rng.randrange(1, len(clean) - block)
        out.append(infill_chunk(clean, start, block, 0, mask_id, gen, full_mask_prob=0.0))
    return out


def chunk_losses(model, packed, compute, teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Losses of one packed batch; with `teacher_logits` [B, N, V] over the first N (clean) tokens, also the
    KL(teacher || model) of the causal predictions there (the anchor that keeps AR close to the start)."""
    with compute:
        logits = model.forward_masked(packed.tokens, packed.positions, packed.allowed)
    logits = logits.float()
    vocab = logits.shape[-1]
    out = {}
    if teacher_logits is not None:
        n = teacher_logits.shape[1]
        log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
        log_q = torch.log_softmax(logits[:, :n], dim=-1)
        out["kl"] = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    ar = packed.ar_targets.flatten()
    if bool((ar != IGNORE).any()):
        out["ar"] = F.cross_entropy(logits.view(-1, vocab), ar, ignore_index=IGNORE)
    targets = resolve_targets(packed, logits).flatten()
    valid = (targets != IGNORE) & (packed.weights.flatten() > 0)
    per_slot = F.cross_entropy(logits.view(-1, vocab), targets.clamp(min=0), reduction="none")
    for kind, name in ((1, "draft"), (2, "infill"), (3, "diffusion")):
        sel = valid & (packed.kinds.flatten() == kind)
        if bool(sel.any()):
            w = packed.weights.flatten()[sel]
            out[name] = (per_slot[sel] * w).sum() / w.sum()
            if kind == 1:
                hit = (logits.view(-1, vocab)[sel].argmax(-1) == targets[sel]).float()
                out["draft_acc"] = hit.mean().detach()
    return out


@torch.no_grad()
def held_out_ar_loss(model, stream: torch.Tensor, batches: int = 8, batch_size: int = 8, length: int = 256,
                     bf16: bool = False) -> float:
    """Causal AR loss on the same fixed-seed windows train.py's evaluate() uses (seed 1234, 8 x 8 x 256)."""
    rng = random.Random(1234)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None]
    total = 0.0
    for _ in range(batches):
        batch = windows(stream, length, batch_size, rng)
        positions = torch.arange(length).expand(batch_size, -1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model.forward_masked(batch, positions, allowed.expand(batch_size, -1, -1)).float()
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)))
    return total / batches


@torch.no_grad()
def spec_metric(model, prompts: list[list[int]], block: int, mask_id: int, new: int = 64) -> dict[str, float]:
    """Linear self-speculation run end to end (greedy): drafts accepted per round, tokens per forward."""
    accepted, rounds, tokens, forwards = 0, 0, 0, 0
    for prompt in prompts:
        r = spec_generate(model, prompt, new, block, mask_id)
        accepted += sum(r.accepted)
        rounds += len(r.accepted)
        tokens += len(r.tokens)
        forwards += r.forwards
    return {"accepted_per_round": accepted / max(rounds, 1), "tokens_per_forward": tokens / max(forwards, 1)}


def frozen_copy(config, weights: dict[str, torch.Tensor]) -> Transformer:
    return Transformer(config, {k: v.detach().clone() for k, v in weights.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--time-budget-min", type=float, default=55.0)
    parser.add_argument("--steps", type=int, default=0, help="Fixed step count (0: run for the time budget).")
    parser.add_argument("--corpus-batch", type=int, default=4)
    parser.add_argument("--corpus-len", type=int, default=256)
    parser.add_argument("--policy-batch", type=int, default=8)
    parser.add_argument("--draft-blocks", type=str, default="4,8,16")
    parser.add_argument("--drafts-per-row", type=int, default=12)
    parser.add_argument("--infill-per-row", type=int, default=4)
    parser.add_argument("--diffusion-per-row", type=int, default=2)
    parser.add_argument("--prompt-lengths", type=str, default="16,24,32,40")
    parser.add_argument("--rollout-new", type=int, default=64, help="Greedy tokens whose states start drafts.")
    parser.add_argument("--refresh", type=int, default=8, help="Steps between fresh on-policy rollouts.")
    parser.add_argument("--w-draft", type=float, default=1.0)
    parser.add_argument("--w-kl", type=float, default=1.0,
                        help="KL to the starting model's causal predictions on the corpus rows (0: off).")
    parser.add_argument("--w-infill", type=float, default=0.5)
    parser.add_argument("--w-diffusion", type=float, default=0.25)
    parser.add_argument("--slot-decay", type=float, default=0.85)
    parser.add_argument("--eval-every-min", type=float, default=10.0)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--save-every-min", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compute", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    from tokenizers import Tokenizer

    draft_blocks = tuple(int(x) for x in args.draft_blocks.split(","))
    prompt_lengths = tuple(int(x) for x in args.prompt_lengths.split(","))
    tokenizer = Tokenizer.from_file(str(args.init_from / "tokenizer.json"))
    checkpoint = load_checkpoint(args.init_from, with_lora=False)
    config = checkpoint.config
    mask_id, eos_id = config.mask_token_id, config.eos_token_id
    loaded = convert_checkpoint(checkpoint, torch.float32, use_lora=False)
    weights = {k: v.clone().requires_grad_() for k, v in loaded.items()}
    model = Transformer(config, weights)
    anchor = Transformer(config, {k: v.clone() for k, v in loaded.items()})  # the starting model, frozen
    train_files, held_files = corpus_files()
    train_stream = token_stream(tokenizer, train_files, eos_id)
    held_stream = token_stream(tokenizer, held_files, eos_id)
    snippets = [tokenizer.encode(s).ids for s in def_snippets(train_files)]
    held_in = [s[:40] for s in random.Random(7).sample(snippets, args.eval_prompts)]
    held_out = held_out_prompts(tokenizer, args.eval_prompts)
    newline = newline_ids(tokenizer)
    print(f"{len(snippets)} held-in def snippets; train {len(train_stream):,} tokens", flush=True)

    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    new = args.rollout_new + max(draft_blocks) - 1
    rollouts = Rollouts(snippets, train_stream, prompt_lengths, new, window_share=0.25, rng=rng)
    def compute() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.compute == "bf16")

    def evaluate(tag: str) -> dict:
        frozen = frozen_copy(config, weights)
        t0 = time.time()
        record = {"held_out_ar_loss": held_out_ar_loss(frozen, held_stream),
                  "held_in_spec_L16": spec_metric(frozen, held_in, 16, mask_id),
                  "held_out_spec_L16": spec_metric(frozen, held_out, 16, mask_id),
                  "held_out_spec_L8": spec_metric(frozen, held_out, 8, mask_id)}
        print(f"[eval {tag}] {json.dumps(record)} ({time.time() - t0:.0f} s)", flush=True)
        return record

    def save(path: Path, record: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path / "model.safetensors", to_checkpoint(config, weights, torch.bfloat16),
                          {"format": "pt"})
        (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        tokenizer.save(str(path / "tokenizer.json"))
        (path / "training.json").write_text(json.dumps(record, indent=2) + "\n")

    history = [{"step": 0, "minutes": 0.0, **evaluate("start")}]
    optimizer = torch.optim.AdamW(list(weights.values()), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.time_budget_min * 60
    train_start = time.time()
    last_eval = last_save = train_start
    step, logs = 0, {}
    while True:
        elapsed = time.time() - train_start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        if len(rollouts.items) < args.policy_batch:
            rollouts.refill(frozen_copy(config, weights), args.policy_batch * args.refresh)
        # on-policy rows: prompt (AR loss) + greedy continuation (no AR loss), draft blocks at sampled offsets
        policy_rows = []
        for clean, plen in rollouts.take(args.policy_batch):
            ar_mask = torch.arange(len(clean)) < plen - 1
            chunks = []
            for _ in range(args.drafts_per_row):
                block = rng.choice(draft_blocks)
                start = plen + rng.randrange(0, args.rollout_new)
                chunks.append(draft_chunk(clean, start, block, mask_id, eos_id, args.slot_decay))
            policy_rows.append((clean, ar_mask, chunks))
        corpus_rows = []
        corpus_clean = windows(train_stream, args.corpus_len, args.corpus_batch, rng)
        teacher_logits = None
        if args.w_kl > 0:
            causal = torch.ones(args.corpus_len, args.corpus_len, dtype=torch.bool).tril()
            with torch.no_grad(), compute():
                teacher_logits = anchor.forward_masked(
                    corpus_clean, torch.arange(args.corpus_len).expand(args.corpus_batch, -1),
                    causal.expand(args.corpus_batch, -1, -1)).float()
        for clean in corpus_clean:
            chunks = infill_chunks(clean, args.infill_per_row, newline, mask_id, 24, 40, rng, gen)
            chunks += diffusion_chunks(clean, args.diffusion_per_row, draft_blocks, mask_id, rng, gen)
            corpus_rows.append((clean, torch.ones(len(clean), dtype=torch.bool), chunks))
        policy = chunk_losses(model, pack(policy_rows), compute())
        corpus = chunk_losses(model, pack(corpus_rows), compute(), teacher_logits)
        loss = (corpus["ar"] + args.w_kl * corpus.get("kl", 0.0) + 0.25 * policy["ar"]
                + args.w_draft * policy["draft"]
                + args.w_infill * corpus.get("infill", 0.0) + args.w_diffusion * corpus.get("diffusion", 0.0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(weights.values()), 1.0)
        optimizer.step()
        step += 1
        for name, value in (("ar", corpus["ar"]), ("kl", corpus.get("kl", 0.0)), ("draft", policy["draft"]),
                            ("draft_acc", policy["draft_acc"]), ("infill", corpus.get("infill", torch.tensor(0.0)))):
            logs.setdefault(name, []).append(float(value.detach()) if torch.is_tensor(value) else float(value))
        if step % 25 == 0 or step == 1:
            means = {k: sum(v) / len(v) for k, v in logs.items()}
            logs = {}
            print(f"step {step} {time.time() - train_start:.0f}s lr {lr:.2e} "
                  + " ".join(f"{k} {v:.3f}" for k, v in means.items()), flush=True)
        now = time.time()
        if now - last_eval > args.eval_every_min * 60:
            history.append({"step": step, "minutes": round((now - train_start) / 60, 1), **evaluate(f"step {step}")})
            last_eval = time.time()
        if now - last_save > args.save_every_min * 60:
            save(args.out.with_name(args.out.name + "_partial"), {"step": step})
            last_save = time.time()

    final = evaluate("final")
    history.append({"step": step, "minutes": round((time.time() - train_start) / 60, 1), **final})
    previous = json.loads((args.init_from / "training.json").read_text())
    record = dict(previous)
    record["continued"] = {
        "recipe": "examples/train_demo/train_joint.py (on-policy draft self-distillation + AR + infill)",
        "command": "python " + " ".join(sys.argv),
        "steps": step, "lr": args.lr, "warmup": args.warmup, "threads": args.threads, "compute": args.compute,
        "seed": args.seed, "corpus_batch": [args.corpus_batch, args.corpus_len], "policy_batch": args.policy_batch,
        "draft_blocks": list(draft_blocks), "drafts_per_row": args.drafts_per_row,
        "infill_per_row": args.infill_per_row, "diffusion_per_row": args.diffusion_per_row,
        "weights": {"draft": args.w_draft, "kl_to_start": args.w_kl, "infill": args.w_infill,
                    "diffusion": args.w_diffusion},
        "slot_decay": args.slot_decay, "refresh": args.refresh,
        "wall_time_min": round((time.time() - started) / 60, 1), "history": history,
    }
    save(args.out, record)
    print(json.dumps(record["continued"], indent=2), flush=True)


if __name__ == "__main__":
    main()
