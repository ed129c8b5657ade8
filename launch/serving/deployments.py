"""The model deployment: one class, three shapes.

- a task deployment: a task subset checkpoint (only that task's experts) in the replica;
- the full model at `ep_size=1`: the whole checkpoint in the replica;
- the full model at `ep_size=N`: `EPWorkerGroup`'s N Ray actors hold the experts, the
  replica drives them in lockstep (`launch.serving.ep_workers`).

Each replica runs one `BatchLoop` (iteration-level batching: the concurrent requests of
the replica share every decode step). A request (`GenerationRequest`) becomes best_of
engine sequences per prompt, all in the loop at once; `complete` returns the best n of
each prompt's (`GenerationResult`), `stream` their pieces as they come (`ChoiceChunk`s,
then a `StreamEnd`). Every answer carries the replica's `ReplicaReport` (its engine's
telemetry) for the gateway's `/metrics`. Ray Serve gives the rest: replicas, the bound
on ongoing and queued requests, health checks (`check_health`) and replacement.

`probe=True` builds the checkpoint's architecture with one MoE layer of one expert (every
other FFN a dense MLP; random weights, nothing loaded): the benchmark measures a
replica's runtime overhead on it. One expert rather than none: the first call of the MoE
layer's custom ops imports `torch._dynamo` (about 150 MB resident), a cost of the MoE
runtime that a probe without an MoE layer never pays (docs/BENCHMARKS.md, "Serving").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from launch.serving.batching import BatchLoop, EngineShard, ReplicaUnavailable
from launch.serving.ep_workers import EPWorkerGroup
from launch.serving.model_info import describe_model, resident_bytes
from launch.serving.protocol import (
    ChoiceChunk,
    ChoiceResult,
    GenerationRequest,
    GenerationResult,
    ReplicaReport,
    StreamEnd,
)
from launch.training.compile import use_cache_dir
from moe.checkpoint import read_meta
from moe.inference import Completion, InferenceEngine, LoadedModel, load_model
from moe.inference.decode import CompileWarmup, DecodeCompileOptions
from moe.inference.engine import GeneratedToken
from moe.inference.loading import (
    cast_parameters,
    checkpoint_tokenizer,
    configs_of,
    resolve_checkpoint,
)
from moe.precision import resolve_precision
from moe.transformer import MoETransformer

_T = TypeVar("_T")


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
    precision: str = "fp32"  # weights and KV cache (moe.precision)
    compile: bool = False
    compile_warmup: str = "start"
    compile_cache_dir: str = ""
    stream_interval_s: float = 0.0
    stream_events_per_s: float = 0.0  # all streams of the replica together; 0: unbounded

    @property
    def compile_warmup_at_start(self) -> bool:
        return self.compile and self.compile_warmup == CompileWarmup.START.value

    def engine_options(self) -> dict[str, Any]:
        """The `InferenceEngine` keywords of the compiled decode step (`moe.inference.decode`);
        inductor's kernels go to `compile_cache_dir` (kept across restarts) when given."""
        if self.compile and self.compile_cache_dir:
            use_cache_dir(self.compile_cache_dir)
        return {
            "compile": self.compile,
            "compile_options": DecodeCompileOptions(warmup=CompileWarmup(self.compile_warmup)),
        }


def probe_model(checkpoint: str, precision: str = "fp32") -> LoadedModel:
    """The checkpoint's architecture with its last block's FFN an MoE layer of one expert
    (top-1, the checkpoint's router kind) and every other FFN dense; random weights,
    nothing loaded, in `precision`. A dense checkpoint stays dense. The checkpoint's
    tokenizer."""
    directory = resolve_checkpoint(checkpoint)
    meta = read_meta(directory)
    model_config, routing = configs_of(meta)
    tokenizer = checkpoint_tokenizer(directory, meta)
    resolved = resolve_precision(precision, torch.device("cpu"), key="serve.precision")
    if routing is None:
        model = MoETransformer(model_config, None).eval()
    else:
        one_expert = dataclasses.replace(
            model_config, moe_every=model_config.n_layers, expert_schedule=[1], dense_layers=[]
        )
        model = MoETransformer(one_expert, dataclasses.replace(routing, top_k=1)).eval()
    cast_parameters(model, resolved.dtype)
    return LoadedModel(
        model, directory, -1, meta["config"], None, None, tokenizer, precision=resolved
    )


class ModelServer:
    """A Ray Serve deployment class (see the module docstring)."""

    def __init__(self, spec: ModelSpec) -> None:
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.replica = uuid.uuid4().hex[:12]
        self.created = int(time.time())
        self.workers: EPWorkerGroup | None = None
        if spec.ep_size > 1:
            self.workers = EPWorkerGroup(spec)
            self.info = _merge(self.workers.descriptions)
            self.loop = BatchLoop(self.workers.step, spec.stream_events_per_s)
            return
        loaded = (
            probe_model(spec.checkpoint, spec.precision)
            if spec.probe
            else load_model(spec.checkpoint, precision=spec.precision)
        )
        engine = InferenceEngine(
            loaded.model, max_batch=spec.max_batch, task_ids=loaded.task_ids,
            tokenizer=loaded.tokenizer, **spec.engine_options(),
        )  # fmt: skip
        self.info = describe_model(loaded)
        self.info["compile"] = engine.compile_report()
        self.loop = BatchLoop(EngineShard(engine), spec.stream_events_per_s)

    def report(self) -> ReplicaReport:
        """This replica's telemetry so far (`launch.serving.metrics`)."""
        return ReplicaReport(
            self.spec.name, self.replica, self.spec.ep_size, self.loop.steps,
            self.loop.telemetry.copy(), self.loop.pending,
        )  # fmt: skip

    async def telemetry(self) -> ReplicaReport:
        """`report()` as a remote call (the gateway asks at every scrape)."""
        return self.report()

    @staticmethod
    def _result(done: Completion, index: int, prompt_index: int) -> ChoiceResult:
        return ChoiceResult(
            index=index, prompt_index=prompt_index,
            text=done.text, finish_reason=done.finish_reason,
            completion_tokens=done.completion_tokens, tokens=done.tokens, prompt_logprobs=done.prompt_logprobs,
            time_to_first_token_s=done.time_to_first_token_s,
            per_token_latency_s=done.per_token_latency_s, total_time_s=done.total_time_s,
        )  # fmt: skip

    async def _sequence(self, request: GenerationRequest, prompt: int, choice: int) -> ChoiceResult:
        params = request.params(choice, score_prompt=choice == 0)
        ids = list(request.prompts[prompt])
        async for event in self.loop.generate(ids, params, request.task):
            if event.error is not None:
                raise ValueError(event.error)
            if event.completion is not None:
                return self._result(event.completion, choice, prompt)
        raise ReplicaUnavailable("the request ended without a completion")

    async def complete(self, request: GenerationRequest) -> GenerationResult:
        """Every choice of every prompt (best_of sequences each, the best n kept: highest
        mean log-probability first), in order; a prompt's scores (echo) on each of its
        choices."""
        best_of, n = request.best_of, request.n
        results = await _all_or_none(
            [self._sequence(request, p, j) for p in range(len(request.prompts)) for j in range(best_of)]
        )  # fmt: skip
        choices = []
        for p in range(len(request.prompts)):
            mine = results[p * best_of : (p + 1) * best_of]
            scores = next((r.prompt_logprobs for r in mine if r.prompt_logprobs is not None), None)
            if best_of > n:
                mine = sorted(mine, key=lambda r: r.mean_logprob, reverse=True)[:n]
            for rank, result in enumerate(mine):
                choices.append(
                    dataclasses.replace(result, index=p * n + rank, prompt_logprobs=scores)
                )
        return GenerationResult(
            tuple(choices), tuple(len(ids) for ids in request.prompts),
            sum(len(r.tokens) for r in results), self.report(),
        )  # fmt: skip

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ChoiceChunk | StreamEnd]:
        """Every choice's pieces as they come, then a `StreamEnd`. A piece carries new
        text (a multi-byte character split across steps comes whole, in the later
        piece), the tokens sampled since the choice's last piece, and its prompt's scores
        in its first piece when echo asked (every choice scores its prompt: the stream
        does not wait for one choice to give the others theirs). Leaving the stream
        cancels every sequence in the engine."""
        if request.best_of != request.n:
            raise ValueError(f"best_of={request.best_of} != n={request.n} cannot be streamed")
        queue: asyncio.Queue[ChoiceChunk | BaseException] = asyncio.Queue()
        wants_tokens = request.logprobs is not None or request.routed_experts
        interval_s = self.spec.stream_interval_s  # a piece per interval (BatchLoop.generate)

        async def run(prompt: int, choice: int) -> None:
            index = prompt * request.n + choice
            tokens: list[GeneratedToken] = []
            params = request.params(choice, score_prompt=True)
            try:
                async for event in self.loop.generate(list(request.prompts[prompt]), params,
                                                      request.task, interval_s):  # fmt: skip
                    if event.error is not None:
                        raise ValueError(event.error)
                    tokens.extend(event.new_tokens)
                    done = event.completion
                    text = event.new_text  # the engine's text never splits a character
                    finished = None
                    if done is not None:  # its pieces carried the tokens and the scores
                        whole = self._result(done, index, prompt)
                        finished = dataclasses.replace(whole, tokens=(), prompt_logprobs=None)
                    if (
                        text
                        or finished
                        or event.prompt_logprobs is not None
                        or (tokens and wants_tokens)
                    ):
                        queue.put_nowait(ChoiceChunk(index, prompt, text, tuple(tokens),
                                                     event.prompt_logprobs, finished))  # fmt: skip
                        tokens = []
            except Exception as error:  # the stream ends with it
                queue.put_nowait(error)

        jobs = [(p, j) for p in range(len(request.prompts)) for j in range(request.n)]
        tasks = [asyncio.ensure_future(run(p, j)) for p, j in jobs]
        try:
            remaining, generated = len(tasks), 0
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished is not None:
                    remaining -= 1
                    generated += item.finished.completion_tokens
                yield item
            yield StreamEnd(tuple(len(ids) for ids in request.prompts), generated, self.report())
        finally:
            for task in tasks:
                task.cancel()

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
            "replica_pid": os.getpid(), "resident_bytes": resident, "created": self.created,
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
        # `workers` is unset when __init__ failed before it.
        workers: EPWorkerGroup | None = getattr(self, "workers", None)
        if workers is not None:
            # Ray may already be down at interpreter exit; the workers then went with it.
            with contextlib.suppress(Exception):
                workers.kill()


async def _all_or_none(jobs: list[Awaitable[_T]]) -> list[_T]:
    """Every job's result in order; when one fails, the others are cancelled (their
    sequences leave the engine) and the failure is raised."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


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
