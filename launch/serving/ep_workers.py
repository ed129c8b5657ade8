"""The expert-parallel full model: `ep_size` Ray actors, each holding 1/N of every MoE
layer's experts, joined by a torch.distributed group (gloo on CPU, NCCL with GPUs).

The replica that owns them (`launch.serving.deployments.ModelServer`) drives them in
lockstep: every step it sends each worker its new requests and cancellations and calls
`step` on all of them at once; each runs one step of its own engine, and the MoE layers
exchange tokens among the workers inside it (a worker with no request still calls its
layers with no tokens). A request lives on one worker (the least loaded), so the
workers' engines together batch every request of the replica.

The workers are created by the replica and share its fate: Ray kills them with it. A
dead worker fails the next step; the replica then reports unhealthy and Ray Serve
replaces it (and with it the whole worker group, on a new process group).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast

import torch
import torch.distributed as dist

from launch.config import Backend, CommConfig
from launch.runtime import ProcessInfo, dispatcher_factory, resolve_backend, setup_runtime
from launch.serving.batching import EngineShard, StepOutput, Submission
from launch.serving.model_info import describe_model, resident_bytes
from moe.inference import InferenceEngine, load_model
from moe.inference.telemetry import EngineTelemetry

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

    from launch.serving.deployments import ModelSpec

_P = ParamSpec("_P")
_R = TypeVar("_R")


# Added to the workers' set-up deadline when they compile their decode buckets at start.
COMPILE_SETUP_S = 900.0


class EPWorker:
    """One expert-parallel rank (a Ray actor; see the module docstring)."""

    def __init__(self, rank: int, spec: ModelSpec) -> None:
        torch.set_num_threads(spec.threads)
        self.rank = rank
        self.world_size = spec.ep_size
        self.spec = spec
        self.shard: EngineShard | None = None
        self.info: dict[str, Any] = {}

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it (rank 0 hosts the rendezvous)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return host, int(sock.getsockname()[1])

    def setup(self, init_method: str, timeout_s: float) -> dict[str, Any]:
        """Join the process group, load this rank's experts and warm the engine up (every
        rank together). Returns what `describe` returns."""
        backend = resolve_backend(Backend.AUTO)
        dist.init_process_group(
            backend, init_method=init_method, rank=self.rank, world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        # Each Ray worker sees its own GPU as device 0 (CUDA_VISIBLE_DEVICES).
        comm = CommConfig(ep_size=self.world_size, ranks_per_node=self.world_size,
                          backend=Backend(backend), timeout_s=timeout_s)  # fmt: skip
        runtime = setup_runtime(comm, ProcessInfo(self.rank, self.world_size, 0, 1))
        loaded = load_model(
            self.spec.checkpoint, dispatcher_factory=dispatcher_factory(runtime, comm),
            device=runtime.device, precision=self.spec.precision,
        )  # fmt: skip
        engine = InferenceEngine(
            loaded.model, max_batch=self.spec.max_batch, task_ids=loaded.task_ids,
            tokenizer=loaded.tokenizer, **self.spec.engine_options(),
        )  # fmt: skip
        self.shard = EngineShard(engine)
        self.info = describe_model(loaded)
        self.info["compile"] = engine.compile_report()
        return self.describe()

    def step(self, submissions: list[Submission], cancels: list[int]) -> StepOutput:
        assert self.shard is not None, "setup() first"
        return self.shard.step(submissions, cancels, always=True)

    def describe(self) -> dict[str, Any]:
        return {**self.info, "pid": os.getpid(), "resident_bytes": resident_bytes()}

    def ping(self) -> int:
        return os.getpid()


class RemoteMethod(Protocol[_P, _R]):
    """An actor method as a Ray actor handle offers it: `.remote(...)` runs it in the
    actor and returns a reference to its result."""

    def remote(self, *args: _P.args, **kwargs: _P.kwargs) -> ObjectRef[_R]: ...


class EPWorkerHandle(Protocol):
    """What the group calls on a worker's Ray actor handle: `EPWorker`'s methods, run in
    the actor."""

    @property
    def address(self) -> RemoteMethod[[], tuple[str, int]]: ...

    @property
    def setup(self) -> RemoteMethod[[str, float], dict[str, Any]]: ...

    @property
    def step(self) -> RemoteMethod[[list[Submission], list[int]], StepOutput]: ...

    @property
    def describe(self) -> RemoteMethod[[], dict[str, Any]]: ...


class EPWorkerGroup:
    """The replica's handle on its workers: start them, step them, check them."""

    def __init__(self, spec: ModelSpec) -> None:
        import ray

        timeout_s = spec.timeout_s
        actor = ray.remote(EPWorker).options(
            num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker, max_concurrency=2,
            max_restarts=0,
        )  # fmt: skip
        # Ray types a new actor as `ActorHandle[EPWorker] | type[EPWorker]`, whose methods
        # have a typed `.remote` only when decorated with `@ray.method`: the handles are
        # typed by what the group calls on them.
        self.workers = [
            cast(EPWorkerHandle, actor.remote(rank, spec)) for rank in range(spec.ep_size)
        ]
        host, port = ray.get(self.workers[0].address.remote(), timeout=timeout_s)
        init_method = f"tcp://{host}:{port}"
        # Compiling every bucket at start (the workers together: the all-to-all runs between
        # the compiled segments) takes minutes, not the seconds a load does.
        setup_s = timeout_s + (COMPILE_SETUP_S if spec.compile_warmup_at_start else 0.0)
        self.descriptions: list[dict[str, Any]] = ray.get(
            [w.setup.remote(init_method, timeout_s) for w in self.workers], timeout=setup_s
        )
        self.load = [0] * spec.ep_size  # requests in flight per worker
        self._worker_of: dict[int, int] = {}

    async def step(self, submissions: list[Submission], cancels: list[int]) -> StepOutput:
        per_worker_submissions: list[list[Submission]] = [[] for _ in self.workers]
        per_worker_cancels: list[list[int]] = [[] for _ in self.workers]
        for submission in submissions:
            rank = min(range(len(self.workers)), key=lambda r: self.load[r])
            self._worker_of[submission.key] = rank
            self.load[rank] += 1
            per_worker_submissions[rank].append(submission)
        for key in cancels:
            rank = self._worker_of.pop(key)
            self.load[rank] -= 1
            per_worker_cancels[rank].append(key)
        refs = [
            worker.step.remote(subs, keys)
            for worker, subs, keys in zip(self.workers, per_worker_submissions, per_worker_cancels)
        ]
        results = await asyncio.gather(*refs)
        events = [event for result in results for event in result.events]
        for event in events:
            if event.final:
                self.load[self._worker_of.pop(event.key)] -= 1
        return StepOutput(events, EngineTelemetry.of_ranks(r.telemetry for r in results))

    async def check(self, timeout_s: float) -> list[dict[str, Any]]:
        """Every worker's description; raises if one is dead or does not answer."""
        refs = [worker.describe.remote() for worker in self.workers]
        return list(await asyncio.wait_for(asyncio.gather(*refs), timeout_s))

    def kill(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(cast("ActorHandle[EPWorker]", worker))
