"""Iteration-level batching inside one replica: an asyncio loop driving engine steps.

Requests arrive as coroutines (`BatchLoop.generate`); the loop keeps one list of new
submissions and one of cancellations, and between two engine steps hands both to the
step function with the next step. Every running request thus shares each model call
with every other (Orca / vLLM scheduling, `moe.inference.engine`), and a request whose
client went away is cancelled in the engine at the next step, freeing its slot.

The step function is where the engine lives: `EngineShard.step` in a thread of this
process (one replica, one engine), or the same call on every expert-parallel worker at
once (`launch.serving.ep_workers`). An error from a step fails every request in flight
and breaks the loop for good (`broken`): the replica then reports unhealthy and Ray
Serve replaces it.

Every step also returns the engine's telemetry since the previous one
(`moe.inference.telemetry`; summed over expert-parallel workers); the loop keeps the
running totals (`BatchLoop.telemetry`) that the replica reports to the gateway's
`/metrics`.

A request's events can be merged (`generate(interval_s=...)`): its first text goes out
at once, later text at most every `interval_s` (what arrived meanwhile in one event), and
its final event as soon as it exists. Every event a stream yields costs a message per hop
(replica -> gateway -> HTTP proxy) and a JSON encoding; merging keeps that cost per
interval instead of per token when steps are fast (docs/SERVING.md).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from moe.inference import Completion, InferenceEngine, SamplingParams
from moe.inference.engine import GeneratedToken
from moe.inference.sampling import TokenLogprob
from moe.inference.telemetry import EngineTelemetry


@dataclass(frozen=True)
class Submission:
    """A request as the step function sees it; `key` is the loop's request id."""

    key: int
    prompt: bytes | Sequence[int]
    params: SamplingParams
    task: int | None


@dataclass(frozen=True)
class Event:
    """What one step produced for one request: text it may show, the token it sampled,
    its prompt's scores (first event, when asked), its completion when it finished, or
    the reason the engine refused it."""

    key: int
    new_text: str
    completion: Completion | None = None
    error: str | None = None
    new_tokens: tuple[GeneratedToken, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def final(self) -> bool:
        return self.completion is not None or self.error is not None

    def then(self, later: Event) -> Event:
        """This event followed by `later` (same request) as one: the text and tokens of
        both, the later's end, the prompt's scores of whichever carries them."""
        return Event(
            self.key, self.new_text + later.new_text, later.completion, later.error,
            self.new_tokens + later.new_tokens,
            self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
        )  # fmt: skip


@dataclass(frozen=True)
class StepOutput:
    """One step: its events, and the engine's telemetry since the previous step."""

    events: list[Event]
    telemetry: EngineTelemetry = field(default_factory=EngineTelemetry)


class ReplicaUnavailable(RuntimeError):
    """The replica's engine failed (an expert-parallel worker died, say): retry later."""


class EngineShard:
    """An `InferenceEngine` addressed by the loop's request keys."""

    def __init__(self, engine: InferenceEngine) -> None:
        self.engine = engine
        self._key_of: dict[int, int] = {}  # engine request id -> key
        self._engine_id_of: dict[int, int] = {}

    def step(
        self, submissions: list[Submission], cancels: list[int], always: bool = False
    ) -> StepOutput:
        """Cancel, submit, then run one engine step (with `always`, also with no work:
        expert-parallel ranks call their MoE layers together)."""
        refused = []
        for key in cancels:
            engine_id = self._engine_id_of.pop(key, None)
            if engine_id is not None:
                self.engine.cancel(engine_id)
                del self._key_of[engine_id]
        for submission in submissions:
            try:
                engine_id = self.engine.submit(
                    submission.prompt, submission.params, submission.task
                )
            except ValueError as error:
                refused.append(Event(submission.key, "", error=str(error)))
                continue
            self._key_of[engine_id] = submission.key
            self._engine_id_of[submission.key] = engine_id
        if not (always or self.engine.has_work()):
            return StepOutput(refused, self.engine.take_telemetry())
        events = refused
        for event in self.engine.step():
            key = self._key_of[event.request_id]
            if event.completion is not None:
                del self._key_of[event.request_id]
                del self._engine_id_of[key]
            events.append(
                Event(
                    key,
                    event.new_text,
                    event.completion,
                    None,
                    event.new_tokens,
                    event.prompt_logprobs,
                )
            )
        return StepOutput(events, self.engine.take_telemetry())


StepFunction = Callable[[list[Submission], list[int]], Awaitable[StepOutput]]


def local_step(shard: EngineShard) -> StepFunction:
    """Steps of an engine in this process, in a thread so the event loop keeps serving."""

    async def step(submissions: list[Submission], cancels: list[int]) -> StepOutput:
        return await asyncio.to_thread(shard.step, submissions, cancels)

    return step


class BatchLoop:
    """The asyncio side: requests in, events out, one engine step at a time."""

    def __init__(self, step: StepFunction) -> None:
        self._step = step
        self._keys = itertools.count()
        self._queues: dict[int, asyncio.Queue[Event | BaseException]] = {}
        self._submissions: list[Submission] = []
        self._cancels: list[int] = []
        self._in_engine: set[int] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.broken: BaseException | None = None
        self.completed = 0
        self.steps = 0
        self.telemetry = EngineTelemetry()  # running totals of the engine(s)

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    @property
    def pending(self) -> int:
        """Requests handed to the loop and not yet to the engine."""
        return len(self._submissions)

    async def generate(
        self,
        prompt: bytes | Sequence[int],
        params: SamplingParams,
        task: int | None,
        interval_s: float = 0.0,
    ) -> AsyncIterator[Event]:
        """The events of one request, the last one final; with `interval_s` > 0, merged
        (see the module docstring); events already waiting are merged in any case.
        Raises `ReplicaUnavailable` when the engine fails; cancelling the consumer
        cancels the request."""
        if self.broken is not None:
            raise ReplicaUnavailable(f"this replica's engine failed: {self.broken}")
        self._start()
        assert self._wake is not None
        key = next(self._keys)
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self._queues[key] = queue
        self._submissions.append(Submission(key, prompt, params, task))
        self._wake.set()
        finished = False
        clock = asyncio.get_running_loop().time
        sent_at: float | None = None  # when the last event went out
        try:
            while True:
                event = self._checked(await queue.get())
                deadline = None if sent_at is None else sent_at + interval_s
                while not event.final and deadline is not None and clock() < deadline:
                    try:
                        later = await asyncio.wait_for(queue.get(), deadline - clock())
                    except TimeoutError:
                        break
                    event = event.then(self._checked(later))
                while not event.final and not queue.empty():
                    event = event.then(self._checked(queue.get_nowait()))
                finished = event.final
                yield event
                sent_at = clock()
                if finished:
                    return
        except ReplicaUnavailable:
            finished = True  # nothing left to cancel: the engine is gone
            raise
        finally:
            self._queues.pop(key, None)
            if not finished:  # the consumer went away: free the engine's slot
                self._cancels.append(key)
                self._wake.set()

    @staticmethod
    def _checked(item: Event | BaseException) -> Event:
        if isinstance(item, BaseException):
            raise ReplicaUnavailable(f"this replica's engine failed: {item}") from item
        return item

    def _start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None
        while self.broken is None:
            if not (self._submissions or self._cancels or self._in_engine):
                await self._wake.wait()
                self._wake.clear()
                continue
            cancelled = set(self._cancels)
            submissions = [s for s in self._submissions if s.key not in cancelled]
            cancels = [key for key in self._cancels if key in self._in_engine]
            self._submissions, self._cancels = [], []
            self._in_engine -= cancelled
            self._in_engine |= {s.key for s in submissions}
            try:
                output = await self._step(submissions, cancels)
            except Exception as error:  # every waiter gets it, then health fails
                self.broken = error
                for queue in self._queues.values():
                    queue.put_nowait(error)
                return
            self.steps += 1
            self.telemetry.accumulate(output.telemetry)
            for event in output.events:
                if event.final:
                    self._in_engine.discard(event.key)
                    self.completed += event.completion is not None
                waiting = self._queues.get(event.key)
                if waiting is not None:
                    waiting.put_nowait(event)
