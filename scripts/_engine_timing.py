"""The step times of the inference engine, as the benchmark scripts take them.

`engine_step_seconds` submits a batch of prompts to a fresh `moe.inference.InferenceEngine`
and steps it until every request has finished, timing each `step()`: with an engine
sized for the batch (`max_batch` >= the prompts, `max_step_tokens` >= their bytes) the
first step prefills every prompt in one packed call and each later step decodes one
token per running request. Used by `scripts/bench_generate.py` (prefill and decode
tokens/s, on validation text).

`fastest_prefill_decode` repeats it on fresh engines and keeps the fastest prefill step
and the fastest decode figure, on `random_prompts`: `scripts/calibrate_hardware.py` (the
planner's host overhead, random-weight models) and `scripts/plan_check.py` (the same
measurement on the demo checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def engine_step_seconds(
    engine: Any,
    prompts: Sequence[bytes],
    params: Any,
    task_id: int | None = None,
    before_step: Callable[[int], None] | None = None,
    check_prefill: bool = False,
    restore: bool = True,
) -> list[float]:
    """Submit every prompt to the fresh `engine` with `params` (and `task_id`) and step it
    until it has no work; wall seconds of each step (the first holds the packed prefill,
    the rest are decode steps). `before_step(i)` runs untimed before step i;
    `check_prefill` asserts that the first step served every prompt. The engine is
    restored afterwards (unless `restore` is False: an engine kept for more runs)."""
    for prompt in prompts:
        engine.submit(prompt, params, task_id)
    seconds: list[float] = []
    try:
        while engine.has_work():
            if before_step is not None:
                before_step(len(seconds))
            start = time.perf_counter()
            events = engine.step()
            seconds.append(time.perf_counter() - start)
            if check_prefill and len(seconds) == 1:
                assert len(events) == len(prompts), "the first step must prefill every request"
    finally:
        if restore:
            engine.restore()
    return seconds


def random_prompts(batch: int, prompt_len: int) -> list[bytes]:
    """`batch` prompts of `prompt_len` random printable bytes, the same for a batch size."""
    gen = torch.Generator().manual_seed(batch)
    return [
        bytes(torch.randint(32, 127, (prompt_len,), generator=gen).tolist()) for _ in range(batch)
    ]


def fastest_prefill_decode(
    new_engine: Callable[[], Any],
    prompts: Sequence[bytes],
    params: Any,
    repeats: int,
    decode: Callable[[Sequence[float]], float],
) -> tuple[float, float]:
    """Seconds of the prefill step and of a decode step: `repeats` runs of the prompts,
    each on a fresh engine from `new_engine` (`engine_step_seconds`); the fastest prefill
    step, and the smallest over the runs of `decode` (a statistic: the median, the mean)
    of each run's decode steps."""
    prefill, decode_s = [], []
    for _ in range(repeats):
        steps = engine_step_seconds(new_engine(), prompts, params)
        prefill.append(steps[0])
        decode_s.append(decode(steps[1:]))
    return min(prefill), min(decode_s)
