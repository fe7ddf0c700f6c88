"""`trimode generate`: run the three generation modes on a checkpoint or an engine."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .runtime.backends.engine_loader import open_engine
from .runtime.generate import MODES, GenerationConfig, RequestError, generate, validate_request


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of token ids",
                                 param_hint="--prompt-ids") from None
    if not ids:
        raise click.BadParameter("empty list of token ids", param_hint="--prompt-ids")
    return ids


def default_model() -> Path | None:
    """The shipped demo model, used when no --model is given."""
    try:
        from .demo import demo_model_path
    except ImportError:
        return None
    return demo_model_path()


class TextStreamer:
    """Prints a single sequence's text as tokens are committed (decoding the whole so far, printing the new tail)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, index: int, new: list[int]) -> None:
        self.tokens.extend(new)
        text = self.tokenizer.decode(self.tokens)
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


@click.command("generate")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Engine directory or checkpoint directory (default: the shipped demo model).")
@click.option("--mode", type=click.Choice(MODES), default="spec", show_default=True,
              help="ar: token by token; diffusion: denoise blocks; spec: self-speculation (AR-exact).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (needs tokenizer.json); repeatable.")
@click.option("--prompt-ids", "prompt_ids", multiple=True, help="Prompt as token ids, e.g. 1,2,3; repeatable.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--block-length", type=int, default=None, help="Block length (default: the model's block_size).")
@click.option("--threshold", type=float, default=None,
              help="Confidence threshold in [0, 1] (diffusion commits / draft passes).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling (temperature > 0).")
@click.option("--lora/--no-lora", default=True, show_default=True,
              help="Use the linear_spec_lora adapter in self-speculation draft passes, if present.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Serving dtype when --model is a checkpoint.")
@click.option("--verify", is_flag=True, help="Check the SHA-256 of every engine file before loading.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with tokens, text and forwards.")
def generate_command(model_path: Path | None, mode: str, prompts: tuple[str, ...], prompt_ids: tuple[str, ...],
                     max_new_tokens: int, block_length: int | None, threshold: float | None, temperature: float,
                     seed: int, lora: bool, dtype: str, verify: bool, as_json: bool) -> None:
    """Generate from prompts in AR, diffusion or self-speculation mode; reports forwards and tokens/forward."""
    if model_path is None:
        model_path = default_model()
        if model_path is None:
            raise click.UsageError("no --model given and no demo model is installed")
    if not prompts and not prompt_ids:
        raise click.UsageError("give at least one --prompt or --prompt-ids")
    engine = open_engine(model_path, dtype=dtype, use_lora=lora, verify=verify)
    tokenizer = None
    if engine.tokenizer_path is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(engine.tokenizer_path))
    if prompts and tokenizer is None:
        raise click.UsageError(f"--prompt needs a tokenizer.json, and {model_path} has none (use --prompt-ids)")
    batch = [tokenizer.encode(text).ids for text in prompts] if prompts else []
    batch += [parse_ids(ids) for ids in prompt_ids]
    config = GenerationConfig(mode=mode, max_new_tokens=max_new_tokens,
                              block_length=block_length or engine.config.block_size, threshold=threshold,
                              temperature=temperature, seed=seed, use_lora=lora)
    try:
        validate_request(engine, batch, config)
    except RequestError as exc:
        raise click.UsageError(str(exc)) from None

    stream = None if as_json or len(batch) != 1 or tokenizer is None else TextStreamer(tokenizer)
    if stream is not None and prompts:
        sys.stdout.write(prompts[0])
    start = time.perf_counter()
    results = generate(engine, batch, config, on_tokens=stream)
    elapsed = time.perf_counter() - start
    outputs = []
    for result in results:
        entry = {"tokens": result.tokens, "text": tokenizer.decode(result.tokens) if tokenizer else None,
                 "forwards": result.forwards, "tokens_per_forward": round(result.tokens_per_forward, 4),
                 "finish_reason": result.finish_reason}
        outputs.append(entry)
    if as_json:
        click.echo(json.dumps({"mode": mode, "outputs": outputs, "elapsed_s": round(elapsed, 4)}))
        return
    if stream is not None:
        click.echo()
    else:
        for number, entry in enumerate(outputs):
            click.echo(f"[{number}] " + (entry["text"] if entry["text"] is not None else str(entry["tokens"])))
    total = sum(len(e["tokens"]) for e in outputs)
    forwards = ", ".join(f"{e['forwards']} forwards ({e['tokens_per_forward']:.2f} tok/fwd)" for e in outputs)
    click.echo(f"-- {mode}: {total} tokens in {elapsed:.2f}s ({total / max(elapsed, 1e-9):.1f} tok/s); {forwards}",
               err=True)


COMMANDS = [generate_command]
