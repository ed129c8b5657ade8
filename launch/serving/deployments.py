"""The model deployment: one class, three shapes.

- a task deployment: a task subset checkpoint (only that task's experts) in the replica;
- the full model at `ep_size=1`: the whole checkpoint in the replica;
- the full model at `ep_size=N`: `EPWorkerGroup`'s N Ray actors hold the experts, the
  replica drives them in lockstep (`launch.serving.ep_workers`).

Each replica runs one `BatchLoop` (iteration-level batching: the concurrent requests of
the replica share every decode step). Ray Serve gives the rest: replicas, the bound on
ongoing and queued requests, health checks (`check_health`) and replacement.

`probe=True` builds the checkpoint's architecture with one MoE layer of one expert (every
other FFN a dense MLP; random weights, nothing loaded): the benchmark measures a
replica's runtime overhead on it. One expert rather than none: the first call of the MoE
layer's custom ops imports `torch._dynamo` (about 150 MB resident), a cost of the MoE
runtime that a probe without an MoE layer never pays (docs/BENCHMARKS.md, "Serving").
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from launch.serving.batching import BatchLoop, EngineShard, ReplicaUnavailable, local_step
from launch.serving.ep_workers import EPWorkerGroup
from launch.serving.model_info import describe_model, resident_bytes
from launch.training.compile import use_cache_dir
from moe.checkpoint import read_meta
from moe.inference import InferenceEngine, LoadedModel, SamplingParams, load_model
from moe.inference.decode import CompileWarmup, DecodeCompileOptions
from moe.inference.loading import configs_of, resolve_checkpoint
from moe.transformer import MoETransformer


@dataclass(frozen=True)
class ModelSpec:
    """What one model deployment serves and how (plain data: it travels to replicas)."""

    name: str
    checkpoint: str
    ep_size: int = 1
    max_batch: int = 16
    threads: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    timeout_s: float = 120.0
    probe: bool = False
    compile: bool = False
    compile_warmup: str = "start"
    compile_cache_dir: str = ""
    stream_interval_s: float = 0.0

    def engine_options(self) -> dict[str, Any]:
        """The `InferenceEngine` keywords of the compiled decode step (`moe.inference.decode`);
        inductor's kernels go to `compile_cache_dir` (kept across restarts) when given."""
        if self.compile and self.compile_cache_dir:
            use_cache_dir(self.compile_cache_dir)
        return {
            "compile": self.compile,
            "compile_options": DecodeCompileOptions(warmup=CompileWarmup(self.compile_warmup)),
        }


def probe_model(checkpoint: str) -> LoadedModel:
    """The checkpoint's architecture with its last block's FFN an MoE layer of one expert
    (top-1, the checkpoint's router kind) and every other FFN dense; random weights,
    nothing loaded. A dense checkpoint stays dense."""
    directory = resolve_checkpoint(checkpoint)
    meta = read_meta(directory)
    model_config, routing = configs_of(meta)
    if routing is None:
        return LoadedModel(MoETransformer(model_config, None).eval(), directory, -1,
                           meta["config"], None, None)  # fmt: skip
    one_expert = dataclasses.replace(
        model_config, moe_every=model_config.n_layers, expert_schedule=[1]
    )
    model = MoETransformer(one_expert, dataclasses.replace(routing, top_k=1)).eval()
    return LoadedModel(model, directory, -1, meta["config"], None, None)


class ModelServer:
    """A Ray Serve deployment class (see the module docstring)."""

    def __init__(self, spec: ModelSpec) -> None:
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.workers: EPWorkerGroup | None = None
        if spec.ep_size > 1:
            self.workers = EPWorkerGroup(spec)
            self.info = _merge(self.workers.descriptions)
            self.loop = BatchLoop(self.workers.step)
            return
        loaded = probe_model(spec.checkpoint) if spec.probe else load_model(spec.checkpoint)
        engine = InferenceEngine(
            loaded.model, max_batch=spec.max_batch, task_ids=loaded.task_ids,
            **spec.engine_options(),
        )  # fmt: skip
        self.info = describe_model(loaded)
        self.info["compile"] = engine.compile_report()
        self.loop = BatchLoop(local_step(EngineShard(engine)))

    @staticmethod
    def _params(fields: dict[str, Any]) -> SamplingParams:
        return SamplingParams(
            max_tokens=fields["max_tokens"], temperature=fields["temperature"],
            top_p=fields["top_p"], stop=tuple(fields["stop"]), seed=fields["seed"],
        )  # fmt: skip

    async def complete(self, fields: dict[str, Any]) -> dict[str, Any]:
        """One whole completion: text (UTF-8, invalid bytes replaced), finish reason,
        token counts and timings."""
        params = self._params(fields)
        async for event in self.loop.generate(fields["prompt"], params, fields["task"]):
            if event.error is not None:
                raise ValueError(event.error)
            if event.completion is not None:
                done = event.completion
                return {
                    "text": done.text.decode("utf-8", errors="replace"),
                    "finish_reason": done.finish_reason,
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                    "time_to_first_token_s": done.time_to_first_token_s,
                    "total_time_s": done.total_time_s,
                }
        raise ReplicaUnavailable("the request ended without a completion")

    async def stream(self, fields: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The completion in chunks: `{"text"}` per step that shows new text, then one
        `{"text", "finish_reason", "prompt_tokens", "completion_tokens"}`. A multi-byte
        character split across steps is given whole, in the later chunk. After the
        first chunk, the text of several steps may come as one (`stream_interval_s`,
        `BatchLoop.generate`)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        params = self._params(fields)
        interval_s = self.spec.stream_interval_s
        async for event in self.loop.generate(fields["prompt"], params, fields["task"],
                                              interval_s):  # fmt: skip
            if event.error is not None:
                raise ValueError(event.error)
            done = event.completion
            text = decoder.decode(event.new_text, final=done is not None)
            if done is None:
                if text:
                    yield {"text": text}
                continue
            yield {
                "text": text, "finish_reason": done.finish_reason,
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens,
            }  # fmt: skip
            return

    async def describe(self) -> dict[str, Any]:
        """What this replica holds and its resident memory (with its workers')."""
        info = dict(self.info)
        pids = [os.getpid()]
        resident = resident_bytes()
        if self.workers is not None:
            workers = await self.workers.check(self.spec.timeout_s)
            info["workers"] = [{"pid": w["pid"], "resident_bytes": w["resident_bytes"],
                                "experts": w["experts"]} for w in workers]  # fmt: skip
            pids += [w["pid"] for w in workers]
            resident += sum(w["resident_bytes"] for w in workers)
        return {
            **info, "name": self.spec.name, "ep_size": self.spec.ep_size, "pids": pids,
            "replica_pid": os.getpid(), "resident_bytes": resident,
            "completed": self.loop.completed, "steps": self.loop.steps,
            "in_flight": self.loop.in_flight,
        }  # fmt: skip

    async def check_health(self) -> None:
        """Ray Serve's health check: the engine loop is whole and every worker answers."""
        if self.loop.broken is not None:
            raise ReplicaUnavailable(f"the engine failed: {self.loop.broken}")
        if self.workers is not None:
            await self.workers.check(min(self.spec.timeout_s, 10.0))

    async def health(self) -> dict[str, Any]:
        await self.check_health()
        return {"status": "ok", "replica_pid": os.getpid()}

    def __del__(self) -> None:
        if getattr(self, "workers", None) is not None:
            # Ray may already be down at interpreter exit; the workers then went with it.
            with contextlib.suppress(Exception):
                self.workers.kill()  # type: ignore[union-attr]


def _merge(descriptions: list[dict[str, Any]]) -> dict[str, Any]:
    """One description of an expert-parallel model from its workers': the experts of
    every rank (global ids, sorted), dense bytes once, expert bytes summed."""
    first = descriptions[0]
    experts: dict[str, list[int]] = {}
    for description in descriptions:
        for name, ids in description["experts"].items():
            experts.setdefault(name, []).extend(ids)
    expert_bytes = sum(d["expert_bytes"] for d in descriptions)
    return {
        **{k: v for k, v in first.items() if k not in ("pid", "resident_bytes")},
        "experts": {name: sorted(ids) for name, ids in experts.items()},
        "expert_bytes": expert_bytes,
        "weight_bytes": first["dense_bytes"] + expert_bytes,
    }
