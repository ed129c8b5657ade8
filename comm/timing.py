"""Time spent in collectives, measured without adding synchronisation to the step.

CPU (gloo): host wall time around each call; gloo's `all_to_all_single` returns when
the data has arrived, so this is the collective's time including waiting for the
slowest peer. CUDA (NCCL): a pair of CUDA events on the current stream around each
call, read only when `take()` is called (one synchronisation per read, e.g. once per
logging window), so the step itself never waits on the timer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class CommTimer:
    """Accumulates seconds over `measure()` blocks until `take()` reads and resets."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.calls = 0

    @contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        self.calls += 1
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            self._seconds += time.perf_counter() - began

    def take(self) -> float:
        """Seconds accumulated since the last `take()`; resets the timer."""
        total = self._seconds
        for start, end in self._events:
            end.synchronize()
            total += start.elapsed_time(end) / 1000.0
        self._seconds, self._events, self.calls = 0.0, [], 0
        return total
