"""Start a function on every rank of a process group: under torchrun, or by spawning.

The one place in `comm` that reads a launcher's environment. `run_on_ranks(worker, ...)`
initialises torch.distributed (from torchrun's `RANK`/`WORLD_SIZE`/`MASTER_*` when they
are set, else by spawning `nproc` local processes joined over 127.0.0.1), calls
`worker(device)` on every rank, and tears the group down even when the worker raises.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Worker = Callable[[torch.device], None]


def default_backend() -> str:
    """nccl where CUDA is present, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def started_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_on_ranks(
    worker: Worker, nproc: int, backend: str, threads: int = 1, timeout_s: float = 120.0
) -> None:
    """Run `worker(device)` on every rank; `nproc` is ignored under torchrun."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}; accepted: 'gloo', 'nccl'")
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be >= 1")
    if started_by_torchrun():
        _rank_main(int(os.environ["RANK"]), worker, backend, threads, timeout_s, None, 0)
        return
    port = _free_port()
    mp.start_processes(
        _rank_main,
        args=(worker, backend, threads, timeout_s, port, nproc),
        nprocs=nproc,
        start_method="spawn",
    )


def _rank_main(
    rank: int,
    worker: Worker,
    backend: str,
    threads: int,
    timeout_s: float,
    port: int | None,
    nproc: int,
) -> None:
    torch.set_num_threads(threads)
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    if port is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=nproc,
            timeout=timeout,
        )
    try:
        worker(device)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
