"""Train the demo model's self-speculation draft adapter (`linear_spec_lora/`) by self-distillation, on CPU.

    cp -r trimode/demo_model /tmp/demo_copy
    python examples/train_demo/train_lora.py --model /tmp/demo_copy --time-budget-min 12

Why distillation: a draft token is kept only while it equals the causal model's own greedy choice, so the
best draft predicts the model's greedy continuation, not the data. The teacher is the frozen base model
itself: from a window of training text it decodes greedily; the first `--on-policy` greedy tokens extend the
context (the last of them is t, the block's first token) and the next L-1 are the targets g1..g(L-1). The
student is the same frozen model with a LoRA adapter on o_proj (the family's adapter layout), run exactly as
the draft pass runs at inference: the block [t, MASK x (L-1)] sees the context causally computed without the
adapter and itself bidirectionally with the adapter on, and slot k is trained towards g_k. Writes
`linear_spec_lora/` (PEFT format) into --model (give it a copy) and an `adapter` entry in its training.json.
See README.md for the measured effect (small at this model size; the shipped model has no adapter).
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

from data import corpus_files, token_stream  # noqa: E402
from spec_lib import greedy  # noqa: E402

from trimode.builder.checkpoint import LORA_DIR, load_checkpoint  # noqa: E402
from trimode.builder.convert import convert_checkpoint  # noqa: E402
from trimode.builder.safetensors_io import write_safetensors  # noqa: E402
from trimode.runtime.model.network import Transformer  # noqa: E402

IGNORE = -100


def draft_attention_mask(context: int, block: int) -> torch.Tensor:
    """allowed[i, j] for [context ; block]: the context is causal, the block sees the context and itself."""
    n = context + block
    idx = torch.arange(n)
    allowed = idx[None, :] <= idx[:, None]
    allowed[context:, context:] = True
    return allowed


@torch.no_grad()
def teacher_rollout(model: Transformer, prefixes: torch.Tensor, on_policy: int, block: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(draft inputs [context, t], targets g1..g(L-1)) from the model's own greedy continuation of `prefixes`.

    The first `on_policy` greedy tokens join the context (the last is t), so the draft is trained on the text
    it will actually see while generating - the model's own, often repetitive, output - not only on the data.
    Targets after an EOS, and whole blocks whose context already ended, are ignored. Decoding uses the
    recipe's own cached loop (spec_lib.greedy).
    """
    eos = model.config.eos_token_id
    greedy_tokens = greedy(model, prefixes, on_policy + block - 1)
    full = torch.cat([prefixes, greedy_tokens], dim=1)
    split = prefixes.shape[1] + on_policy
    inputs, targets = full[:, :split].clone(), full[:, split:].clone()
    is_eos = (targets == eos).int()
    targets[is_eos.cumsum(1) - is_eos > 0] = IGNORE
    targets[(greedy_tokens[:, :on_policy] == eos).any(1)] = IGNORE
    return inputs, targets


class RolloutQueue:
    """Teacher rollouts made `chunk` windows at a time: decode steps cost per call, so larger batches are cheaper."""

    def __init__(self, engine: Transformer, stream: torch.Tensor, prefix: int, on_policy: int, block: int,
                 chunk: int, rng: random.Random) -> None:
        self.engine, self.stream, self.prefix, self.on_policy = engine, stream, prefix, on_policy
        self.block, self.chunk, self.rng = block, chunk, rng
        self.inputs = self.targets = torch.empty(0, dtype=torch.long)

    def take(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inputs.shape[0] < count:
            prefixes = sample_windows(self.stream, self.prefix, self.chunk, self.rng)
            inputs, targets = teacher_rollout(self.engine, prefixes, self.on_policy, self.block)
            self.inputs = torch.cat([self.inputs.view(-1, inputs.shape[1]), inputs])
            self.targets = torch.cat([self.targets.view(-1, targets.shape[1]), targets])
        inputs, self.inputs = self.inputs[:count], self.inputs[count:]
        targets, self.targets = self.targets[:count], self.targets[count:]
        return inputs, targets


def sample_windows(stream: torch.Tensor, length: int, count: int, rng: random.Random) -> torch.Tensor:
    """Random windows of the token stream: a context plus the token t that starts the draft block."""
    starts = [rng.randrange(0, len(stream) - length) for _ in range(count)]
    return torch.stack([stream[s : s + length] for s in starts])


def draft_logits(model: Transformer, windows: torch.Tensor, block: int, mask_id: int, allowed: torch.Tensor,
                 use_lora: bool = True) -> torch.Tensor:
    """Logits of the block slots 1..L-1 for [context, t, MASK x (L-1)], adapter (if used) on the block only."""
    batch, context = windows.shape[0], windows.shape[1] - 1
    masks = torch.full((batch, block - 1), mask_id, dtype=torch.long)
    tokens = torch.cat([windows, masks], dim=1)
    positions = torch.arange(tokens.shape[1]).expand(batch, -1)
    lora = (positions >= context).contiguous() if use_lora else False
    logits = model.forward_masked(tokens, positions, allowed.expand(batch, -1, -1), lora=lora)
    return logits[:, context + 1 :]


def accepted_per_block(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean number of leading drafts equal to the teacher's greedy tokens (spec keeps these plus one)."""
    agree = (logits.argmax(-1) == targets).int()
    return float(agree.cumprod(1).sum(1).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="Checkpoint written by train.py (updated).")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=128.0)
    parser.add_argument("--context", type=int, default=96, help="Tokens before the block's first token t.")
    parser.add_argument("--on-policy", type=int, default=32,
                        help="How many of those are the model's own greedy tokens (the rest is real text).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=0, help="Fixed step count (0: fill --time-budget-min).")
    parser.add_argument("--time-budget-min", type=float, default=12.0)
    parser.add_argument("--eval-blocks", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    from tokenizers import Tokenizer

    checkpoint = load_checkpoint(args.model, with_lora=False)
    config = checkpoint.config
    block, mask_id = config.block_size, config.mask_token_id
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    train_files, held_files = corpus_files()
    train_stream = token_stream(tokenizer, train_files, config.eos_token_id)
    held_stream = token_stream(tokenizer, held_files, config.eos_token_id)

    base = convert_checkpoint(checkpoint, torch.float32, use_lora=False)
    teacher = Transformer(config, base)
    prefix = args.context + 1 - args.on_policy
    q_dim = config.num_attention_heads * config.head_dim
    gen = torch.Generator().manual_seed(args.seed)
    adapter = {}
    for i in range(config.num_hidden_layers):
        adapter[f"layers.{i}.lora_a"] = (torch.randn(args.rank, q_dim, generator=gen) / math.sqrt(q_dim)
                                         ).requires_grad_()
        adapter[f"layers.{i}.lora_b"] = torch.zeros(config.hidden_size, args.rank, requires_grad=True)  # PEFT init
    student = Transformer(config, {**base, **adapter}, lora_scale=args.alpha / args.rank)
    allowed = draft_attention_mask(args.context, block)[None]

    rng = random.Random(args.seed)
    held_prefixes = sample_windows(held_stream, prefix, args.eval_blocks, random.Random(1234))
    held_windows, held_targets = teacher_rollout(teacher, held_prefixes, args.on_policy, block)
    queue = RolloutQueue(teacher, train_stream, prefix, args.on_policy, block, args.batch_size * 8, rng)

    @torch.no_grad()
    def evaluate(lora: bool) -> dict[str, float]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = torch.cat([draft_logits(student, w, block, mask_id, allowed, use_lora=lora)
                                for w in held_windows.split(64)])
        loss = F.cross_entropy(logits.float().flatten(0, 1), held_targets.flatten(), ignore_index=IGNORE)
        return {"distill_loss": float(loss), "accepted_per_block": accepted_per_block(logits.float(), held_targets)}

    before = evaluate(lora=False)
    print(f"held-out drafts without adapter: {before}", flush=True)
    optimizer = torch.optim.AdamW(list(adapter.values()), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    total_steps = args.steps or 10**9
    train_start, step = time.time(), 0
    while step < total_steps:
        if not args.steps and step == 10:
            per_step = (time.time() - train_start) / 10
            total_steps = max(20, int(args.time_budget_min * 60 / per_step))
            print(f"{per_step:.2f} s/step -> {total_steps} steps", flush=True)
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        windows, targets = queue.take(args.batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = draft_logits(student, windows, block, mask_id, allowed)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(adapter.values()), 1.0)
        optimizer.step()
        step += 1
        if step % 25 == 0 or step == 1:
            print(f"step {step}/{total_steps} distill {loss.item():.3f} accepted/block "
                  f"{accepted_per_block(logits.detach().float(), targets):.2f} lr {lr:.2e} "
                  f"{(time.time() - train_start) / step:.2f} s/step", flush=True)

    after = evaluate(lora=True)
    print(f"held-out drafts with adapter: {after}", flush=True)
    out = args.model / LORA_DIR
    out.mkdir(exist_ok=True)
    tensors = {}
    for i in range(config.num_hidden_layers):
        key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{key}.lora_A.weight"] = adapter[f"layers.{i}.lora_a"].detach().to(torch.bfloat16).contiguous()
        tensors[f"{key}.lora_B.weight"] = adapter[f"layers.{i}.lora_b"].detach().to(torch.bfloat16).contiguous()
    write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    adapter_config = {"peft_type": "LORA", "r": args.rank, "lora_alpha": args.alpha, "target_modules": ["o_proj"],
                      "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "task_type": "CAUSAL_LM",
                      "base_model_name_or_path": None}
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    record_path = args.model / "training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["adapter"] = {"rank": args.rank, "alpha": args.alpha, "steps": step, "batch_size": args.batch_size,
                         "context": args.context, "on_policy": args.on_policy, "lr": args.lr, "seed": args.seed,
                         "threads": args.threads,
                         "held_out_without_adapter": before, "held_out_with_adapter": after,
                         "wall_time_min": round((time.time() - started) / 60, 1),
                         "objective": "self-distillation: draft slot k -> the base model's k-th greedy token"}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["adapter"], indent=2))


if __name__ == "__main__":
    main()
