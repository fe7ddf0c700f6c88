"""`trimode generate`: run any generation mode on a checkpoint or an engine."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import click

from .cli_options import (
    apply_threads,
    cache_options,
    default_model,
    device_options,
    engine_cache_kwargs,
    parse_block_length,
    parse_ids,
)
from .runtime.request import (
    MODES,
    GenerationConfig,
    RequestDefaults,
    RequestError,
    engine_generation_defaults,
    make_config,
    new_request,
)

# -- `--chat` and the thinking budget: the OpenAI server's chat path (runtime/serving/chat_template.py) --

def chat_options(function):
    options = [
        click.option("--chat", is_flag=True,
                     help="Each --prompt is a user message, rendered with the model's chat template "
                          "(tokenizer_config.json) exactly as /v1/chat/completions does."),
        click.option("--system", default=None, help="With --chat: a system message before the user message."),
        click.option("--enable-thinking/--no-enable-thinking", default=None,
                     help="With --chat: the template's enable_thinking (default: the template's own)."),
        click.option("--max-thinking-tokens", type=click.IntRange(min=0), default=None,
                     help="Force </think> once this many tokens pass without it (needs the token in the "
                          "tokenizer)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def chat_batch(engine, tokenizer, prompts: tuple[str, ...], prompt_ids: tuple[str, ...], system: str | None,
               enable_thinking: bool | None, chat: bool) -> list[list[int]]:
    from .runtime.serving.chat_template import ChatTemplate, ChatTemplateError, chat_prompt_ids

    if not chat:
        raise click.UsageError("--system and --enable-thinking need --chat")
    if prompt_ids or tokenizer is None:
        raise click.UsageError("--chat takes --prompt texts (and a model with tokenizer.json), not --prompt-ids")
    template = ChatTemplate.from_dir(Path(engine.tokenizer_path).parent)
    if template is None:
        raise click.UsageError("--chat needs a chat_template in the model's tokenizer_config.json, and it has none")
    batch = []
    for text in prompts:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": text}]
        try:
            batch.append(chat_prompt_ids(template, tokenizer, messages, enable_thinking))
        except ChatTemplateError as exc:
            raise click.UsageError(f"chat template: {exc}") from None
    return batch


def with_thinking_budget(config: GenerationConfig, tokenizer, max_thinking_tokens: int | None) -> GenerationConfig:
    if max_thinking_tokens is None:
        return config
    from .runtime.serving.chat_template import end_think_token_id

    end_think = end_think_token_id(tokenizer)
    if end_think is None:
        raise click.UsageError("--max-thinking-tokens needs a tokenizer with a </think> token, and this one has none")
    return dataclasses.replace(config, max_thinking_tokens=max_thinking_tokens, end_think_token_id=end_think)


@click.command("generate")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Engine directory or checkpoint directory (default: the shipped demo model).")
@click.option("--mode", type=click.Choice(MODES), default="spec", show_default=True,
              help="ar: token by token; diffusion: denoise blocks; spec: self-speculation (AR-exact); quad: "
                   "draft and verify in one forward (AR-exact); infill: fill --max-new-tokens between the "
                   "prompt and --suffix.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (needs tokenizer.json); repeatable.")
@click.option("--prompt-ids", "prompt_ids", multiple=True, help="Prompt as token ids, e.g. 1,2,3; repeatable.")
@click.option("--suffix", default=None, help="Infill mode: the text after the hole (needs tokenizer.json).")
@click.option("--suffix-ids", default=None, help="Infill mode: the tokens after the hole, e.g. 4,5,6.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="Tokens to generate (infill: the length of the hole).")
@click.option("--block-length", default=None,
              help="Block length, or 'auto' for spec/quad: the fastest on this engine from measured costs and "
                   "acceptance, kept across runs (default: the model's block_size).")
@click.option("--threshold", type=float, default=None,
              help="Confidence threshold in [0, 1] (diffusion commits / draft passes).")
@click.option("--temperature", type=float, default=None,
              help="0 = greedy. Default: the model's generation_config.json, else 0.")
@click.option("--top-p", type=float, default=None,
              help="Nucleus sampling mass (1: off). Default: generation_config.json, else 1.")
@click.option("--top-k", type=int, default=None,
              help="Sample among the k likeliest (0: off). Default: generation_config.json, else 0.")
@click.option("--repetition-penalty", type=float, default=None,
              help="Divide (multiply) the positive (negative) logits of tokens already in the prompt or output "
                   "(1: off). Default: generation_config.json, else 1.")
@click.option("--presence-penalty", type=float, default=0.0, show_default=True,
              help="Subtract from the logits of tokens already generated (OpenAI's), within [-2, 2].")
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True,
              help="Subtract this times each token's count in the output so far (OpenAI's), within [-2, 2].")
@click.option("--min-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="EOS (and --stop-token-ids) are barred before this many tokens.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at EOS (generate exactly --max-new-tokens).")
@click.option("--stop-token-ids", default=None, help="Token ids that end the output (kept in it), e.g. 13,27.")
@click.option("--logprobs", type=click.IntRange(0, 20), default=None,
              help="With --json: each token's log-probability (raw model logits) and the N likeliest there.")
@click.option("--generation-config", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="auto: sampling defaults from the model's generation_config.json; none: ignore that file.")
@click.option("--ar-mix-weight", type=float, default=None,
              help="Quad mode: blend the AR logit into the first draft slot (tokens may then differ from AR).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling (temperature > 0).")
@click.option("--lora/--no-lora", default=True, show_default=True,
              help="Use the linear_spec_lora adapter in self-speculation draft passes, if present.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Serving dtype when --model is a checkpoint (auto: the checkpoint's own - config.json's dtype, "
                   "else torch_dtype, else the stored weights' - as "
                   "`trimode build` does). An engine's dtype is fixed: another value is an error.")
@click.option("--verify", is_flag=True, help="Check the SHA-256 of every engine file before loading.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with tokens, text and forwards.")
@chat_options
@device_options
@cache_options
def generate_command(model_path: Path | None, mode: str, prompts: tuple[str, ...], prompt_ids: tuple[str, ...],
                     suffix: str | None, suffix_ids: str | None, max_new_tokens: int, block_length: str | None,
                     threshold: float | None, temperature: float | None, top_p: float | None,
                     top_k: int | None, repetition_penalty: float | None, presence_penalty: float,
                     frequency_penalty: float, min_tokens: int, ignore_eos: bool, stop_token_ids: str | None,
                     logprobs: int | None, generation_config: str, ar_mix_weight: float | None, seed: int,
                     lora: bool, dtype: str, verify: bool, as_json: bool,
                     device: str, threads: int, chat: bool, system: str | None, enable_thinking: bool | None,
                     max_thinking_tokens: int | None, kv_cache_memory: str | None, page_size: int | None,
                     prefix_cache: bool) -> None:
    """Generate from prompts in any mode (ar, diffusion, spec, quad, infill); reports forwards and tokens/forward.

    The summary line reads "N tokens in S s (T tok/s); F forwards (X tok/fwd)": forwards count every forward
    the request took, the prompt's prefill as one, and tok/fwd is the generated tokens over the forwards after
    the prefill."""
    from .runtime.backends.engine_loader import open_engine
    from .runtime.generate import generate
    from .runtime.serving.text import TextAssembler, load_tokenizer

    if model_path is None:
        model_path = default_model()
        if model_path is None:
            raise click.UsageError("no --model given and no demo model is installed")
    if not prompts and not prompt_ids:
        raise click.UsageError("give at least one --prompt or --prompt-ids")
    apply_threads(threads)
    engine = open_engine(model_path, dtype=dtype, use_lora=lora, verify=verify, device=device,
                         **engine_cache_kwargs(kv_cache_memory, page_size, prefix_cache))
    tokenizer = load_tokenizer(engine.tokenizer_path)
    if prompts and tokenizer is None:
        raise click.UsageError(f"--prompt needs a tokenizer.json, and {model_path} has none (use --prompt-ids)")
    batch = [tokenizer.encode(text).ids for text in prompts] if prompts else []
    batch += [parse_ids(ids) for ids in prompt_ids]
    if chat or system is not None or enable_thinking is not None:
        batch = chat_batch(engine, tokenizer, prompts, prompt_ids, system, enable_thinking, chat)
    if suffix is not None and tokenizer is None:
        raise click.UsageError(f"--suffix needs a tokenizer.json, and {model_path} has none (use --suffix-ids)")
    suffix_tokens = tokenizer.encode(suffix).ids if suffix is not None else []
    suffix_tokens += parse_ids(suffix_ids) if suffix_ids else []
    try:
        sampling = engine_generation_defaults(engine, generation_config)
    except RequestError as exc:
        raise click.UsageError(str(exc)) from None
    config = make_config(engine.config, RequestDefaults(mode, max_new_tokens, lora, sampling), mode=mode,
                         max_new_tokens=max_new_tokens, block_length=parse_block_length(block_length),
                         threshold=threshold, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                         suffix=tuple(suffix_tokens) or None, ar_mix_weight=ar_mix_weight,
                         repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                         frequency_penalty=frequency_penalty, min_tokens=min_tokens, ignore_eos=ignore_eos,
                         stop_token_ids=tuple(parse_ids(stop_token_ids)) if stop_token_ids else None,
                         logprobs=logprobs)
    config = with_thinking_budget(config, tokenizer, max_thinking_tokens)
    try:
        for number, prompt in enumerate(batch):
            new_request(engine, prompt, config, "prompt" if len(batch) == 1 else f"prompt {number}")
    except RequestError as exc:
        raise click.UsageError(str(exc)) from None

    text = None if as_json or len(batch) != 1 or tokenizer is None or mode == "infill" else \
        TextAssembler(tokenizer.decode)

    def stream(_index: int, ids: list[int]) -> None:
        sys.stdout.write(text.add_many(ids))
        sys.stdout.flush()

    if text is not None and prompts and not chat:
        sys.stdout.write(prompts[0])
    start = time.perf_counter()
    results = generate(engine, batch, config, on_tokens=stream if text is not None else None)
    elapsed = time.perf_counter() - start
    outputs = []
    for result in results:
        entry = {**result.to_dict(), "text": tokenizer.decode(result.tokens) if tokenizer else None}
        if result.logprobs is not None:
            entry["logprobs"] = [{"token": e.token, "logprob": e.logprob, "top": [list(t) for t in e.top]}
                                 for e in result.logprobs]
        outputs.append(entry)
    if as_json:
        click.echo(json.dumps({"mode": mode, "outputs": outputs, "elapsed_s": round(elapsed, 4)}))
        return
    if text is not None:
        sys.stdout.write(text.finish())
        click.echo()
    else:
        for number, entry in enumerate(outputs):
            click.echo(f"[{number}] " + (entry["text"] if entry["text"] is not None else str(entry["tokens"])))
    total = sum(len(e["tokens"]) for e in outputs)
    forwards = ", ".join(f"{e['forwards']} forwards ({e['tokens_per_forward']:.2f} tok/fwd after the prefill)"
                         for e in outputs)
    blocks = sorted({e["block_length"] for e in outputs})
    block = f" at block length {','.join(map(str, blocks))}" if mode not in ("ar", "infill") else ""
    if block and config.block_length == "auto":
        block += " (auto)"
    click.echo(f"-- {mode}{block}: {total} tokens in {elapsed:.2f}s ({total / max(elapsed, 1e-9):.1f} tok/s); "
               f"{forwards}", err=True)


COMMANDS = [generate_command]
