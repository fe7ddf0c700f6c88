"""Train the demo model: a few-million-parameter Nemotron-Labs Diffusion model on the stdlib's source, on CPU.

    python examples/train_demo/train.py --out trimode/demo_model --time-budget-min 30

Writes a real-format checkpoint (config.json, model.safetensors, tokenizer.json) plus training.json with the
recipe's numbers. See README.md beside this file for the run that produced the shipped model.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import corpus_files, token_stream, train_tokenizer  # noqa: E402
from objective import joint_attention_mask, joint_loss  # noqa: E402

from trimode.builder.random_checkpoint import make_config  # noqa: E402
from trimode.builder.safetensors_io import write_safetensors  # noqa: E402
from trimode.runtime.model.network import Transformer  # noqa: E402

ARCH = {
    "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 11,
    "mask_token_id": 100, "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                        "original_max_position_embeddings": 2048, "beta_fast": 32.0, "beta_slow": 1.0,
                        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
}


def init_weights(config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Small normal init; residual output projections scaled by 1/sqrt(2 * layers)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q_dim = config.num_attention_heads * config.head_dim
    qkv = q_dim + 2 * config.num_key_value_heads * config.head_dim
    residual = 0.02 / math.sqrt(2 * layers)

    def normal(shape, std):
        return (torch.randn(shape, generator=generator) * std).requires_grad_()

    w = {"embed": normal((config.vocab_size, h), 0.02), "norm": torch.ones(h, requires_grad=True),
         "head": normal((config.vocab_size, h), 0.02)}
    for i in range(layers):
        w[f"layers.{i}.attn_norm"] = torch.ones(h, requires_grad=True)
        w[f"layers.{i}.mlp_norm"] = torch.ones(h, requires_grad=True)
        w[f"layers.{i}.qkv"] = normal((qkv, h), 0.02)
        w[f"layers.{i}.o"] = normal((h, q_dim), residual)
        w[f"layers.{i}.gate_up"] = normal((2 * inter, h), 0.02)
        w[f"layers.{i}.down"] = normal((h, inter), residual)
    return w


def to_checkpoint(config, w: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Converted layout -> the Hugging Face checkpoint names (fused qkv / gate_up split back)."""
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    out = {"encoder.embed_tokens.weight": w["embed"], "encoder.norm.weight": w["norm"],
           "diffusion_head.weight": w["head"]}
    for i in range(config.num_hidden_layers):
        p = f"encoder.layers.{i}."
        q, k, v = w[f"layers.{i}.qkv"].split([q_dim, kv_dim, kv_dim])
        gate, up = w[f"layers.{i}.gate_up"].chunk(2)
        out.update({p + "input_layernorm.weight": w[f"layers.{i}.attn_norm"], p + "self_attn.q_proj.weight": q,
                    p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                    p + "self_attn.o_proj.weight": w[f"layers.{i}.o"],
                    p + "post_attention_layernorm.weight": w[f"layers.{i}.mlp_norm"],
                    p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": w[f"layers.{i}.down"]})
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def compute_context(args) -> torch.autocast:
    """bf16 autocast for the matmuls (master weights, norms, softmax and losses stay fp32).

    On a CPU with AVX512-BF16 this halves the step time, which at this budget buys twice the training tokens.
    """
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.compute == "bf16")


def windows(stream: torch.Tensor, length: int, count: int, rng: random.Random) -> torch.Tensor:
    """`count` random windows of the token stream; windows may cross file boundaries (EOS marks them)."""
    starts = [rng.randrange(0, len(stream) - length) for _ in range(count)]
    return torch.stack([stream[s : s + length] for s in starts])


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, args, allowed: torch.Tensor, mask_id: int) -> dict[str, float]:
    """Mean AR and diffusion losses over fixed-seed windows, so train and held-out numbers compare directly."""
    rng, gen = random.Random(1234), torch.Generator().manual_seed(1234)
    ar_total = diff_total = 0.0
    batches = args.eval_batches
    for _ in range(batches):
        batch = windows(stream, args.seq_len, args.batch_size, rng)
        with compute_context(args):
            _, ar, diff = joint_loss(model, batch, args.block, mask_id, gen, allowed)
        ar_total += float(ar)
        diff_total += float(diff)
    return {"ar_loss": ar_total / batches, "diffusion_loss": diff_total / batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--steps", type=int, default=0, help="Fixed step count (0: fill --time-budget-min).")
    parser.add_argument("--time-budget-min", type=float, default=30.0)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compute", choices=("bf16", "fp32"), default="bf16",
                        help="Matmul precision (bf16: autocast over fp32 master weights).")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="Continue from a checkpoint this script wrote (its tokenizer and weights).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    train_files, held_files = corpus_files()
    if args.init_from:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(args.init_from / "tokenizer.json"))
    else:
        tokenizer = train_tokenizer(train_files, args.vocab_size)
    config = make_config({**ARCH, "vocab_size": tokenizer.get_vocab_size(), "block_size": args.block}, "bf16", {})
    train_stream = token_stream(tokenizer, train_files, config.eos_token_id)
    held_stream = token_stream(tokenizer, held_files, config.eos_token_id)
    print(f"tokenizer {tokenizer.get_vocab_size()} ids; train {len(train_stream):,} tokens from {len(train_files)} "
          f"files, held-out {len(held_stream):,} from {len(held_files)}", flush=True)

    weights = init_weights(config, torch.Generator().manual_seed(args.seed))
    previous: dict = {}
    if args.init_from:
        from trimode.builder.checkpoint import load_checkpoint
        from trimode.builder.convert import convert_checkpoint

        loaded = convert_checkpoint(load_checkpoint(args.init_from), "fp32")
        weights = {name: loaded[name].clone().requires_grad_() for name in weights}
        previous = json.loads((args.init_from / "training.json").read_text())
    model = Transformer(config, weights)
    params = sum(t.numel() for t in weights.values())
    print(f"model: {params:,} parameters", flush=True)
    optimizer = torch.optim.AdamW(list(weights.values()), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    allowed = joint_attention_mask(args.seq_len, args.block)[None]
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    total_steps = args.steps or 10**9
    train_start = time.time()
    step = 0
    while step < total_steps:
        if not args.steps and step == 10:  # size the run to the time budget from measured speed
            per_step = (time.time() - train_start) / 10
            total_steps = max(20, int(args.time_budget_min * 60 / per_step))
            print(f"{per_step:.2f} s/step -> {total_steps} steps", flush=True)
        progress = step / max(total_steps, 1)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1)))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = windows(train_stream, args.seq_len, args.batch_size, rng)
        with compute_context(args):
            loss, ar, diff = joint_loss(model, batch, args.block, config.mask_token_id, gen, allowed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(weights.values()), 1.0)
        optimizer.step()
        step += 1
        if step % 25 == 0 or step == 1:
            rate = step * args.batch_size * args.seq_len / (time.time() - train_start)
            print(f"step {step}/{total_steps} loss {loss.item():.3f} ar {ar.item():.3f} diffusion {diff.item():.3f} "
                  f"lr {lr:.2e} {rate:.0f} tok/s", flush=True)

    train_metrics = evaluate(model, train_stream, args, allowed, config.mask_token_id)
    held_metrics = evaluate(model, held_stream, args, allowed, config.mask_token_id)
    print(f"train {train_metrics} held-out {held_metrics}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    write_safetensors(args.out / "model.safetensors", to_checkpoint(config, weights, torch.bfloat16), {"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    tokenizer.save(str(args.out / "tokenizer.json"))
    record = {"parameters": params, "steps": step + previous.get("steps", 0), "batch_size": args.batch_size,
              "seq_len": args.seq_len, "block_length": args.block, "lr": args.lr,
              "tokens_seen": step * args.batch_size * args.seq_len + previous.get("tokens_seen", 0),
              "train_tokens": len(train_stream), "held_out_tokens": len(held_stream),
              "train_files": len(train_files), "held_out_files": len(held_files),
              "train": train_metrics, "held_out": held_metrics, "threads": args.threads, "compute": args.compute,
              "wall_time_min": round((time.time() - started) / 60 + previous.get("wall_time_min", 0), 1),
              "runs": previous.get("runs", []) + [{"steps": step, "lr": args.lr, "init_from": str(args.init_from)
                                                   if args.init_from else None}],
              "seed": args.seed,
              "corpus": "Python standard library source (PSF License), test folders excluded"}
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
