"""One request never stalls the others beyond a stated bound, on the demo model (CPU) - measured in one process.

    python benchmarks/isolation.py [--threads 1] [--policy prefill-first]

The bound (docs/serving.md): no step carries more than `max_step_tokens` tokens and no row more than
`max_row_tokens`, and a running request gets a row at least every other step (prefill-first; every step with
decode-first). So a running request waits at most one step without a row, and the gap between two of its
forwards is at most two steps, each no longer than a full one.

1. full_step: seconds of one forward carrying `max_step_tokens` tokens (a prefill chunk after 512 cached).
2. neighbours: four ordinary requests (ar, spec, quad, diffusion; 64 new tokens) run alone, then again while
   the heaviest requests the server's limits let in arrive - quad at the widest block whose rows fit
   --max-row-tokens, an infill hole filling a row, and long prompts (prefilled in chunks). Counted: the most
   consecutive steps an ordinary request went without a row; timed: the largest gap between two of its
   commits, in longest steps of that run; and its outputs against the run alone.
3. refusals: the requests of the issue that once took the machine (quad at L = 128 and 64, an infill hole of
   2039 tokens, 500 prompts x n = 16), each refused at submission: the time to refuse and forwards run.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trimode.demo import demo_model_path  # noqa: E402
from trimode.plugins.masks import CAUSAL  # noqa: E402
from trimode.runtime.backends.engine_loader import open_engine  # noqa: E402
from trimode.runtime.backends.step import ChunkRow  # noqa: E402
from trimode.runtime.errors import RequestError  # noqa: E402
from trimode.runtime.request import GenerationConfig, new_request  # noqa: E402
from trimode.runtime.scheduler.scheduler import Scheduler, run_scratch  # noqa: E402
from trimode.runtime.serving.frontend import Frontend, ServingLimits, Settings  # noqa: E402

ROW_LIMIT = 512  # trimode serve's default --max-row-tokens
ORDINARY = [("ar", 1), ("spec", 8), ("quad", 4), ("diffusion", 16)]


def full_step_seconds(engine, tokens: int) -> float:
    """Median seconds of a forward carrying `tokens` tokens (a causal prefill chunk after 512 cached)."""
    cache = engine.cache
    row = ChunkRow(list(range(2, 2 + tokens)), CAUSAL, write=True, logit_offsets=[tokens - 1])
    return statistics.median(run_scratch(engine, cache, [row], 512) for _ in range(3))


def ordinary_requests(engine) -> list[tuple[list[int], GenerationConfig]]:
    return [([1, 30 + i, 31 + i, 32 + i, 33 + i], GenerationConfig(mode=mode, max_new_tokens=64, block_length=block))
            for i, (mode, block) in enumerate(ORDINARY)]


def heavy_requests(engine) -> list[tuple[list[int], GenerationConfig]]:
    quad_block = max(b for b in range(2, 64) if b * (b + 1) <= ROW_LIMIT)
    suffix = tuple(range(200, 216))
    return [([1, 5, 6, 7], GenerationConfig(mode="quad", max_new_tokens=256, block_length=quad_block)),
            ([1, 8, 9], GenerationConfig(mode="infill", max_new_tokens=ROW_LIMIT - len(suffix), suffix=suffix)),
            (list(range(2, 3002)), GenerationConfig(mode="ar", max_new_tokens=8)),
            (list(range(5, 4005)), GenerationConfig(mode="spec", max_new_tokens=8, block_length=8))]


def run(engine, policy: str, with_heavy: bool) -> dict:
    """The ordinary requests (and maybe the heavy ones) on one scheduler; commit times and rows per step."""
    scheduler = Scheduler(engine, policy=policy, max_row_tokens=ROW_LIMIT)
    commits: dict[int, list[float]] = {}
    ordinary = []
    for index, (prompt, config) in enumerate(ordinary_requests(engine)):
        commits[index] = []
        ordinary.append(scheduler.submit(new_request(engine, prompt, config),
                                         on_tokens=lambda _i, _t, k=index: commits[k].append(time.perf_counter())))
    heavy = []
    skipped = [0] * len(ordinary)  # consecutive steps without a row, now
    most_skipped = [0] * len(ordinary)
    step_seconds = []
    while any(not s.done for s in ordinary):
        if with_heavy and scheduler.steps == 2:  # the ordinary ones are decoding when the heavy ones arrive
            heavy = [scheduler.submit(new_request(engine, p, c)) for p, c in heavy_requests(engine)]
        rows_before = [s.forwards for s in ordinary]
        start = time.perf_counter()
        scheduler.step()
        step_seconds.append(time.perf_counter() - start)
        for k, seq in enumerate(ordinary):
            if seq.done:
                continue
            skipped[k] = 0 if seq.forwards > rows_before[k] else skipped[k] + 1
            most_skipped[k] = max(most_skipped[k], skipped[k])
    for seq in heavy:  # they are not what is measured: stop them
        seq.finish_reason = seq.finish_reason or "cancelled"
    scheduler.step()
    gaps = [max(b - a for a, b in zip(times, times[1:], strict=False)) for times in commits.values()]
    return {"tokens": [s.tokens for s in ordinary], "max_gap_s": gaps, "steps": len(step_seconds),
            "most_steps_without_a_row": most_skipped, "longest_step_s": max(step_seconds),
            "heavy": [{"mode": s.config.mode, "block_length": s.config.block_length,
                       "prompt_tokens": len(s.prompt), "tokens_done": len(s.tokens)} for s in heavy]}


def refusals(engine) -> list[dict]:
    frontend = Frontend(engine, limits=ServingLimits(ROW_LIMIT, 256, 1024))
    forwards = []
    original = engine.step
    engine.step = lambda cache, batch: (forwards.append(1), original(cache, batch))[1]
    cases = [("quad at block length 128", [[1, 2]], Settings(max_tokens=64, mode="quad", block_length=128), 1),
             ("quad at block length 64", [[1, 2]], Settings(max_tokens=64, mode="quad", block_length=64), 1),
             ("infill hole of 2039 tokens", [[1, 2]], Settings(max_tokens=2039, mode="infill", suffix="x"), 1),
             ("500 prompts x n = 16", [[1, 2]] * 500, Settings(max_tokens=4, mode="ar"), 16)]
    out = []
    try:
        for name, prompts, settings, n in cases:
            start = time.perf_counter()
            try:
                prepared = frontend.prepare(prompts, settings, n)
                for item in prepared:
                    frontend.loop.scheduler.check(item.request)
                message = None
            except RequestError as exc:
                message = str(exc)
            out.append({"request": name, "refused": message is not None, "message": message,
                        "ms": round(1e3 * (time.perf_counter() - start), 2), "forwards": len(forwards)})
    finally:
        engine.step = original
        frontend.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--policy", default="prefill-first", choices=["prefill-first", "decode-first"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = open_engine(Path(demo_model_path()), dtype="fp32", max_seq_len=8192, max_batch_size=16)
    step_tokens = engine.limits.max_step_tokens
    report = {"benchmark": "isolation", "date": date.today().isoformat(), "machine": platform.machine(),
              "threads": args.threads, "policy": args.policy, "max_step_tokens": step_tokens,
              "max_row_tokens": ROW_LIMIT,
              "command": " ".join(["python", "benchmarks/isolation.py"] + sys.argv[1:])}
    full = full_step_seconds(engine, step_tokens)
    report["full_step_s"] = round(full, 4)
    alone = run(engine, args.policy, with_heavy=False)
    crowded = run(engine, args.policy, with_heavy=True)
    report["neighbours"] = {
        "requests": [f"{mode} L={block}" for mode, block in ORDINARY],
        "most_steps_without_a_row_alone": alone["most_steps_without_a_row"],
        "most_steps_without_a_row_with_heavy": crowded["most_steps_without_a_row"],
        "max_gap_alone_s": [round(g, 4) for g in alone["max_gap_s"]],
        "max_gap_with_heavy_s": [round(g, 4) for g in crowded["max_gap_s"]],
        "longest_step_with_heavy_s": round(crowded["longest_step_s"], 4),
        "max_gap_in_longest_steps": [round(g / crowded["longest_step_s"], 3) for g in crowded["max_gap_s"]],
        "bound": "at most 1 step without a row (prefill-first; 0 with decode-first): ar and quad commit every "
                 "row, so their gap is at most 2 steps; spec commits every 2 rows (4 steps), diffusion when a "
                 "block's leading tokens settle",
        "outputs_equal_alone": sum(a == b for a, b in zip(alone["tokens"], crowded["tokens"], strict=True)),
        "heavy": crowded["heavy"], "steps_alone": alone["steps"], "steps_with_heavy": crowded["steps"]}
    report["refusals"] = refusals(engine)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
