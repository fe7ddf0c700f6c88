"""Self-speculation at temperature > 0 is exact AR sampling: a statistical test that can fail.

On a tiny random checkpoint with a 16-token vocabulary (head sharpened so drafts are sometimes accepted),
the distribution of the first K generated tokens is computed exactly from the plain dense network (no cache,
every prefix enumerated, the causal mask built here) and compared with the tokens AR and self-speculation
sample over many fixed seeds, by a chi-square test. Seeds are fixed, so the test is deterministic; the
threshold is the chi-square quantile at p = 1e-3, so correct sampling passes with margin, and a verify pass
that picks the argmax fails by orders of magnitude (`test_the_statistic_rejects_a_greedy_verify`).

The mask token id is chosen as one the model never ranks in its top 6 for the first K - 1 tokens, so with
top_k = 6 a sampled mask id never opens a block (that case has its own deterministic test in test_modes.py,
`test_spec_keeps_a_mask_token_the_verifier_chose`) and these tests see sampling alone.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trimode.builder.checkpoint import load_checkpoint
from trimode.builder.convert import convert_checkpoint
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.generate import generate
from trimode.runtime.model.network import Transformer
from trimode.runtime.request import GenerationConfig

from .conftest import build_checkpoint

VOCAB, BOS, EOS, MASK = 16, 1, 14, 4
PROMPT = [BOS, 2, 3]
K = 3            # tokens compared (joint distribution of the first K)
TOP_K = 6        # MASK is never among the top 6 for the first K - 1 tokens (asserted in `exact_distribution`)
SAMPLES = 4096   # seeds per case
BATCH = 256      # sequences per generate() call, each with its own seed
HEAD_SCALE = 3.0  # sharper distributions: top token ~0.4, so drafts are accepted now and then
Z_1E3 = 3.090    # standard normal quantile at 1 - 1e-3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = build_checkpoint(tmp_path_factory.mktemp("small_vocab") / "c", seed=0, vocab_size=VOCAB,
                            bos_token_id=BOS, eos_token_id=EOS, mask_token_id=MASK)
    weights = load_file(root / "model.safetensors")
    weights["diffusion_head.weight"] = weights["diffusion_head.weight"] * HEAD_SCALE
    save_file(weights, root / "model.safetensors")
    return root


@pytest.fixture(scope="module")
def engine(checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend (several times slower on 2 cores)
    try:
        yield engine_from_checkpoint(checkpoint, dtype="fp32", max_batch_size=BATCH)
    finally:
        torch.set_num_threads(threads)


def top_k_filter(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    if not top_k:
        return probs
    kth = probs.topk(top_k, dim=-1).values[..., -1:]
    kept = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    return kept / kept.sum(-1, keepdim=True)


def exact_distribution(checkpoint: Path, temperature: float, top_k: int = 0) -> dict[tuple[int, ...], float]:
    """P(first K tokens) under AR sampling, from the dense network (causal mask built here, no cache).
    EOS ends a sequence, so a tuple is shorter than K when it ends with EOS."""
    ckpt = load_checkpoint(checkpoint, with_lora=False)
    model = Transformer(ckpt.config, convert_checkpoint(ckpt, torch.float32, use_lora=False))
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(K):
        open_ = [p for p in probs if len(p) < K and (not p or p[-1] != EOS)]
        tokens = torch.tensor([PROMPT + list(p) for p in open_])
        n = tokens.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool).tril().expand(len(open_), n, n)
        positions = torch.arange(n).expand(len(open_), n)
        with torch.no_grad():
            logits = model.forward_masked(tokens, positions, allowed)[:, -1].double()
        nxt = top_k_filter(torch.softmax(logits / temperature, dim=-1), top_k)
        for prefix, row in zip(open_, nxt, strict=True):
            base = probs.pop(prefix)
            for token in range(VOCAB):
                if row[token] > 0:
                    probs[prefix + (token,)] = base * float(row[token])
    if top_k == TOP_K:
        assert not any(MASK in cell[:-1] for cell in probs), "the premise: MASK outside the top-k support"
    return probs


def sample(engine, mode: str, temperature: float, samples: int = SAMPLES, **kw) -> Counter:
    counts: Counter = Counter()
    new_tokens = 1 if mode == "diffusion" else K
    for start in range(0, samples, BATCH):
        configs = [GenerationConfig(mode=mode, max_new_tokens=new_tokens, temperature=temperature, seed=seed,
                                    **kw)
                   for seed in range(start, start + BATCH)]
        for result in generate(engine, [PROMPT] * BATCH, configs):
            counts[tuple(result.tokens)] += 1
    return counts


def chi_square(counts: Counter, exact: dict[tuple[int, ...], float]) -> tuple[float, float]:
    """(statistic, critical value at p = 1e-3); cells expecting fewer than 5 samples are pooled into one."""
    n = sum(counts.values())
    assert set(counts) <= set(exact), f"impossible outcomes sampled: {set(counts) - set(exact)}"
    stat, cells, pooled_e, pooled_o = 0.0, 0, 0.0, 0
    for cell, p in exact.items():
        expected, observed = n * p, counts.get(cell, 0)
        if expected < 5:
            pooled_e, pooled_o = pooled_e + expected, pooled_o + observed
        else:
            stat += (observed - expected) ** 2 / expected
            cells += 1
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        cells += 1
    df = cells - 1
    critical = df * (1 - 2 / (9 * df) + Z_1E3 * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty
    return stat, critical


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (1.0, TOP_K)])
def test_ar_sampling_follows_the_model_distribution(checkpoint, engine, temperature, top_k):
    counts = sample(engine, "ar", temperature, samples=SAMPLES // 2, top_k=top_k)
    stat, critical = chi_square(counts, exact_distribution(checkpoint, temperature, top_k))
    print(f"chi-square {stat:.1f}, critical {critical:.1f}")
    assert stat < critical, (stat, critical)


@pytest.mark.parametrize("temperature,block_length,threshold", [(1.0, 2, None), (0.6, 4, 0.5)])
def test_spec_sampling_equals_ar_sampling(checkpoint, engine, temperature, block_length, threshold):
    counts = sample(engine, "spec", temperature, block_length=block_length, threshold=threshold, top_k=TOP_K)
    stat, critical = chi_square(counts, exact_distribution(checkpoint, temperature, TOP_K))
    print(f"chi-square {stat:.1f}, critical {critical:.1f}")
    assert stat < critical, (stat, critical)


@pytest.mark.parametrize("temperature,block_length", [(1.0, 2), (0.6, 3)])
def test_quad_sampling_equals_ar_sampling(checkpoint, engine, temperature, block_length):
    """Quad samples each sub-block's slot 0 from the causal distribution and keeps a draft while it equals the
    sample: the same distribution as AR (a quad that sampled greedily fails this by far)."""
    counts = sample(engine, "quad", temperature, block_length=block_length, top_k=TOP_K)
    stat, critical = chi_square(counts, exact_distribution(checkpoint, temperature, TOP_K))
    print(f"chi-square {stat:.1f}, critical {critical:.1f}")
    assert stat < critical, (stat, critical)


def test_spec_sampling_full_vocabulary(checkpoint, engine):
    counts = sample(engine, "spec", 1.0, block_length=2)
    stat, critical = chi_square(counts, exact_distribution(checkpoint, 1.0))
    print(f"chi-square {stat:.1f}, critical {critical:.1f}")
    assert stat < critical, (stat, critical)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_diffusion_seed_samples_the_causal_distribution(checkpoint, engine, temperature):
    """Diffusion's Gumbel-max in float64, exp(l) / (-log u) ** T, is a draw from softmax(l / T): its first
    token (the prefill's seed; block length 1 leaves nothing to denoise) has AR's first-token distribution."""
    counts = sample(engine, "diffusion", temperature, samples=SAMPLES // 2, block_length=1)
    first: dict[tuple[int, ...], float] = {}
    for cell, p in exact_distribution(checkpoint, temperature).items():
        first[cell[:1]] = first.get(cell[:1], 0.0) + p
    stat, critical = chi_square(Counter({cell[:1]: n for cell, n in counts.items()}), first)
    print(f"chi-square {stat:.1f}, critical {critical:.1f}")
    assert stat < critical, (stat, critical)


def test_the_statistic_rejects_a_greedy_verify(checkpoint, engine, monkeypatch):
    """The test's power: the same statistic on a self-speculation whose verify pass takes the argmax."""
    from trimode.runtime.modes import spec
    from trimode.runtime.sampler import ARGMAX, Pick

    original = spec.SpecMode.plan_decode

    def greedy_verify(self, seq):
        plan = original(self, seq)
        if plan.row.write:  # the verify row
            plan.pick = Pick(ARGMAX)
        return plan

    monkeypatch.setattr(spec.SpecMode, "plan_decode", greedy_verify)
    counts = sample(engine, "spec", 1.0, samples=1024, block_length=2, top_k=TOP_K)
    stat, critical = chi_square(counts, exact_distribution(checkpoint, 1.0, TOP_K))
    print(f"chi-square {stat:.1f}, critical {critical:.1f}")
    assert stat > 10 * critical, (stat, critical)
