"""This machine's figures for a roofline, measured in the benchmark's own process.

- read bandwidth: bytes / time of `torch.sum` over an fp32 buffer of a given size (far
  larger than the last-level cache for the memory's figure; `scripts/bench_generate.py`
  also reads a buffer of a decode step's size over and over: data that stays cached);
- copy bandwidth: bytes read + written / time of a copy between two such buffers;
- matmul FLOP/s: 2 N^3 / time of an [N, N] @ [N, N] matmul (fp32, or another dtype);
- the CPU's model name (/proc/cpuinfo, else `platform`).

Each time is `statistic` over `repeats` runs after one untimed run
(`_bench_utils.timed_runs`): the median by default (`scripts/bench_generate.py`), the
fastest for `scripts/calibrate_hardware.py` (on a shared machine the least disturbed).
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from _bench_utils import timed_runs

Statistic = Callable[[Sequence[float]], float]


def read_bandwidth(
    nbytes: int, repeats: int = 9, statistic: Statistic = statistics.median
) -> float:
    """Bytes/s of `torch.sum` over an fp32 buffer of `nbytes`."""
    buffer = torch.ones(max(1, nbytes // 4))
    return buffer.nbytes / statistic(timed_runs(buffer.sum, repeats))


def copy_bandwidth(
    nbytes: int, repeats: int = 9, statistic: Statistic = statistics.median
) -> float:
    """Bytes/s moved (read + written) by a copy of an fp32 buffer of `nbytes`."""
    source, target = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    return 2 * source.nbytes / statistic(timed_runs(lambda: target.copy_(source), repeats))


def matmul_flops(
    size: int,
    repeats: int = 5,
    statistic: Statistic = statistics.median,
    dtype: torch.dtype = torch.float32,
) -> float:
    """FLOP/s of a [size, size] @ [size, size] matmul in `dtype`."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    return 2.0 * size**3 / statistic(timed_runs(lambda: a @ b, repeats))


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
