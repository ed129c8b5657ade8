"""Serving without Ray: every request-validation path (`launch.serving.validation`), the
HTTP errors failures become (`launch.serving.api.translate_error`), how a stream is
counted (`sse_events`: a failure after the first chunk is an error, not a 200), the
benchmark's memory probe (one MoE layer of one expert), and the in-replica
batching loop (`launch.serving.batching`) over a real engine: concurrent requests share
steps, answer what one request alone answers, and a cancelled one frees its slot."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from test_inference_engine import prompts, sharp_model

from launch.serving.batching import BatchLoop, EngineShard, ReplicaUnavailable, StepOutput
from launch.serving.protocol import CompletionRequest
from launch.serving.validation import (
    Limits,
    ModelEntry,
    RequestError,
    parse_completion_request,
)
from moe.inference import InferenceEngine, SamplingParams, generate

LIMITS = Limits(max_body_bytes=1024, max_tokens=64)
CATALOG = {
    "full": ModelEntry("full", None, 32, needs_task=True, task_ids=(0, 1, 2)),
    "task-1": ModelEntry("task-1", 1, 32),
    "task-2": ModelEntry("full", 2, 32),
    "open": ModelEntry("open", None, 32),
}


def parse(body: object, raw: bytes | None = None) -> CompletionRequest:
    data = raw if raw is not None else json.dumps(body).encode()
    return parse_completion_request(data, CATALOG, LIMITS)


def refused(body: object, raw: bytes | None = None) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse(body, raw)
    return caught.value


def test_a_full_request_is_parsed() -> None:
    request = parse({
        "model": "task-1", "prompt": "In the beginning", "max_tokens": 12, "temperature": 0,
        "top_p": 0.5, "stop": ["\n", "."], "seed": 4, "stream": True,
    })  # fmt: skip
    generation = request.generation
    assert request.deployment == "task-1" and generation.task == 1
    assert generation.prompts == (tuple(b"In the beginning"),)
    assert request.prompt_texts == ("In the beginning",) and generation.stop == ("\n", ".")
    assert request.stream and generation.max_tokens == 12 and generation.seed == 4
    other = parse({"model": "task-2", "prompt": "x", "stop": "ab"})
    assert other.deployment == "full" and other.generation.task == 2
    assert other.generation.stop == ("ab",)
    defaults = parse({"model": "open", "prompt": "é"})
    assert defaults.generation.prompts == (tuple("é".encode()),)
    assert defaults.generation.temperature == 1.0 and defaults.generation.task is None
    assert not defaults.stream and defaults.generation.n == defaults.generation.best_of == 1
    assert parse({"model": "full", "prompt": "x", "task": 2}).generation.task == 2


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": 3, "prompt": "x"}, 422, "model"),
        ({"prompt": "x"}, 422, "model"),
        ({"model": "open"}, 422, "prompt"),
        ({"model": "open", "prompt": ["x", 1]}, 422, "prompt"),
        ({"model": "open", "prompt": ""}, 422, "prompt"),
        ({"model": "open", "prompt": "x" * 33}, 400, "prompt"),  # longer than the context
        ({"model": "open", "prompt": "é" * 17}, 400, "prompt"),  # 34 bytes in UTF-8
        ({"model": "open", "prompt": "\ud800"}, 400, "prompt"),  # a lone surrogate
        ({"model": "open", "prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
        ({"model": "open", "prompt": "x", "max_tokens": 65}, 422, "max_tokens"),
        ({"model": "open", "prompt": "x", "max_tokens": "5"}, 422, "max_tokens"),
        ({"model": "open", "prompt": "x", "max_tokens": 5.0}, 422, "max_tokens"),
        ({"model": "open", "prompt": "x", "max_tokens": True}, 422, "max_tokens"),
        ({"model": "open", "prompt": "x", "temperature": -0.1}, 422, "temperature"),
        ({"model": "open", "prompt": "x", "temperature": "hot"}, 422, "temperature"),
        ({"model": "open", "prompt": "x", "temperature": 1e9}, 422, "temperature"),
        ({"model": "open", "prompt": "x", "top_p": 0}, 422, "top_p"),
        ({"model": "open", "prompt": "x", "top_p": 1.5}, 422, "top_p"),
        ({"model": "open", "prompt": "x", "stop": 5}, 422, "stop"),
        ({"model": "open", "prompt": "x", "stop": ["a", 1]}, 422, "stop"),
        ({"model": "open", "prompt": "x", "stop": [""]}, 422, "stop"),
        ({"model": "open", "prompt": "x", "stop": ["a"] * 5}, 422, "stop"),
        ({"model": "open", "prompt": "x", "stop": "x" * 65}, 422, "stop"),
        ({"model": "open", "prompt": "x", "seed": -1}, 422, "seed"),
        ({"model": "open", "prompt": "x", "seed": 2**64}, 422, "seed"),
        ({"model": "open", "prompt": "x", "stream": "yes"}, 422, "stream"),
        ({"model": "open", "prompt": "x", "n": 0}, 422, "n"),
        ({"model": "full", "prompt": "x"}, 422, "task"),  # a task-routed model needs one
        ({"model": "full", "prompt": "x", "task": 7}, 422, "task"),
        ({"model": "full", "prompt": "x", "task": "1"}, 422, "task"),
        ({"model": "task-1", "prompt": "x", "task": 2}, 422, "task"),
    ],
)
def test_each_bad_field_is_named(body: dict, status: int, param: str) -> None:
    error = refused(body)
    assert (error.status, error.param) == (status, param), error.message
    payload = error.body()["error"]
    assert payload["param"] == param and payload["message"] and payload["type"]
    json.dumps(error.body())  # the answer is JSON


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"\xff\xfe{}", 400, "invalid_utf8"),
        (b'{"model": "open", "prompt": "\xc3("}', 400, "invalid_utf8"),
        (b"{not json", 400, "invalid_json"),
        (b'[{"model": "open"}]', 400, "invalid_json"),
        (b'{"model": "open", "prompt": "x", "temperature": NaN}', 400, "invalid_json"),
        (b'{"model": "open", "prompt": "x", "top_p": Infinity}', 400, "invalid_json"),
        (b'{"model": "open", "prompt": "' + b"x" * 1100 + b'"}', 413, "body_too_large"),
        (b"\x80\x04\x95" + b"pickle", 400, "invalid_utf8"),  # a pickle is never unpickled
    ],
)
def test_bad_bodies(raw: bytes, status: int, code: str) -> None:
    error = refused(None, raw)
    assert (error.status, error.code) == (status, code), error.message


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_tokens=0"):
        Limits(max_tokens=0)
    with pytest.raises(ValueError, match="max_body_bytes"):
        Limits(max_body_bytes=-1)


def test_failures_behind_the_gateway_become_http_errors() -> None:
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from launch.serving.batching import ReplicaUnavailable
    from launch.serving.events import translate_error

    full = translate_error(BackPressureError(num_queued_requests=4, max_queued_requests=4), 2)
    assert full.status == 503 and full.headers == {"Retry-After": "2"}
    assert translate_error(ActorDiedError(), 1).status == 503
    assert translate_error(ReplicaUnavailable("worker died"), 1).status == 503
    assert translate_error(ValueError("task_id=9 is not a task"), 1).status == 422
    assert translate_error(RuntimeError("bug"), 1).status == 500


def test_a_stream_counts_as_its_outcome_not_its_200_status_line() -> None:
    from collections import Counter

    from ray.exceptions import ActorDiedError

    from launch.serving.events import CLIENT_CLOSED, sse_events

    async def chunks(fail: bool) -> object:
        yield {"text": "b"}
        if fail:
            raise ActorDiedError()  # the replica died mid-stream, headers already sent
        yield {"text": "c", "finish_reason": "length"}

    async def collect(fail: bool, take: int | None = None) -> tuple[list[str], Counter]:
        responses: Counter[int] = Counter()
        events = sse_events(
            {"text": "a"}, chunks(fail), dict, 1, lambda status: responses.update([status])
        )
        lines = []
        async for line in events:
            lines.append(line)
            if take is not None and len(lines) == take:
                await events.aclose()  # the client went away
                break
        return lines, responses

    lines, responses = asyncio.run(collect(fail=False))
    assert lines[-1] == "data: [DONE]\n\n" and responses == {200: 1}
    lines, responses = asyncio.run(collect(fail=True))
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "replica_failed" and responses == {503: 1}
    _, responses = asyncio.run(collect(fail=False, take=2))
    assert responses == {CLIENT_CLOSED: 1}


# --- the batching loop, without Ray ----------------------------------------------------


async def _run_loop(engine: InferenceEngine, texts: list[bytes], tokens: int) -> list[str]:
    loop = BatchLoop(EngineShard(engine))
    greedy = SamplingParams(max_tokens=tokens, temperature=0)

    async def one(prompt: bytes) -> str:
        shown, final = "", ""
        async for event in loop.generate(prompt, greedy, None):
            shown += event.new_text
            if event.completion is not None:
                final = event.completion.text
        assert shown == final  # the streamed pieces make up the completion
        return final

    results = await asyncio.gather(*(one(p) for p in texts))
    # Concurrent requests shared steps: far fewer steps than one request after another.
    assert loop.steps < len(texts) * tokens // 2 and loop.completed == len(texts)
    return list(results)


def test_concurrent_requests_share_steps_and_equal_one_at_a_time() -> None:
    model = sharp_model(31)
    texts = prompts(6, seed=3)
    expected = [generate(model, p, 9, temperature=0).text for p in texts]
    engine = InferenceEngine(model, max_batch=4)
    assert asyncio.run(_run_loop(engine, texts, 9)) == expected


def test_a_consumer_that_goes_away_frees_its_slot() -> None:
    model = sharp_model(32)
    engine = InferenceEngine(model, max_batch=1)

    async def scenario() -> str:
        loop = BatchLoop(EngineShard(engine))
        stream = loop.generate(b"abc", SamplingParams(max_tokens=50, temperature=0), None)
        await stream.__anext__()
        await stream.aclose()  # the client left after one token
        final = ""
        async for event in loop.generate(b"xyz", SamplingParams(max_tokens=5, temperature=0), None):
            if event.completion is not None:
                final = event.completion.text
        assert not engine.has_work()
        return final

    # With one slot, the second request can only run if the first was cancelled.
    assert (
        asyncio.run(asyncio.wait_for(scenario(), 60))
        == generate(model, b"xyz", 5, temperature=0).text
    )


def test_merged_streams_send_the_first_text_at_once_and_the_end_without_waiting() -> None:
    """interval_s=30: the first token alone, then the rest in one final event as soon as
    it exists (not 30 s later); the pieces (tokens and text) make up the completion."""
    model = sharp_model(34)
    engine = InferenceEngine(model, max_batch=2)

    async def scenario() -> list:
        loop = BatchLoop(EngineShard(engine))
        greedy = SamplingParams(max_tokens=12, temperature=0)
        return [event async for event in loop.generate(b"abc", greedy, None, interval_s=30.0)]

    started = time.perf_counter()
    first, last = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert time.perf_counter() - started < 20
    # The first token alone (its text may be held back: part of a UTF-8 character).
    assert len(first.new_tokens) == 1 and first.completion is None
    assert last.completion is not None
    assert first.new_tokens + last.new_tokens == last.completion.tokens
    assert first.new_text + last.new_text == last.completion.text
    assert last.completion.token_ids == generate(model, b"abc", 12, temperature=0).token_ids


class _SlowShard(EngineShard):
    """Steps of 10 ms at least: the consumers keep up with every step."""

    def step(self, submissions: list, cancels: list, always: bool = False) -> StepOutput:
        output = super().step(submissions, cancels, always)
        time.sleep(0.01)
        return output


def _count_events(engine: InferenceEngine, streams: int, tokens: int, per_s: float) -> list[int]:
    """Events each of `streams` concurrent greedy streams got, checking that every
    stream's pieces make up its completion."""

    async def scenario() -> list[int]:
        loop = BatchLoop(_SlowShard(engine), max_events_per_s=per_s)
        greedy = SamplingParams(max_tokens=tokens, temperature=0)

        async def one(prompt: bytes) -> int:
            events = [event async for event in loop.generate(prompt, greedy, None)]
            completion = events[-1].completion
            assert completion is not None and completion.completion_tokens == tokens
            assert sum((e.new_tokens for e in events), ()) == completion.tokens
            return len(events)

        return list(await asyncio.gather(*(one(p) for p in prompts(streams, seed=5))))

    return asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_bound_on_events_per_second_merges_many_streams_and_spares_one() -> None:
    """max_events_per_s=400 with 10 ms steps: one stream's interval is 2.5 ms (every
    token its own event), 16 streams' 40 ms (each gets its first token, then a piece
    per 4 steps or so: about 4 events for 12 tokens)."""
    engine = InferenceEngine(sharp_model(35), max_batch=16)
    assert _count_events(engine, 16, 12, per_s=0.0) == [12] * 16  # unbounded: every token
    bounded = _count_events(engine, 16, 12, per_s=400.0)
    assert max(bounded) <= 6, bounded
    assert _count_events(engine, 1, 12, per_s=400.0) == [12]


def test_an_engine_step_that_raises_breaks_the_loop_for_every_request() -> None:
    class Failing(EngineShard):
        def step(self, submissions: list, cancels: list, always: bool = False) -> object:
            raise RuntimeError("the engine broke")

    async def scenario() -> tuple[list[str], BatchLoop]:
        loop = BatchLoop(Failing(InferenceEngine(sharp_model(36), max_batch=2)))

        async def one(prompt: bytes) -> str:
            try:
                events = [
                    e async for e in loop.generate(prompt, SamplingParams(max_tokens=3), None)
                ]
            except ReplicaUnavailable as error:
                return str(error)
            return f"answered with {len(events)} events"

        return list(await asyncio.gather(one(b"ab"), one(b"cd"))), loop

    errors, loop = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert all("the engine broke" in e for e in errors) and loop.broken is not None
    with pytest.raises(ReplicaUnavailable, match="the engine broke"):
        asyncio.run(loop.generate(b"ef", SamplingParams(max_tokens=3), None).__anext__())


def test_engine_refusals_reach_only_their_request() -> None:
    model = sharp_model(33)
    engine = InferenceEngine(model, max_batch=2, task_ids=[])

    async def scenario() -> list[str | None]:
        loop = BatchLoop(EngineShard(engine))
        errors = []
        async for event in loop.generate(b"ab", SamplingParams(max_tokens=3), 5):
            errors.append(event.error)
        return errors

    (error,) = asyncio.run(scenario())
    assert error is not None and "task_id=5" in error


def test_the_memory_probe_keeps_one_moe_layer_of_one_expert(tmp_path: object) -> None:
    """The benchmark's runtime-overhead baseline must run the MoE path (its custom ops
    import torch._dynamo, ~150 MB) while holding almost no expert bytes."""
    from pathlib import Path

    from test_subset import tiny_run_config

    from launch.serving.deployments import probe_model
    from launch.serving.model_info import describe_model
    from launch.training.checkpointing import config_dict
    from moe.checkpoint import save_checkpoint
    from moe.transformer import MoETransformer

    config = tiny_run_config("task", 8)
    model = MoETransformer(config.model, config.routing, seed=5)
    save_checkpoint(Path(str(tmp_path)) / "checkpoints", model, None, 1, config_dict(config))
    probe = probe_model(str(tmp_path))
    described = describe_model(probe)
    assert list(described["experts"].values()) == [[0]]
    engine = InferenceEngine(probe.model, max_batch=2)  # the warm-up runs the MoE layer
    engine.submit(b"ab", SamplingParams(max_tokens=2, temperature=0), task_id=0)
    assert len(list(engine.run())) == 1


def test_serve_environment_defaults_and_what_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.serve import SERVE_ENVIRONMENT, ServeOptions, serve_environment

    for name in SERVE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert serve_environment() == SERVE_ENVIRONMENT
    monkeypatch.setenv("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "1")
    assert serve_environment()["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "1"
    with pytest.raises(
        ValueError, match=r"serve.stream_events_per_s=-1.0 is invalid; accepted: >= 0"
    ):
        ServeOptions(stream_events_per_s=-1.0)
