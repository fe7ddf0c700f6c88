"""`generate()`: several requests submitted together to one scheduler and stepped until all are done.

Each prompt returns its generated tokens (cut after EOS), the forwards it took (prompt prefill counted once)
and its tokens per forward. `trimode generate`, `trimode bench` and the tests use it; servers submit to the
scheduler's loop instead (runtime/scheduler/loop.py).
"""

from __future__ import annotations

from .backends.step import StepEngine
from .modes.sequence import CancelCheck, SequenceResult, TokenCallback
from .request import GenerationConfig, RequestError, new_request
from .scheduler.scheduler import Scheduler, shared_scheduler


def generate(engine: StepEngine, prompts: list[list[int]], config: GenerationConfig | list[GenerationConfig],
             on_tokens: TokenCallback | None = None, is_cancelled: CancelCheck | None = None,
             scheduler: Scheduler | None = None) -> list[SequenceResult]:
    """Run requests together to completion; `on_tokens(i, ids)` streams committed tokens of prompt i in order.

    `config` may be one config for all prompts or one per prompt (any mix of modes and settings). Every
    request is validated before any runs (a RequestError names the first problem).
    """
    configs = config if isinstance(config, list) else [config] * len(prompts)
    if not prompts:
        raise RequestError("no prompt given")
    if len(configs) != len(prompts):
        raise RequestError(f"{len(configs)} configs for {len(prompts)} prompts")
    what = "prompt" if len(prompts) == 1 else "prompt {}"
    requests = [new_request(engine, p, cfg, what.format(i))
                for i, (p, cfg) in enumerate(zip(prompts, configs, strict=True))]
    scheduler = scheduler or shared_scheduler(engine)
    sequences = [scheduler.submit(request, on_tokens, is_cancelled, index=i) for i, request in enumerate(requests)]
    while not all(s.done for s in sequences):
        scheduler.step()
    return [s.result() for s in sequences]
