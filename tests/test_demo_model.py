"""The shipped demo model and the pieces of its training recipe (examples/train_demo/).

The model tests load the checkpoint under trimode/demo_model and check that it really learned held-out code
(a random model of the same shape fails them); the recipe tests pin the joint objective's attention mask and
noising, which no end-to-end number would catch if they were subtly wrong.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trimode.builder.checkpoint import load_checkpoint
from trimode.demo import demo_model_path
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.generate import GenerationConfig, generate

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "train_demo"
sys.path.insert(0, str(RECIPE))

from objective import joint_attention_mask, joint_loss, noise_blocks  # noqa: E402
from train_lora import IGNORE, draft_attention_mask, teacher_rollout  # noqa: E402


@pytest.fixture(scope="module")
def demo() -> Path:
    path = demo_model_path()
    assert path is not None, "the demo model must ship with the package (trimode/demo_model)"
    return path


@pytest.fixture(scope="module")
def engine(demo):
    return engine_from_checkpoint(demo, dtype="fp32")


@pytest.fixture(scope="module")
def tokenizer(demo):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(demo / "tokenizer.json"))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [p["prompt"] for p in json.loads((RECIPE / "prompts.json").read_text())]


def test_demo_checkpoint_is_valid_and_tokenizer_matches(demo, tokenizer):
    ckpt = load_checkpoint(demo)
    c = ckpt.config
    assert tokenizer.get_vocab_size() == c.vocab_size
    assert tokenizer.token_to_id("<unk>") == 0
    assert tokenizer.token_to_id("<s>") == c.bos_token_id == 1
    assert tokenizer.token_to_id("</s>") == c.eos_token_id == 11
    assert tokenizer.token_to_id("<mask>") == c.mask_token_id == 100
    text = "def spam(eggs):\n    return {'ham': eggs * 2}  # \u00e9t\u00e9\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert (demo / "model.safetensors").stat().st_size < 20 * 2**20
    record = json.loads((demo / "training.json").read_text())
    assert record["held_out"]["ar_loss"] < 0.5 * math.log(c.vocab_size)


def test_held_out_loss_through_prefill_and_decode(engine, tokenizer, prompts):
    """Teacher-forced per-token loss on held-out code, token by token through the KV cache.

    Far below uniform (ln V): a random model of this shape scores about ln V, so it fails. The same loss from
    one causal pass over the whole snippet must agree, which ties the cached path to the trained weights.
    """
    ids = tokenizer.encode(prompts[4] + prompts[6]).ids[:96]
    cache = engine.new_cache(1)
    losses = []
    logits = engine.prefill(cache, [0], [ids[:8]])[0]
    for token in ids[8:]:
        losses.append(F.cross_entropy(logits, torch.tensor(token)))
        logits = engine.decode(cache, [0], [token])[0]
    stepwise = float(torch.stack(losses).mean())
    assert stepwise < 0.5 * math.log(engine.config.vocab_size)
    whole = engine.verify(engine.new_cache(1), [0], torch.tensor([ids]))[0]
    one_pass = float(F.cross_entropy(whole[7:-1], torch.tensor(ids[8:])))
    assert abs(one_pass - stepwise) < 1e-3


def test_greedy_continuation_is_code(engine, tokenizer, prompts):
    """A greedy prefill/decode loop equals the AR mode, and the model writes words, not noise.

    A 5M-parameter model still falls into loops on some prompts ("\\n#\\n#..."), so the text check is over
    the whole held-out prompt set: most continuations must be mostly letters, not runs of punctuation.
    """
    prompt = tokenizer.encode(prompts[1]).ids
    cache = engine.new_cache(1)
    logits = engine.prefill(cache, [0], [prompt])
    tokens: list[int] = []
    for _ in range(24):
        tokens.append(int(logits[0].argmax()))
        if tokens[-1] == engine.config.eos_token_id:
            break
        logits = engine.decode(cache, [0], [tokens[-1]])
    ar = generate(engine, [prompt], GenerationConfig(mode="ar", max_new_tokens=24))[0]
    assert ar.tokens == tokens
    outputs = generate(engine, [tokenizer.encode(p).ids for p in prompts], GenerationConfig(mode="ar",
                                                                                           max_new_tokens=24))
    texts = [tokenizer.decode(o.tokens) for o in outputs]
    wordy = sum(sum(ch.isalpha() for ch in text) > len(text) // 4 for text in texts)
    assert wordy >= 3 * len(texts) // 4


def test_demo_spec_is_ar_exact_and_accepts_drafts(engine, tokenizer, prompts):
    batch = [tokenizer.encode(p).ids for p in prompts[:4]]
    ar = generate(engine, batch, GenerationConfig(mode="ar", max_new_tokens=48))
    spec = generate(engine, batch, GenerationConfig(mode="spec", max_new_tokens=48,
                                                    block_length=engine.config.block_size))
    assert [s.tokens for s in spec] == [a.tokens for a in ar]
    generated = sum(len(s.tokens) for s in spec)
    forwards = sum(s.forwards - 1 for s in spec)
    # without accepted drafts a draft + verify pair yields one token (0.5 per forward)
    assert generated / forwards > 0.6


def test_prompts_come_from_held_out_files():
    from data import corpus_files

    _, held = corpus_files()
    names = {p.name for p in held}
    entries = json.loads((RECIPE / "prompts.json").read_text())
    assert len(entries) == 16
    assert all(e["file"] in names for e in entries)


def test_joint_attention_mask():
    allowed = joint_attention_mask(length=4, block=2)  # clean 0..3, noised 4..7 (blocks {4,5}, {6,7})
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],  # clean stream: causal, never sees the noised copy
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # noised block 0: itself only
        [0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1],  # noised block 1: clean block 0 (not its own clean block) and itself
        [1, 1, 0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_noising_masks_only_chosen_slots():
    tokens = torch.arange(200, 264).view(2, 32)
    noised, masked, ratio = noise_blocks(tokens, block=8, mask_id=100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noised[masked], torch.full_like(noised[masked], 100))
    assert torch.equal(noised[~masked], tokens[~masked])
    assert masked.any() and (~masked).any()
    blocks = ratio.view(2, 4, 8)
    assert torch.equal(blocks, blocks[..., :1].expand(2, 4, 8))  # one ratio per block
    assert float(ratio.min()) > 0 and float(ratio.max()) <= 1


def test_noising_rate_follows_the_ratio():
    tokens = torch.full((1, 64 * 4096), 7)
    _, masked, ratio = noise_blocks(tokens, block=4096, mask_id=100, generator=torch.Generator().manual_seed(1))
    per_block = masked.view(64, 4096).float().mean(1)
    assert torch.allclose(per_block, ratio.view(64, 4096)[:, 0], atol=0.03)


class _Recorder:
    """Stands in for the Transformer: records what joint_loss feeds it and returns fixed logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward_masked(self, tokens, positions, allowed):
        self.calls.append((tokens, positions, allowed))
        return self.logits


def test_joint_loss_streams_positions_and_targets():
    batch, length, block, vocab, mask_id = 2, 8, 4, 16, 15
    tokens = torch.randint(0, 15, (batch, length), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(batch, 2 * length, vocab, generator=torch.Generator().manual_seed(1))
    model = _Recorder(logits)
    allowed = joint_attention_mask(length, block)[None]
    total, ar, diffusion = joint_loss(model, tokens, block, mask_id, torch.Generator().manual_seed(2), allowed)
    fed, positions, _ = model.calls[0]
    assert torch.equal(fed[:, :length], tokens)  # clean copy first
    assert torch.equal(positions, torch.arange(length).repeat(batch, 2))  # both copies at 0..N-1
    _, masked, _ = noise_blocks(tokens, block, mask_id, torch.Generator().manual_seed(2))
    assert torch.equal(fed[:, length:], torch.where(masked, mask_id, tokens))
    want_ar = F.cross_entropy(logits[:, : length - 1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    noised_logits = logits[:, length:][masked]  # no shift: a masked slot predicts its own token
    want_diffusion = F.cross_entropy(noised_logits, tokens[masked])
    assert torch.allclose(ar, want_ar) and torch.allclose(diffusion, want_diffusion)
    assert torch.allclose(total, want_ar + want_diffusion)


def test_draft_attention_mask():
    allowed = draft_attention_mask(context=3, block=2)  # context 0..2 causal; block {3, 4} sees all of it
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_adapter_distillation_targets_are_the_ar_greedy_tokens(engine, tokenizer, prompts):
    """The draft adapter's targets are exactly what AR mode generates, so a matching draft is accepted."""
    prefix = tokenizer.encode(prompts[8]).ids[:20]
    block = engine.config.block_size
    inputs, targets = teacher_rollout(engine, torch.tensor([prefix]), on_policy=4, block=block)
    ar = generate(engine, [prefix], GenerationConfig(mode="ar", max_new_tokens=4 + block - 1))[0].tokens
    assert inputs[0].tolist() == prefix + ar[:4]  # context + t (the 4th greedy token)
    want = torch.tensor(ar[4:])
    valid = targets[0] != IGNORE
    assert torch.equal(targets[0][valid], want[: int(valid.sum())])
