"""Shared helpers of the benchmark scripts: interleaved and repeated timing, peak
resident memory, and a free TCP port for a 1-rank rendezvous. (Training runs:
`_runs.py`; the inference engine's step times: `_engine_timing.py`.)

Timing: every implementation runs once per round, the rounds repeat, and the starting
implementation rotates from round to round, so slow drifts of a shared machine hit all
of them alike; the figure reported is the median over rounds.

Memory (Linux): the peak resident set size (VmHWM) of this process above a baseline.
Writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS, so a measurement
is: finish setup, free what can be freed, reset the high-water mark, run, read VmHWM.
Run one implementation per process so that nothing another one left in the allocator
hides or inflates its peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import socket
import statistics
import time
from collections.abc import Callable, Sequence

MIB = 1024 * 1024


def interleaved_times(
    steps: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 1,
    before_each: dict[str, Callable[[], None]] | None = None,
    on_round: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each step per round. `before_each[name]` runs untimed before its step
    (e.g. dropping gradients); the first `warmup` rounds are run and discarded."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if before_each is not None and name in before_each:
                before_each[name]()
            start = time.perf_counter()
            steps[name]()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
        if on_round is not None and round_index >= warmup:
            on_round()
    return times


def median_ms(seconds: Sequence[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def round_ratio_median(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median over rounds of the ratio within each round: the two ran back to back,
    so a slow spell of a shared machine hits both (steadier than a ratio of medians)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def status_kib(field: str) -> int | None:
    """`field` of /proc/self/status (VmRSS, VmHWM) in KiB; None where there is none
    (not Linux)."""
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _required_status_kib(field: str) -> int:
    kib = status_kib(field)
    assert kib is not None, f"/proc/self/status has no {field}"
    return kib


def release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc malloc_trim)."""
    gc.collect()
    # Not glibc: nothing to trim (large tensors are mmapped and unmapped on free anyway).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_above_baseline_mb(run: Callable[[], None]) -> float:
    """MiB of resident memory `run` adds at its peak over the resident set before it."""
    release_free_memory()
    baseline_kib = _required_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    run()
    return (_required_status_kib("VmHWM") - baseline_kib) * 1024 / MIB


def free_port() -> int:
    """A TCP port on localhost nobody listens on right now (for a 1-rank rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed_runs(run: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of `repeats` runs of `run`, after one untimed run (warm-up)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times
