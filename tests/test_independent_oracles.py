"""Every mode checked against something that is not its own code path.

* Greedy AR - and so self-speculation and quad, whose greedy tokens must be AR's - against Hugging Face
  transformers' `Ministral3ForCausalLM.generate`: its own attention, RoPE/YaRN, KV cache and decoding loop.
* Every forward every mode makes - prefills, decodes, spec drafts (a bidirectional block after a causal
  prefix, with the LoRA adapter) and verifies, diffusion denoising passes and re-encodes, quad chunks, infill
  chunks - against a recomputation with no cache at all: `Transformer.forward_masked` over everything the
  sequence holds so far plus the row's chunk, with an attention mask written out here, entry by entry, from
  what each row means (DESIGN.md section 3, plugins/reference.py's contract in words).
* Diffusion end to end against a loop written here from DESIGN.md section 3 on that dense network: blocks,
  confidences, the even-split schedule or the threshold rule, EOS, re-encodes - none of the mode code.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from trimode.builder.checkpoint import load_checkpoint
from trimode.builder.convert import convert_checkpoint
from trimode.plugins.masks import BIDIRECTIONAL, CAUSAL, PREFIX_BLOCK, QUAD
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.generate import generate
from trimode.runtime.model.network import Transformer
from trimode.runtime.request import GenerationConfig
from trimode.runtime.scheduler.scheduler import Scheduler

transformers = pytest.importorskip("transformers", minversion="5.0")

PROMPTS = [[1, 5, 6, 7], [1, *range(40, 75)], [9, 200, 3]]  # the middle one crosses YaRN's window (32)



@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return engine_from_checkpoint(tiny_checkpoint, dtype="fp32")


@pytest.fixture(scope="module")
def dense(tiny_checkpoint) -> Transformer:
    """The plain network on the checkpoint's weights, adapter included; only `forward_masked` is used."""
    ckpt = load_checkpoint(tiny_checkpoint, with_lora=True)
    weights = convert_checkpoint(ckpt, torch.float32, use_lora=True)
    return Transformer(ckpt.config, weights, ckpt.lora.scale)


@pytest.fixture(scope="module")
def hf_greedy(tiny_checkpoint):
    from .test_transformers_parity import hf_model

    model, config = hf_model(tiny_checkpoint)

    @torch.inference_mode()
    def run(prompt: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, eos_token_id=config.eos_token_id,
                             pad_token_id=config.eos_token_id)
        return out[0, len(prompt):].tolist()  # stops after EOS, like every mode

    return run


# -- tokens: transformers' greedy generation --------------------------------------------------------------
@pytest.mark.parametrize("mode,kw", [("ar", {}), ("spec", {"block_length": 4}),
                                     ("spec", {"block_length": 8, "threshold": 0.3}),
                                     ("spec", {"block_length": 4, "use_lora": False}),
                                     ("quad", {"block_length": 4})])
def test_greedy_tokens_equal_transformers_generate(engine, hf_greedy, mode, kw):
    results = generate(engine, PROMPTS, GenerationConfig(mode=mode, max_new_tokens=24, **kw))
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.tokens == hf_greedy(prompt, 24), prompt


# -- every forward: a dense recomputation without a cache --------------------------------------------------
def sees(kind: int, param: int, n: int, t: int, s: int) -> bool:
    """May chunk token t attend to chunk token s? Written from the contract's words, not its code."""
    if kind == CAUSAL:
        return s <= t
    if kind == BIDIRECTIONAL:
        return True
    if kind == QUAD:  # sub-blocks [d_j, MASK x L]: all see d_k for k <= j, masks also see their own sub-block
        width = param + 1
        (sub_t, off_t), (sub_s, off_s) = divmod(t, width), divmod(s, width)
        return (off_s == 0 and sub_s <= sub_t) or (off_t > 0 and sub_s == sub_t)
    if kind == PREFIX_BLOCK:  # causal prefix, then a tail of `param` tokens that sees the whole chunk
        return s <= t or t >= n - param
    raise AssertionError(f"unknown mask kind {kind}")


def written(kind: int, param: int, tokens: list[int]) -> list[int]:
    """The tokens a writing row leaves in the cache, in cache order."""
    if kind == CAUSAL:
        return list(tokens)
    if kind == QUAD:
        return tokens[:: param + 1][:param]
    if kind == PREFIX_BLOCK:
        return tokens[: len(tokens) - param]
    raise AssertionError(f"a row of kind {kind} cannot write")


@dataclass
class Seen:
    history: list[int]       # tokens the sequence's cache held before the row (positions 0..past-1)
    row: object              # the ChunkRow
    positions: list[int]     # the chunk's positions
    logits: torch.Tensor     # what the engine returned for the row's logit offsets


def record_steps(engine, monkeypatch) -> list[Seen]:
    """Wrap engine.step: remember each row with the cache contents it ran against and its logits. The contents
    are tracked token by token per pool position (page, offset), through each row's page table."""
    seen: list[Seen] = []
    held: dict[tuple[int, int], int] = {}
    original = engine.step

    def spy(cache, batch):
        size = cache.page_size
        logits = original(cache, batch)
        for b, (row, past, table) in enumerate(zip(batch.rows, batch.cache_lens, batch.tables, strict=True)):
            history = [held.get((table[p // size], p % size)) for p in range(past)]
            assert None not in history, "a row reads cache positions nothing wrote"
            positions = row.positions if row.positions is not None else list(range(past, past + len(row.tokens)))
            mine = logits[[m for m, owner in enumerate(batch.logit_rows) if owner == b]]
            seen.append(Seen(history, row, positions, mine.detach().clone()))
            if row.write:
                for i, token in enumerate(written(row.mask_kind, row.mask_param, list(row.tokens))):
                    held[(table[(past + i) // size], (past + i) % size)] = token
        return logits

    monkeypatch.setattr(engine, "step", spy)
    return seen


def dense_logits(model: Transformer, item: Seen) -> torch.Tensor:
    row, past = item.row, len(item.history)
    n = len(row.tokens)
    total = past + n
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for i in range(past):  # the cache: causally computed K/V of the history
        allowed[i, : i + 1] = True
    for t in range(n):
        allowed[past + t, :past] = True  # every chunk token sees every cached position
        for s in range(n):
            allowed[past + t, past + s] = sees(row.mask_kind, row.mask_param, n, t, s)
    tokens = torch.tensor([item.history + list(row.tokens)])
    positions = torch.tensor([list(range(past)) + list(item.positions)])
    lora = torch.zeros(1, total, dtype=torch.bool)
    lora[0, past:] = bool(row.lora)
    with torch.no_grad():
        out = model.forward_masked(tokens, positions, allowed[None], lora=lora)[0, past:]
    return out[row.logit_offsets]


MODES = [("ar", {}), ("spec", {"block_length": 4}), ("spec", {"block_length": 4, "threshold": 0.3}),
         ("diffusion", {"block_length": 4}), ("diffusion", {"block_length": 8, "threshold": 0.5}),
         ("quad", {"block_length": 3}), ("infill", {"suffix": (7, 8, 9)})]


@pytest.mark.parametrize("mode,kw", MODES, ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in MODES])
def test_every_forward_equals_a_dense_recomputation_without_cache(engine, dense, monkeypatch, mode, kw):
    seen = record_steps(engine, monkeypatch)
    scheduler = Scheduler(engine, cache=engine.allocate_cache())  # a fresh pool: the spy saw every page written
    config = GenerationConfig(mode=mode, max_new_tokens=8, **kw)
    generate(engine, PROMPTS, config, scheduler=scheduler)
    again = generate(engine, PROMPTS[1:2], config, scheduler=scheduler)  # its prompt's full pages are reused
    monkeypatch.undo()
    assert again[0].cached_tokens == 32
    kinds = {(s.row.mask_kind, bool(s.row.write), bool(s.row.lora)) for s in seen if s.row.logit_offsets}
    if mode == "spec":  # the draft pass with the adapter, after a causal prefix, was among them
        assert (BIDIRECTIONAL, False, True) in kinds and (CAUSAL, True, False) in kinds
    if mode == "diffusion":
        assert (BIDIRECTIONAL, False, False) in kinds and (CAUSAL, True, False) in kinds
    checked = 0
    for item in seen:
        if not item.row.logit_offsets:
            continue
        expected = dense_logits(dense, item)
        assert float((item.logits - expected).norm() / expected.norm()) < 1e-4, (item.row, len(item.history))
        assert torch.equal(item.logits.argmax(-1), expected.argmax(-1))
        checked += 1
    assert checked >= len(PROMPTS) * 2


# -- diffusion end to end: DESIGN.md section 3 written out on the dense network ----------------------------
def reference_diffusion(model: Transformer, prompt: list[int], max_new_tokens: int, length: int,
                        threshold: float | None, mask: int, eos: int) -> list[int]:
    def causal_last(tokens: list[int]) -> int:
        n = len(tokens)
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        with torch.no_grad():
            logits = model.forward_masked(torch.tensor([tokens]), torch.arange(n)[None], allowed[None])
        return int(logits[0, -1].argmax())

    def block_logits(context: list[int], block: list[int]) -> torch.Tensor:
        c, n = len(context), len(context) + len(block)
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        allowed[c:, :] = True  # the block sees the context and all of itself
        with torch.no_grad():
            return model.forward_masked(torch.tensor([context + block]), torch.arange(n)[None], allowed[None])[0, c:]

    context, out = list(prompt), []
    seed = causal_last(context)
    for _ in range(max_new_tokens // length):
        block = [seed] + [mask] * (length - 1)
        masked_count = length - 1
        schedule = [masked_count // length + (1 if i < masked_count % length else 0) for i in range(length)]
        for step in range(length):
            if mask not in block or (eos in block and mask not in block[: block.index(eos)]):
                break
            probs = torch.softmax(block_logits(context, block).double(), dim=-1)
            x0 = probs.argmax(-1).tolist()
            confidence = {i: float(probs[i, x0[i]]) for i in range(length) if block[i] == mask}
            ranked = sorted(confidence, key=lambda i: (-confidence[i], i))
            if threshold is None:
                chosen = ranked[: schedule[step]]
            else:
                chosen = [ranked[0]] + [i for i in ranked[1:] if confidence[i] >= threshold]
            for i in chosen:
                block[i] = x0[i]
        out += block
        if eos in out:
            return out[: out.index(eos) + 1]
        context += block
        seed = causal_last(context)
    return out[:max_new_tokens]


@pytest.mark.parametrize("length,threshold", [(4, None), (8, None), (8, 0.2), (4, 1.0)])
def test_diffusion_equals_a_loop_written_from_the_design(engine, dense, length, threshold):
    c = engine.config
    results = generate(engine, PROMPTS, GenerationConfig(mode="diffusion", max_new_tokens=16, block_length=length,
                                                         threshold=threshold))
    for prompt, result in zip(PROMPTS, results, strict=True):
        want = reference_diffusion(dense, prompt, 16, length, threshold, c.mask_token_id, c.eos_token_id)
        assert result.tokens == want, prompt
