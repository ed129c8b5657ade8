"""The measurement behind `python -m comm.bench`: cases, timing and checking.

Library code: it takes process groups that the caller made and a `Sweep` (what to run),
and returns rows; it neither parses arguments nor starts processes (`comm.spawn` and the
CLI in `comm.bench` do that). Every iteration's result is compared with the exact
expected tensor, so a wrong exchange shows up as `wrong` > 0, not as a fast time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from comm.alltoall import FlatAllToAll, HierarchicalAllToAll, exchange_counts
from comm.topology import ProcessGroups

# The element types the benchmark moves: the model's activations in fp32, and in bf16 or
# fp16 under mixed precision (half the bytes per row).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

OPS = {
    "alltoall": ["raw", "raw_alloc", "flat", "hierarchical", "memcpy"],
    "dispatch": ["raw", "flat", "hierarchical"],
    "allreduce": ["raw"],
}


@dataclass(frozen=True)
class Sweep:
    """Sizes from `min_bytes` to `max_bytes` by `factor`; per size `warmup` untimed and
    `iters` timed rounds of every case of `ops` in turn, moving `dtype` elements."""

    min_bytes: int = 1024
    max_bytes: int = 4 << 20
    factor: int = 4
    ops: tuple[str, ...] = tuple(OPS)
    iters: int = 20
    warmup: int = 5
    row_bytes: int = 1024
    skew: float = 1.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid; accepted: {', '.join(DTYPES)}")
        unknown = [op for op in self.ops if op not in OPS]
        if unknown:
            raise ValueError(f"ops: unknown {unknown}; accepted: {', '.join(OPS)}")
        if self.factor < 2 or self.min_bytes < 4 or self.max_bytes < self.min_bytes:
            raise ValueError(
                f"need factor >= 2 and 4 <= min_bytes <= max_bytes; got factor={self.factor}, "
                f"min_bytes={self.min_bytes}, max_bytes={self.max_bytes}"
            )
        if self.iters < 1 or self.warmup < 0:
            raise ValueError(f"need iters >= 1 and warmup >= 0; got {self.iters}, {self.warmup}")


@dataclass
class Case:
    """One (op, algo) at one size: `run` does the timed work and returns the result,
    `expected` is what it must equal, `reset` restores in-place inputs (not timed)."""

    op: str
    algo: str
    nbytes: int
    count: int
    run: Callable[[], torch.Tensor | None]
    expected: torch.Tensor | None
    reset: Callable[[], None] = lambda: None
    times_s: list[float] = field(default_factory=list)
    wrong: int = 0


def _pattern(
    src: int, count: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Exactly representable values that differ between source ranks: distinct integers
    in float32; in bf16/fp16 (8 and 11 significant bits) integers in [-125, 125], each
    source rank's sequence shifted (a misplaced row or chunk still shows)."""
    index = torch.arange(count, device=device, dtype=torch.int64)
    if dtype == torch.float32:
        return ((index * 7 + src * 1_000_003) % 16_777_213).to(dtype)
    return ((index * 7 + src * 61) % 251 - 125).to(dtype)


def _dispatch_counts(size: int, rows: int, skew: float, seed: int) -> torch.Tensor:
    """counts_PP[src, dst]: rows src sends to dst when each row picks one of 4 * size
    experts with Zipf popularity (expert e on rank e // 4)."""
    experts = 4 * size
    popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** skew
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(size, size, dtype=torch.int64)
    for src in range(size):
        if rows == 0:
            continue
        picks = torch.multinomial(popularity, rows, replacement=True, generator=gen)
        counts[src] = torch.bincount(picks // 4, minlength=size)
    return counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_cases(
    nbytes: int, sweep: Sweep, groups: ProcessGroups, device: torch.device
) -> list[Case]:
    """Every (op, algo) case of `sweep` at one size, with the result each must return."""
    rank, size = groups.rank, groups.topology.world_size
    cases: list[Case] = []
    dtype = DTYPES[sweep.dtype]
    itemsize = dtype.itemsize
    count = max(size, (nbytes // itemsize) // size * size)
    chunk = count // size
    split = [chunk] * size
    if "alltoall" in sweep.ops:
        x = _pattern(rank, count, device, dtype)
        expected = torch.cat(
            [
                _pattern(src, count, device, dtype)[rank * chunk : (rank + 1) * chunk]
                for src in range(size)
            ]
        )
        out = torch.empty_like(x)
        flat = FlatAllToAll(groups.ep)
        hier = HierarchicalAllToAll(groups.ep_intra, groups.ep_inter)

        def raw() -> torch.Tensor:
            dist.all_to_all_single(out, x, split, split, group=groups.ep)
            return out

        def raw_alloc() -> torch.Tensor:
            fresh = torch.empty_like(x)
            dist.all_to_all_single(fresh, x, split, split, group=groups.ep)
            return fresh

        runs: dict[str, Callable[[], torch.Tensor | None]] = {
            "raw": raw,
            "raw_alloc": raw_alloc,
            "flat": lambda: flat.exchange(x, split, split),
            "hierarchical": lambda: hier.exchange(x, split, split),
        }
        for algo, run in runs.items():
            cases.append(Case("alltoall", algo, count * itemsize, count, run, expected))
        copy_out = torch.empty_like(x)

        def memcpy() -> torch.Tensor | None:
            if rank == 0:
                copy_out.copy_(x)
                return copy_out
            return None

        cases.append(
            Case("alltoall", "memcpy", count * itemsize, count, memcpy, x if rank == 0 else None)
        )
    if "dispatch" in sweep.ops:
        row_elems = max(1, sweep.row_bytes // itemsize)
        rows = max(1, nbytes // (row_elems * itemsize))
        counts_PP = _dispatch_counts(size, rows, sweep.skew, seed=nbytes)
        x_RD = _pattern(rank, rows * row_elems, device, dtype).view(rows, row_elems)
        pieces = []
        for src in range(size):
            start = int(counts_PP[src, :rank].sum())
            src_rows = _pattern(src, rows * row_elems, device, dtype).view(rows, row_elems)
            pieces.append(src_rows[start : start + int(counts_PP[src, rank])])
        expected_rows = torch.cat(pieces)
        send_P1 = counts_PP[rank].view(size, 1).to(device)
        flat = FlatAllToAll(groups.ep)
        hier = HierarchicalAllToAll(groups.ep_intra, groups.ep_inter)

        def dispatch_raw() -> torch.Tensor:
            recv = exchange_counts(send_P1, groups.ep).view(-1).tolist()
            out = x_RD.new_empty((sum(recv), row_elems))
            dist.all_to_all_single(out, x_RD, recv, counts_PP[rank].tolist(), group=groups.ep)
            return out

        def via(algo: FlatAllToAll | HierarchicalAllToAll) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                recv = exchange_counts(send_P1, groups.ep).view(-1)
                return algo.exchange(x_RD, counts_PP[rank], recv)

            return run

        mean_bytes = rows * row_elems * itemsize
        for algo, run in {
            "raw": dispatch_raw,
            "flat": via(flat),
            "hierarchical": via(hier),
        }.items():
            cases.append(Case("dispatch", algo, mean_bytes, rows * row_elems, run, expected_rows))
    if "allreduce" in sweep.ops:
        # Small integers, so every partial sum is exact whatever the order (bf16 holds
        # integers exactly up to 256: 8 ranks of values below 32).
        modulus = 4093 if dtype == torch.float32 else 31
        source = (_pattern(rank, count, device).to(torch.float64) % modulus).to(dtype)
        buffer = source.clone()
        total = sum(_pattern(src, count, device).to(torch.float64) % modulus for src in range(size))
        assert isinstance(total, torch.Tensor)

        def allreduce() -> torch.Tensor:
            dist.all_reduce(buffer, group=groups.world)
            return buffer

        def reset() -> None:
            buffer.copy_(source)

        cases.append(
            Case("allreduce", "raw", count * itemsize, count, allreduce, total.to(dtype), reset)
        )
    return cases


def _bus_factor(op: str, size: int) -> float:
    if op == "allreduce":
        return 2 * (size - 1) / size
    if op == "memcpy":
        return 1.0
    return (size - 1) / size


def measure(sweep: Sweep, groups: ProcessGroups, device: torch.device) -> list[dict[str, object]]:
    """Run the sweep on every rank of `groups` (collective: all ranks call it); every rank
    gets the same rows: one per (op, algo, size), time = median over iterations of the
    slowest rank's time."""
    rows: list[dict[str, object]] = []
    size = groups.topology.world_size
    nbytes = sweep.min_bytes
    while nbytes <= sweep.max_bytes:
        cases = make_cases(nbytes, sweep, groups, device)
        for step in range(sweep.warmup + sweep.iters):
            for case in cases:
                case.reset()
                _sync(device)
                dist.barrier(group=groups.world)
                start = time.perf_counter()
                result = case.run()
                _sync(device)
                elapsed = time.perf_counter() - start
                if step >= sweep.warmup:
                    case.times_s.append(elapsed)
                if case.expected is not None:
                    assert result is not None
                    if result.shape != case.expected.shape:
                        case.wrong += case.expected.numel()
                    else:
                        case.wrong += int((result != case.expected).sum())
        for case in cases:
            times = torch.tensor(case.times_s, dtype=torch.float64, device=device)
            slowest = [torch.empty_like(times) for _ in range(size)]
            dist.all_gather(slowest, times, group=groups.world)
            per_iter = torch.stack(slowest).amax(0).tolist()
            wrong = torch.tensor([case.wrong], device=device)
            dist.all_reduce(wrong, group=groups.world)
            time_s = statistics.median(per_iter)
            algbw = case.nbytes / time_s / 1e9
            factor = _bus_factor("memcpy" if case.algo == "memcpy" else case.op, size)
            rows.append(
                {
                    "op": case.op,
                    "algo": case.algo,
                    "bytes": case.nbytes,
                    "count": case.count,
                    "type": sweep.dtype,
                    "time_us": time_s * 1e6,
                    "algbw_GBps": algbw,
                    "busbw_GBps": algbw * factor,
                    "wrong": int(wrong.item()),
                }
            )
        nbytes *= sweep.factor
    return rows
