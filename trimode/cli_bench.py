"""`trimode bench`: measure the modes (and, with --peers, the baselines) side by side in one process."""

from __future__ import annotations

import json
import platform
import time
from datetime import date
from pathlib import Path

import click

from .cli_options import (
    apply_threads,
    cache_options,
    default_model,
    device_options,
    engine_cache_kwargs,
    parse_block_length,
)
from .runtime.request import AUTO, MODES, GenerationConfig, RequestError, new_request


def make_prompts(engine, count: int, length: int, seed: int, prompt_file: Path | None) -> list[list[int]]:
    """Prompts from a JSON list of strings (needs a tokenizer) or random ids of a fixed length."""
    import torch

    from .runtime.serving.text import load_tokenizer

    if prompt_file is not None:
        texts = json.loads(prompt_file.read_text())
        if engine.tokenizer_path is None:
            raise click.UsageError("--prompts-file needs an engine with tokenizer.json")
        tokenizer = load_tokenizer(engine.tokenizer_path)
        texts = [t if isinstance(t, str) else t["prompt"] for t in texts][:count]
        return [tokenizer.encode(t).ids for t in texts]
    gen = torch.Generator().manual_seed(seed)
    special = {engine.config.eos_token_id, engine.config.mask_token_id}
    prompts = []
    for _ in range(count):
        ids = torch.randint(0, engine.config.vocab_size, (length,), generator=gen).tolist()
        prompts.append([t if t not in special else 1 for t in ids])
    return prompts


def peer_report(model_path: Path, engine, prompts: list[list[int]], configs: dict[str, GenerationConfig],
                runs: int) -> dict:
    """transformers' generate and the dynamic-cache reference loops, one prompt at a time, vs ours."""
    from .runtime.backends.limits import EngineLimits
    from .runtime.bench.peers import DynamicCacheEngine, HFGenerate
    from .runtime.bench.runner import TimedEngine, run_once

    report: dict = {}
    engine = TimedEngine(engine)  # one proxy, so its scheduler and block-length statistics persist across calls
    new_tokens = configs["ar"].max_new_tokens
    if (model_path / "config.json").is_file():
        hf = HFGenerate(model_path, engine.dtype)
        hf(prompts[0], new_tokens)  # warm-up
        times, same = [], True
        for _ in range(runs):
            start = time.perf_counter()
            outs = [hf(p, new_tokens) for p in prompts]
            times.append(time.perf_counter() - start)
        ours = [run_once(engine, [p], configs["ar"])["outputs"][0] for p in prompts]
        same = all(o[: len(h)] == h[: len(o)] for o, h in zip(ours, outs, strict=True))
        report["hf_generate"] = {"tokens_per_s": round(sum(len(o) for o in outs) / sorted(times)[len(times) // 2], 2),
                                 "greedy_tokens_match_ours": same}
    if not hasattr(engine, "model"):  # graph backends (onnx, tensorrt) hold no torch model to share
        report["reference_loops"] = "skipped: the reference-style loops need a torch engine or a checkpoint"
        return report
    dynamic = TimedEngine(DynamicCacheEngine(engine.model, EngineLimits(1, engine.limits.max_seq_len),
                                             engine.tokenizer_path))
    for name, config in configs.items():
        ours_t, theirs_t = [], []
        for _ in range(runs):
            for target, sink in ((engine, ours_t), (dynamic, theirs_t)):
                start = time.perf_counter()
                tokens = sum(len(run_once(target, [p], config)["outputs"][0]) for p in prompts)
                sink.append(tokens / (time.perf_counter() - start))
        ours_med, theirs_med = sorted(ours_t)[runs // 2], sorted(theirs_t)[runs // 2]
        report[f"reference_loops_{name}"] = {"tokens_per_s": round(theirs_med, 2),
                                             "ours_batch1_tokens_per_s": round(ours_med, 2),
                                             "ratio_ours_over_reference": round(ours_med / theirs_med, 3)}
    if "hf_generate" in report:
        base = report["hf_generate"]["tokens_per_s"]
        for name in configs:
            report[f"ours_{name}_over_hf_generate"] = round(
                report[f"reference_loops_{name}"]["ours_batch1_tokens_per_s"] / base, 3)
    return report


def print_table(report: dict) -> None:
    header = (f"{'mode':<16}{'tokens':>8}{'fwd':>7}{'tok/fwd':>9}{'tok/s':>10}{'x AR':>7}{'TTFT ms':>10}"
              "  step ms (median/p90)")
    click.echo(header)
    for name, row in report["modes"].items():
        steps = ", ".join(f"{k} {v['median']:.2f}/{v['p90']:.2f}" for k, v in row["step_latency_ms"].items())
        click.echo(f"{name:<16}{row['tokens']:>8}{row['forwards']:>7}{row['tokens_per_forward']:>9.2f}"
                   f"{row['tokens_per_s']:>10.1f}{row.get('speedup_vs_ar') or 0:>7.2f}{row['ttft_ms']:>10.2f}  {steps}")


def engine_quantization(path: Path) -> dict | None:
    """The engine's quantization scheme as its manifest records it (None: unquantized, or a checkpoint)."""
    from .builder.manifest import MANIFEST_FILE, read_manifest

    if not (path / MANIFEST_FILE).is_file():
        return None
    quant = read_manifest(path).quantization
    return None if quant is None else quant.to_json()


@click.command("bench")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Engine or checkpoint directory (default: the shipped demo model).")
@click.option("--modes", default="ar,diffusion,spec,quad", show_default=True,
              help="Comma-separated modes to compare.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Prompts per batch.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None,
              help="Prompts per run, in groups of --batch-size (default: one batch).")
@click.option("--prompt-length", type=click.IntRange(min=1), default=32, show_default=True,
              help="Length of random prompts.")
@click.option("--prompts-file", type=click.Path(exists=True, path_type=Path), default=None,
              help="JSON list of prompt strings (or {prompt: ...}) instead of random ids.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--block-length", "block_lengths", default=None,
              help="Block length(s), comma-separated, 'auto' allowed for spec/quad, e.g. 2,4,8,auto "
                   "(default: the model's block_size). Each block mode runs once per length.")
@click.option("--threshold", type=float, default=None, help="Diffusion commit threshold.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Measured runs (median).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Serving dtype of a checkpoint (auto: the checkpoint's own, see trimode inspect); an engine "
                   "keeps its own.")
@click.option("--peers", is_flag=True, help="Also measure transformers' generate and the reference-style loops.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON report.")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Also write the JSON report here.")
@device_options
@cache_options
def bench_command(model_path: Path | None, modes: str, batch_size: int, num_prompts: int | None, prompt_length: int,
                  prompts_file: Path | None, max_new_tokens: int, block_lengths: str | None,
                  threshold: float | None, runs: int, warmup: int, dtype: str, peers: bool, seed: int,
                  as_json: bool, output: Path | None, device: str, threads: int, kv_cache_memory: str | None,
                  page_size: int | None, prefix_cache: bool) -> None:
    """Measure forwards, tokens/forward, tokens/s, time to first token and step latency per mode."""
    import torch

    from .runtime.backends.engine_loader import open_engine
    from .runtime.bench.runner import bench_modes

    model_path = model_path or default_model()
    if model_path is None:
        raise click.UsageError("no --model given and no demo model is installed")
    names = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise click.UsageError(f"unknown mode(s) {', '.join(unknown)} (choose from {', '.join(MODES)})")
    apply_threads(threads)
    engine = open_engine(model_path, dtype=dtype, device=device,
                         **engine_cache_kwargs(kv_cache_memory, page_size, prefix_cache))
    lengths = [parse_block_length(v.strip()) for v in (block_lengths or "").split(",") if v.strip()] or \
        [engine.config.block_size]
    length = next((v for v in lengths if v != AUTO), engine.config.block_size)
    new_tokens = -(-max_new_tokens // length) * length  # diffusion needs whole blocks; same budget for all
    configs: dict[str, GenerationConfig] = {}
    for m in names:
        for value in lengths if m != "ar" else [length]:
            if value == AUTO and m not in ("spec", "quad") or m == "diffusion" and new_tokens % value:
                continue
            name = m if len(lengths) == 1 or m == "ar" else f"{m}@{value}"
            configs[name] = GenerationConfig(mode=m, max_new_tokens=new_tokens, block_length=value,
                                             threshold=threshold if m == "diffusion" else None)
    prompts = make_prompts(engine, num_prompts or batch_size, prompt_length, seed, prompts_file)
    for config in configs.values():
        try:
            for number, prompt in enumerate(prompts):
                new_request(engine, prompt, config, f"prompt {number}")
        except RequestError as exc:
            raise click.UsageError(str(exc)) from None
    report = {
        "model": str(model_path), "date": date.today().isoformat(), "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "device": str(getattr(engine, "device", "cpu")), "dtype": str(getattr(engine, "dtype", dtype)),
        "quantization": engine_quantization(Path(model_path)), "batch_size": batch_size,
        "prompt_lengths": [len(p) for p in prompts], "max_new_tokens": new_tokens,
        "block_lengths": lengths,
        "runs": runs, "warmup": warmup,
        "modes": bench_modes(engine, prompts, configs, runs=runs, warmup=warmup, batch_size=batch_size),
    }
    if peers:
        if "ar" not in configs:
            configs = {"ar": GenerationConfig(mode="ar", max_new_tokens=new_tokens, block_length=length), **configs}
        report["peers"] = peer_report(Path(model_path), engine, prompts, configs, runs)
    text = json.dumps(report, indent=2)
    if output:
        output.write_text(text + "\n")
    if not as_json:
        print_table(report)
    click.echo(text)


COMMANDS = [bench_command]
