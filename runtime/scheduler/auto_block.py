"""`--block-length auto` for spec and quad: the block length with the most tokens per second on THIS engine.

Greedy output does not depend on the block length (both modes are AR-exact) and sampled output keeps AR's
distribution; only forwards and time do. The choice weighs two things, both kept in a cache file outside the
engine directory (`$TRIMODE_CACHE_DIR`, default `~/.cache/trimode/auto_block.json`) so a new process starts
from what earlier ones learned instead of calibrating again:

* **cost per round**, measured once per (engine, device, torch threads): the time of a scratch forward of the
  rows a round runs, after a cached prefix - spec: a draft and a verify of L tokens; quad: one chunk of
  L(L+1) tokens; L = 1 is plain AR (one causal token). Scratch forwards run on pages taken from the
  allocator and given back at once, so no running request is touched;
* **tokens per round**: a round emits 1 + (accepted drafts). Drafts are accepted left to right, so the
  expected count at block length L is 1 + sum over k < L of s_1 * ... * s_k, where s_i is the estimated
  probability that draft i is accepted given draft i-1 was. Every verified round on the engine updates
  per-position counts (reached, accepted), kept per (engine, mode, greedy or sampled); each s_i starts from a
  prior (PRIOR_GREEDY 0.85, the published models accept most drafts; PRIOR_SAMPLED 0.5) worth PRIOR_WEIGHT
  rounds, and positions no round reached yet take the last estimated one.

The chosen L maximises expected tokens per round / cost per round over CANDIDATES (those the engine serves).
L = 1 means AR: spec at L = 1 has no draft slot (one causal token per forward, exactly AR), and quad at L = 1
verifies one token per forward; `auto` picks it where drafts are rarely accepted (sampling). The choice is made
per request at submission and reported with its result.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...plugins.masks import BIDIRECTIONAL, CAUSAL, QUAD
from ..backends.step import ChunkRow
from ..cache.pool import KVCache
from ..errors import CapacityError

CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16)
PRIOR_GREEDY = 0.85
PRIOR_SAMPLED = 0.5
PRIOR_WEIGHT = 4.0
CALIBRATION_PREFIX = 64   # cached tokens behind each timed row
REPEATS = 5               # timed forwards per candidate (the median counts), after one warm-up
SAVE_EVERY_ROUNDS = 64    # acceptance counts are written back at most this often (and at exit)


def cache_file() -> Path:
    root = os.environ.get("TRIMODE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "trimode")
    return Path(root) / "auto_block.json"


@dataclass
class Acceptance:
    """Per draft position i >= 1: rounds that reached it and rounds that accepted it."""

    reached: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def record(self, block_length: int, drafts_accepted: int) -> None:
        last = min(drafts_accepted + 1, block_length - 1)  # the first rejected position was reached too
        while len(self.reached) < last:
            self.reached.append(0.0)
            self.accepted.append(0.0)
        for i in range(last):
            self.reached[i] += 1
            if i < drafts_accepted:
                self.accepted[i] += 1

    def survival(self, positions: int, prior: float) -> list[float]:
        """s_1 .. s_positions (see the module docstring)."""
        out: list[float] = []
        for i in range(positions):
            if i < len(self.reached) and self.reached[i] > 0:
                out.append((self.accepted[i] + prior * PRIOR_WEIGHT) / (self.reached[i] + PRIOR_WEIGHT))
            else:
                out.append(out[-1] if out else prior)
        return out

    def expected_tokens(self, block_length: int, prior: float) -> float:
        total, alive = 1.0, 1.0
        for s in self.survival(block_length - 1, prior):
            alive *= s
            total += alive
        return total


@dataclass(eq=False)
class EngineStats:
    """What `auto` knows about one engine: round costs on this device and acceptance per (mode, sampling)."""

    identity: str
    device_key: str
    costs: dict[str, float] = field(default_factory=dict)  # "spec:8" -> seconds per round
    acceptance: dict[str, Acceptance] = field(default_factory=dict)  # "spec:greedy" -> counts
    rounds_since_save: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accept(self, mode: str, sampled: bool) -> Acceptance:
        return self.acceptance.setdefault(f"{mode}:{'sampled' if sampled else 'greedy'}", Acceptance())

    def recorder(self, mode: str, sampled: bool):
        """The callback a spec/quad mode calls after each verified round."""
        def record(block_length: int, drafts_accepted: int) -> None:
            with self.lock:
                self.accept(mode, sampled).record(block_length, drafts_accepted)
                self.rounds_since_save += 1
                if self.rounds_since_save >= SAVE_EVERY_ROUNDS:
                    self.save()
        return record

    # -- the cache file -------------------------------------------------------------------------------
    def load(self) -> None:
        data = _read(cache_file())
        engine = data.get("engines", {}).get(self.identity, {})
        self.costs.update(engine.get("costs", {}).get(self.device_key, {}))
        for key, counts in engine.get("acceptance", {}).items():
            self.acceptance[key] = Acceptance(list(counts.get("reached", [])), list(counts.get("accepted", [])))

    def save(self) -> None:
        """Merge this engine's numbers into the cache file (atomic rename; a failure only loses the cache)."""
        self.rounds_since_save = 0
        if not self.identity:
            return
        path = cache_file()
        try:
            data = _read(path)
            engine = data.setdefault("engines", {}).setdefault(self.identity, {})
            engine.setdefault("costs", {})[self.device_key] = dict(self.costs)
            engine["acceptance"] = {k: {"reached": v.reached, "accepted": v.accepted}
                                    for k, v in self.acceptance.items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(json.dumps(data, sort_keys=True))
            scratch.replace(path)
        except OSError:
            pass


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LIVE: weakref.WeakSet = weakref.WeakSet()


def device_key(engine) -> str:
    return f"{engine.device}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def stats_for(engine) -> EngineStats:
    """The engine's statistics, loaded from the cache file on first use (per engine and thread count)."""
    stats = _STATS.get(engine)
    key = device_key(engine)
    if stats is None or stats.device_key != key:
        stats = EngineStats(getattr(engine, "cache_identity", ""), key)
        if stats.identity:
            stats.load()
        try:
            _STATS[engine] = stats
        except TypeError:
            pass
        _LIVE.add(stats)
    return stats


def save_all() -> None:
    """Write every engine's acceptance counts back (at exit; tests call it too)."""
    for stats in list(_LIVE):
        with stats.lock:
            if stats.rounds_since_save:
                stats.save()


atexit.register(save_all)


def candidates(limits, mode: str = "spec", max_row_tokens: int | None = None) -> list[int]:
    """The block lengths `auto` may pick on an engine (a TensorRT engine serves only its built ones, a server
    only those whose rows fit its --max-row-tokens; L = 1, plain AR, always)."""
    built = limits.block_lengths
    def fits(length: int) -> bool:
        width = length * (length + 1) if mode == "quad" else length
        return max_row_tokens is None or width <= max_row_tokens

    return [c for c in CANDIDATES if c == 1 or ((not built or c in built) and fits(c))]


def largest_candidate(limits, mode: str = "spec", max_row_tokens: int | None = None) -> int:
    """The longest block `auto` may pick (what capacity checks must allow for)."""
    return max(candidates(limits, mode, max_row_tokens))


def _timed(engine, cache: KVCache, rows: list[ChunkRow]) -> float:
    """Median seconds of a scratch forward of `rows` after a cached prefix (see the module docstring)."""
    from .scheduler import run_scratch

    times = [run_scratch(engine, cache, rows, CALIBRATION_PREFIX) for _ in range(REPEATS + 1)][1:]
    return sorted(times)[len(times) // 2]


def round_rows(engine, mode: str, length: int) -> list[list[ChunkRow]]:
    """The forwards of one round at block length `length`, each a list of rows."""
    mask = engine.config.mask_token_id
    offsets = list(range(length))
    if length == 1:
        return [[ChunkRow([5], CAUSAL, write=True, logit_offsets=[0])]]
    if mode == "spec":
        return [[ChunkRow([5] + [mask] * (length - 1), BIDIRECTIONAL, lora=engine.has_lora, logit_offsets=offsets)],
                [ChunkRow([5] * length, CAUSAL, write=True, logit_offsets=offsets)]]
    from ..modes.quad import quad_layout, quad_logit_offsets

    tokens, positions = quad_layout(CALIBRATION_PREFIX, [5] * length, mask)
    return [[ChunkRow(tokens, QUAD, mask_param=length, write=True, logit_offsets=quad_logit_offsets(length, False),
                      positions=positions)]]


def round_cost(engine, cache: KVCache, mode: str, length: int) -> float:
    """Seconds per round of `mode` at `length` on this engine (measured once, then kept)."""
    stats = stats_for(engine)
    key = f"{mode}:{length}" if length > 1 else "ar:1"
    if key not in stats.costs:
        stats.costs[key] = sum(_timed(engine, cache, rows) for rows in round_rows(engine, mode, length))
        stats.save()
    return stats.costs[key]


def choose_block_length(engine, mode: str, cache: KVCache, sampled: bool, max_row_tokens: int | None = None) -> int:
    """The candidate L with the highest expected tokens per second (see the module docstring)."""
    stats = stats_for(engine)
    acceptance = stats.accept(mode, sampled)
    prior = PRIOR_SAMPLED if sampled else PRIOR_GREEDY
    best, best_rate = None, -1.0
    for length in candidates(engine.limits, mode, max_row_tokens):
        try:
            cost = round_cost(engine, cache, mode, length)
        except CapacityError:  # no scratch pages free right now: only what was measured before counts
            continue
        rate = acceptance.expected_tokens(length, prior) / cost
        if rate > best_rate:
            best, best_rate = length, rate
    if best is None:  # nothing could be measured (the pool is full right now): the model's own block size
        from ..request import default_block_length

        return default_block_length(engine.config)
    return best
