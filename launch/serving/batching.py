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
interval instead of per token when steps are fast (docs/SERVING.md). A bound on the
events per second of all requests together (`max_events_per_s`) widens every stream's
interval as requests multiply.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

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


class WorkQueue:
    """Submissions and cancellations waiting for the next step, and the requests in the
    engine: what whoever runs the steps needs to decide the next one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # `post` may come from another thread than `take`
        self._submissions: list[Submission] = []
        self._cancels: list[int] = []
        self._in_engine: set[int] = set()  # touched only by whoever runs the steps

    @property
    def pending(self) -> int:
        """Submissions not yet handed to the engine."""
        return len(self._submissions)

    def post(self, submission: Submission | None = None, cancel: int | None = None) -> None:
        with self._lock:
            if submission is not None:
                self._submissions.append(submission)
            if cancel is not None:
                self._cancels.append(cancel)

    def take(self) -> tuple[list[Submission], list[int]] | None:
        """The submissions and cancellations of the next step; None: nothing to step
        (nothing new and nothing in the engine)."""
        with self._lock:
            if not (self._submissions or self._cancels or self._in_engine):
                return None
            cancelled = set(self._cancels)
            submissions = [s for s in self._submissions if s.key not in cancelled]
            cancels = [key for key in self._cancels if key in self._in_engine]
            self._submissions, self._cancels = [], []
        self._in_engine -= cancelled
        self._in_engine |= {s.key for s in submissions}
        return submissions, cancels

    def stepped(self, output: StepOutput) -> None:
        for event in output.events:
            if event.final:
                self._in_engine.discard(event.key)


class BatchLoop:
    """The asyncio side: requests in, events out.

    `engine` says where the steps run, each way back to back while there is work:
    - an `EngineShard` in this process is stepped by a thread of the loop's (it hands
      each step's output to the event loop and goes on: a step never waits for the
      loop to get round to starting it);
    - an async step function (the expert-parallel workers') is awaited by a task.

    `max_events_per_s` bounds the stream events the loop's requests get per second, all
    requests together (0: no bound): each stream's interval is at least the number of
    requests in flight over the bound. An event costs about the same whatever it
    carries (a message per hop and a JSON encoding: docs/SERVING.md), so the bound caps
    that cost when many streams run: one stream still gets every token, 32 a piece per
    `32 / max_events_per_s` seconds each."""

    def __init__(self, engine: EngineShard | StepFunction, max_events_per_s: float = 0.0) -> None:
        if max_events_per_s < 0:
            raise ValueError(f"max_events_per_s={max_events_per_s} is invalid; accepted: >= 0")
        self._engine = engine
        self.max_events_per_s = max_events_per_s
        self._keys = itertools.count()
        self._queues: dict[int, asyncio.Queue[Event | BaseException]] = {}
        self._work = WorkQueue()
        self._started = False
        self._wake: Callable[[], None] | None = None
        self._runner: asyncio.Task[None] | threading.Thread | None = None  # kept alive
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
        return self._work.pending

    def stream_interval(self, interval_s: float) -> float:
        """The interval a stream asking for `interval_s` gets now (`max_events_per_s`)."""
        if not self.max_events_per_s:
            return interval_s
        return max(interval_s, len(self._queues) / self.max_events_per_s)

    async def generate(
        self,
        prompt: bytes | Sequence[int],
        params: SamplingParams,
        task: int | None,
        interval_s: float = 0.0,
    ) -> AsyncIterator[Event]:
        """The events of one request, the last one final; with `interval_s` > 0 (or a
        bound on events per second), merged (see the module docstring); events already
        waiting are merged in any case. Raises `ReplicaUnavailable` when the engine
        fails; cancelling the consumer cancels the request."""
        if self.broken is not None:
            raise ReplicaUnavailable(f"this replica's engine failed: {self.broken}")
        self._start()
        key = next(self._keys)
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self._queues[key] = queue
        self._post(submission=Submission(key, prompt, params, task))
        finished = False
        clock = asyncio.get_running_loop().time
        sent_at: float | None = None  # when the last event went out
        try:
            while True:
                event = self._checked(await queue.get())
                if sent_at is not None and not event.final:
                    deadline = sent_at + self.stream_interval(interval_s)
                    while not event.final and clock() < deadline:
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
            if not finished and self.broken is None:  # the consumer left: free its slot
                self._post(cancel=key)

    @staticmethod
    def _checked(item: Event | BaseException) -> Event:
        if isinstance(item, BaseException):
            raise ReplicaUnavailable(f"this replica's engine failed: {item}") from item
        return item

    def _post(self, submission: Submission | None = None, cancel: int | None = None) -> None:
        self._work.post(submission, cancel)
        assert self._wake is not None
        self._wake()

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        engine = self._engine
        if isinstance(engine, EngineShard):
            wake = threading.Event()
            self._wake = wake.set
            self._runner = threading.Thread(
                target=self._stepping_thread, args=(engine, wake, loop), daemon=True,
                name="engine-steps",
            )  # fmt: skip
            self._runner.start()
        else:
            woken = asyncio.Event()
            self._wake = woken.set
            self._runner = loop.create_task(self._stepping_task(engine, woken))

    def _stepping_thread(
        self, shard: EngineShard, wake: threading.Event, loop: asyncio.AbstractEventLoop
    ) -> None:
        while True:
            work = self._work.take()
            if work is None:
                wake.wait()
                wake.clear()
                continue
            try:
                output = shard.step(*work)
            except Exception as error:
                _hand_over(loop, self._fail, error)
                return
            self._work.stepped(output)
            if not _hand_over(loop, self._deliver, output):
                return  # the event loop is closed: nobody is left to serve

    async def _stepping_task(self, step: StepFunction, wake: asyncio.Event) -> None:
        while True:
            work = self._work.take()
            if work is None:
                await wake.wait()
                wake.clear()
                continue
            try:
                output = await step(*work)
            except Exception as error:
                self._fail(error)
                return
            self._work.stepped(output)
            self._deliver(output)

    def _fail(self, error: BaseException) -> None:
        """Every waiter gets the error; health checks fail from now on."""
        self.broken = error
        for queue in self._queues.values():
            queue.put_nowait(error)

    def _deliver(self, output: StepOutput) -> None:
        self.steps += 1
        self.telemetry.accumulate(output.telemetry)
        for event in output.events:
            self.completed += event.completion is not None
            waiting = self._queues.get(event.key)
            if waiting is not None:
                waiting.put_nowait(event)


_A = TypeVar("_A")


def _hand_over(loop: asyncio.AbstractEventLoop, call: Callable[[_A], None], arg: _A) -> bool:
    """`call(arg)` on `loop` from another thread; False when the loop is closed."""
    try:
        loop.call_soon_threadsafe(call, arg)
    except RuntimeError:
        return False
    return True
