"""Spawn a few gloo ranks on 127.0.0.1 for a test, with timeouts everywhere.

`run_distributed(fn, world_size, *args)` starts `world_size` processes (spawn), each
initialises gloo on a free local port with a collective timeout, calls
`fn(rank, world_size, *args)` and sends back its return value or its traceback. The
parent waits at most `timeout_s`; on timeout it kills the ranks it started and fails.
A rank that raises does not fail the helper by itself: `RankResult.error` holds the
exception's type name and message, so tests can check that *every* rank raised.
`fn` must be a module-level function (spawn pickles it by name).
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RankResult:
    rank: int
    value: Any = None
    error: str | None = None  # "TypeName: message" when fn raised
    traceback: str | None = None


def _worker(
    rank: int,
    world_size: int,
    port: int,
    collective_timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    try:
        value = fn(rank, world_size, *args)
        results.put(RankResult(rank, value=value))
    except Exception as exc:  # reported to the parent, which decides what it means
        results.put(
            RankResult(rank, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        )
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
) -> list[RankResult]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, collective_timeout_s, fn, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, RankResult] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    try:
        while len(collected) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise TimeoutError(
                    f"ranks {sorted(set(range(world_size)) - set(collected))} did not finish "
                    f"within {timeout_s}s"
                )
            try:
                result = results.get(timeout=min(left, 1.0))
                collected[result.rank] = result
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and len(collected) < world_size:
                    missing = sorted(set(range(world_size)) - set(collected))
                    raise RuntimeError(
                        f"a rank exited with code {dead[0].exitcode} before reporting; "
                        f"missing ranks {missing}"
                    ) from None
        for proc in procs:
            proc.join(timeout=max(1.0, (deadline - datetime.datetime.now()).total_seconds()))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return [collected[rank] for rank in range(world_size)]


def values_or_raise(results: list[RankResult]) -> list[Any]:
    """The per-rank values, or an AssertionError with every failing rank's traceback."""
    failures = [r for r in results if r.error is not None]
    if failures:
        raise AssertionError(
            "\n".join(f"--- rank {r.rank}: {r.error}\n{r.traceback}" for r in failures)
        )
    return [r.value for r in results]
