"""Where this process runs: its rank, device, backend, topology and process groups.

The launchers are the only code that reads the launcher's environment (torchrun's RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; Ray's train context) and the only code that
builds a `comm.Topology` and its process groups; everything below receives them as
arguments.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from comm.topology import ProcessGroups, Topology, build_process_groups
from launch.config import Backend, CommConfig
from moe.dispatchers import Dispatcher, ExpertParallelDispatcher
from moe.transformer import DispatcherFactory
from routing import AllReduce


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the job (as the launcher tells it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is outside [0, world_size={self.world_size})")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local_rank={self.local_rank} is outside [0, {self.local_world_size})"
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_info_from_env(environ: Mapping[str, str] | None = None) -> ProcessInfo:
    """Read torchrun's variables (absent: a single process)."""
    env = os.environ if environ is None else environ

    def read(name: str, default: int) -> int:
        value = env.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

    world_size = read("WORLD_SIZE", 1)
    return ProcessInfo(
        rank=read("RANK", 0),
        world_size=world_size,
        local_rank=read("LOCAL_RANK", 0),
        local_world_size=read("LOCAL_WORLD_SIZE", world_size),
    )


def resolve_backend(backend: Backend) -> str:
    """`auto`: NCCL when CUDA is present, gloo otherwise."""
    if backend == Backend.AUTO:
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == Backend.NCCL and not torch.cuda.is_available():
        raise ValueError("comm.backend=nccl needs CUDA; this machine has none (use gloo or auto)")
    return backend.value


@dataclass(frozen=True)
class Runtime:
    """A process's resolved place: device, topology and (when distributed) its groups."""

    info: ProcessInfo
    device: torch.device
    backend: str
    topology: Topology
    groups: ProcessGroups | None
    owns_process_group: bool

    @property
    def ep_size(self) -> int:
        return self.topology.ep_size

    @property
    def ep_rank(self) -> int:
        return self.topology.ep_rank(self.info.rank)

    def sum_over_ranks(self) -> AllReduce | None:
        """A function that sums a tensor over every rank of the run (the `world` group,
        named, never the default group), moving it to the backend's device and back;
        None in a one-process run. Every rank must call it in the same order."""
        if self.groups is None or self.info.world_size == 1:
            return None
        group, device = self.groups.world, self.device

        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            buffer = tensor.to(device)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
            return buffer.to(tensor.device)

        return all_reduce


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def setup_runtime(comm: CommConfig, info: ProcessInfo, need_process_group: bool = False) -> Runtime:
    """Initialise torch.distributed (unless the launcher did, as Ray does), build the
    topology and every process group. Every rank must call this. A one-process run gets
    a process group only when `need_process_group` (DeepSpeed wants one)."""
    backend = resolve_backend(comm.backend)
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    else:
        device = torch.device("cpu")
    if info.world_size % comm.ep_size:
        raise ValueError(
            f"comm.ep_size={comm.ep_size} does not divide the world size {info.world_size}; "
            f"launch a multiple of {comm.ep_size} processes or change comm.ep_size"
        )
    ranks_per_node = comm.ranks_per_node or info.local_world_size
    topology = Topology(
        world_size=info.world_size, ranks_per_node=ranks_per_node, ep_size=comm.ep_size
    )
    if info.world_size == 1 and not need_process_group:
        return Runtime(info, device, backend, topology, None, owns_process_group=False)
    timeout = datetime.timedelta(seconds=comm.timeout_s)
    owns = not dist.is_initialized()
    if owns and info.world_size == 1:
        init_method = f"tcp://127.0.0.1:{_free_local_port()}"
        dist.init_process_group(
            backend, init_method=init_method, rank=0, world_size=1, timeout=timeout
        )
    elif owns:  # torchrun: MASTER_ADDR / MASTER_PORT in the environment (env://)
        dist.init_process_group(
            backend, rank=info.rank, world_size=info.world_size, timeout=timeout
        )
    groups = build_process_groups(topology, timeout=timeout, device=device)
    return Runtime(info, device, backend, topology, groups, owns_process_group=owns)


def teardown_runtime(runtime: Runtime) -> None:
    """Destroy the default process group if `setup_runtime` created it."""
    if runtime.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def dispatcher_factory(runtime: Runtime, comm: CommConfig) -> DispatcherFactory | None:
    """Per MoE layer, an expert-parallel dispatcher over this rank's EP group (None at
    EP=1: every expert is local). `comm.alltoall=auto` lets the dispatcher pick flat or
    hierarchical per call from comm's cost model."""
    if runtime.ep_size == 1:
        return None
    groups = runtime.groups
    assert groups is not None

    def factory(block: int, num_experts: int) -> Dispatcher:
        return ExpertParallelDispatcher(num_experts, groups, algorithm=comm.alltoall)

    return factory
