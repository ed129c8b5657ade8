"""The service over real loopback HTTP (`launch.serve`): one Ray Serve application shared
by the module (a tiny task-routed checkpoint; task 1 served by its subset, the rest by
the full model expert-parallel over 2 Ray workers). Greedy answers equal offline
`launch.generate` (EP=1), streaming ends in [DONE], a full queue answers 503 with
Retry-After and recovers, and the faults, injected together so that their recoveries
overlap: a replica SIGKILLed while clients send (half of them streaming), and an EP worker
stopped. Every request is counted: none lost, none answered twice, a stream broken
mid-way counted as its error. One application for the module: Serve's start-up (about a
minute on a loaded 2-core machine) is paid once."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from test_subset import tiny_run_config

from launch.generate import GenerateConfig, run_generate
from launch.runtime import ProcessInfo
from launch.serve import ServeConfig, ServeOptions, start, stop
from launch.training.checkpointing import config_dict
from moe.checkpoint import save_checkpoint
from moe.transformer import MoETransformer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = ["In the beginning", "And God said, ", "Blessed are", "x"]
TOKENS = 12


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _checkpoint(directory: Path) -> Path:
    """A random task-routed model (4 tasks, 8 experts, top-2) with sharp logits that only
    ever picks ASCII bytes (so texts compare byte for byte, no U+FFFD hiding a change)."""
    config = tiny_run_config("task", 8)
    model = MoETransformer(config.model, config.routing, seed=5)
    with torch.no_grad():
        model.final_norm.weight.mul_(30.0)  # clear greedy margins: EP sums in another order
        head = model.embed.weight if model.lm_head is None else model.lm_head.weight
        head[128:].zero_()  # logit 0 for non-ASCII bytes; the best ASCII logit is above 0
    save_checkpoint(directory / "checkpoints", model, None, 7, config_dict(config))
    return directory


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("serve")
    checkpoint = _checkpoint(root / "run")
    options = ServeOptions(
        port=_free_port(), tasks=["1"], subset_dir=str(root / "subsets"), ep_size=2,
        max_batch=4, max_ongoing_requests=2, max_queued_requests=2, max_tokens=64,
        health_check_period_s=1.0, health_check_timeout_s=10.0, timeout_s=60.0,
    )  # fmt: skip
    try:
        url = start(ServeConfig(checkpoint=str(checkpoint), serve=options))
        with httpx.Client(base_url=url, timeout=120.0) as client:
            yield checkpoint, client
    finally:
        stop()


def _offline(checkpoint: Path, task: int) -> list[str]:
    config = GenerateConfig(checkpoint=str(checkpoint), prompts=PROMPTS, task=task,
                            max_tokens=TOKENS, temperature=0.0)  # fmt: skip
    return [c.text for c in run_generate(config, ProcessInfo())]


def _complete(client: httpx.Client, model: str, prompt: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body)


def test_models_list_each_deployment_and_its_experts(service: Any) -> None:
    _, client = service
    answer = client.get("/v1/models")
    assert answer.status_code == 200
    models = {m["id"]: m for m in answer.json()["data"]}
    assert sorted(models) == ["full", "task-0", "task-1", "task-2", "task-3"]
    assert models["task-1"]["deployment"] == "task-1" and models["task-2"]["deployment"] == "full"
    assert models["full"]["ep_size"] == 2 and len(models["full"]["pids"]) == 3
    assert all(ids == list(range(8)) for ids in models["full"]["experts"].values())
    assert all(len(ids) == 2 for ids in models["task-1"]["experts"].values())  # top-2
    assert models["task-1"]["weight_bytes"] < models["full"]["weight_bytes"]
    assert client.get("/healthz").json() == {
        "status": "ok",
        "deployments": {"full": "ok", "task-1": "ok"},
    }


def test_the_replicas_run_with_serves_throughput_settings(service: Any) -> None:
    """Every replica and expert-parallel worker process got `SERVE_ENVIRONMENT`."""
    import psutil

    from launch.serve import SERVE_ENVIRONMENT

    _, client = service
    pids = [pid for m in client.get("/v1/models").json()["data"] for pid in m["pids"]]
    for pid in set(pids):
        environment = psutil.Process(pid).environ()
        assert {k: environment.get(k) for k in SERVE_ENVIRONMENT} == SERVE_ENVIRONMENT, pid


def test_http_greedy_equals_offline_generate_and_ep2_equals_ep1(service: Any) -> None:
    checkpoint, client = service
    for task, models in ((1, ["task-1", "full"]), (2, ["task-2"])):
        expected = _offline(checkpoint, task)  # launch.generate, one process (EP=1)
        assert len(set(expected)) > 1 and all(text.isascii() for text in expected)
        for model in models:
            extra = {"task": task} if model == "full" else {}
            answers = [_complete(client, model, p, **extra).json() for p in PROMPTS]
            assert [a["choices"][0]["text"] for a in answers] == expected, model
            assert all(a["usage"]["completion_tokens"] == TOKENS for a in answers)
            assert all(a["choices"][0]["finish_reason"] == "length" for a in answers)


def test_streaming_sends_chunks_then_done(service: Any) -> None:
    _, client = service
    whole = _complete(client, "task-1", PROMPTS[0]).json()["choices"][0]["text"]
    body = {"model": "task-1", "prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0,
            "stream": True}  # fmt: skip
    with client.stream("POST", "/v1/completions", json=body) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert len(chunks) > 1 and "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_bad_requests_over_http(service: Any) -> None:
    _, client = service
    cases = [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": "task-1", "prompt": "x", "temperature": -1}, 422, "temperature"),
        ({"model": "task-1", "prompt": "x", "max_tokens": 65}, 422, "max_tokens"),
        ({"model": "task-1", "prompt": "x" * 40}, 400, "prompt"),
        ({"model": "full", "prompt": "x"}, 422, "task"),
    ]
    for body, status, param in cases:
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == status and answer.json()["error"]["param"] == param
    assert client.post("/v1/completions", content=b"\xff{").status_code == 400
    assert client.post("/v1/completions", content=b"x" * 70000).status_code == 413


def test_overload_answers_503_with_retry_after_then_recovers(service: Any) -> None:
    _, client = service
    body = {"model": "task-1", "prompt": "load", "max_tokens": 64, "temperature": 0}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/completions", json=body), range(16)))
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 503}, statuses
    rejected = [a for a in answers if a.status_code == 503]
    assert all(a.headers["retry-after"] == "1" for a in rejected)
    assert all(a.json()["error"]["code"] == "overloaded" for a in rejected)
    assert _complete(client, "task-1", "after").status_code == 200


def _scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }


def test_metrics_of_the_expert_parallel_deployment(service: Any) -> None:
    """The full model's 2 EP workers report together: tokens routed per expert add up
    over the workers to top-2 x the tokens the model read, and the all-to-all time is
    there (EP only)."""
    _, client = service
    before = _scrape(client)
    for prompt in PROMPTS:
        assert _complete(client, "full", prompt, task=2).status_code == 200
    after = _scrape(client)
    full = (("deployment", "full"),)

    def delta(name: str, labels: tuple[tuple[str, str], ...] = full) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    read = sum(len(p.encode()) + TOKENS - 1 for p in PROMPTS)
    assert delta("moe_engine_tokens_total") == read
    for layer in ("0", "1"):
        routed = sum(
            delta(
                "moe_expert_tokens_total",
                (("deployment", "full"), ("expert", str(e)), ("layer", layer)),
            )
            for e in range(8)
        )
        assert routed == 2 * read
    assert delta("moe_alltoall_seconds_total") > 0 and delta("moe_engine_steps_total") > 0
    assert after[("moe_kv_slots", full)] == 2 * 4  # max_batch slots on each worker


def _send(client: httpx.Client, prompt: str, stream: bool) -> tuple[int, str]:
    """One task-1 request: (status, completion id). A stream that ends in an `error`
    event instead of [DONE] is the error's status (503: its replica died mid-stream)."""
    if not stream:
        answer = _complete(client, "task-1", prompt)
        return answer.status_code, answer.json().get("id", "") if answer.is_success else ""
    body = {"model": "task-1", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
            "stream": True}  # fmt: skip
    with client.stream("POST", "/v1/completions", json=body) as answer:
        if not answer.is_success:
            answer.read()
            return answer.status_code, ""
        key = ""
        for line in answer.iter_lines():
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                return 200, key
            if payload:
                chunk = json.loads(payload)
                if "error" in chunk:
                    assert chunk["error"]["code"] == "replica_failed", chunk
                    return 503, ""
                key = chunk["id"]
    raise AssertionError("a stream ended with neither [DONE] nor an error event")


def _clients_while(client: httpx.Client, action: Any, settle: Any) -> list[tuple[int, str]]:
    """4 client threads (2 streaming) send task-1 requests until `settle()` after
    `action()`; returns every (status, id). A request that hangs past the client timeout
    fails the test."""
    results: list[tuple[int, str]] = []
    done = threading.Event()
    lock = threading.Lock()

    def send(index: int) -> None:
        while not done.is_set():
            outcome = _send(client, PROMPTS[index % len(PROMPTS)], stream=index % 2 == 1)
            with lock:
                results.append(outcome)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(send, i) for i in range(4)]
        while sum(s == 200 for s, _ in results) < 4:
            time.sleep(0.1)
        action()
        try:
            settle(results)
        finally:
            done.set()
        for future in futures:
            future.result()  # re-raises a client error (a timeout: a hung request)
    return results


def _full_state(client: httpx.Client) -> tuple[int, str]:
    health = client.get("/healthz")
    return health.status_code, health.json()["deployments"]["full"]


def test_a_killed_replica_and_a_stopped_ep_worker_are_replaced(service: Any) -> None:
    """Both faults at once (their recoveries overlap, which halves the test's time): the
    task-1 replica SIGKILLed while 4 clients send to it, and one of the full model's 2
    EP workers SIGKILLed. In-flight requests end in 503, none hangs, none is lost or
    answered twice, later requests succeed; the full model reports unhealthy, Serve
    replaces it (a new replica, new workers) and it answers as EP=1 again."""
    checkpoint, client = service
    before = client.get("/v1/stats").json()["responses"]
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    task_pid = models["task-1"]["pids"][0]
    full_pids = models["full"]["pids"]
    full_seen_unhealthy = False

    def kill() -> None:
        os.kill(task_pid, signal.SIGKILL)
        os.kill(full_pids[2], signal.SIGKILL)  # one of the 2 EP workers

    def settle(results: list[tuple[int, str]]) -> None:
        nonlocal full_seen_unhealthy
        task_recovered = full_recovered = False
        state = ""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (task_recovered and full_recovered):
            task_recovered = sum(s == 200 for s, _ in results[-8:]) == 8 and len(results) > 16
            if not full_recovered:  # /healthz waits up to 10 s on a dead task-1 replica
                status, state = _full_state(client)
                if state.startswith("unhealthy"):
                    assert status == 503
                    full_seen_unhealthy = True
                full_recovered = full_seen_unhealthy and state == "ok"
            time.sleep(0.5)
        assert task_recovered, f"task-1 did not recover: {results[-8:]}"
        assert full_recovered, f"full: seen unhealthy {full_seen_unhealthy}, now {state!r}"

    results = _clients_while(client, kill, settle)
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    ids = [key for status, key in results if status == 200]
    assert len(ids) == len(set(ids))  # none answered twice
    after = client.get("/v1/stats").json()["responses"]
    answered = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert answered.get("200", 0) == statuses.count(200)  # none lost
    assert sum(answered.values()) == len(statuses)  # every request answered once
    renewed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert renewed["task-1"]["pids"][0] != task_pid
    assert not set(renewed["full"]["pids"]) & set(full_pids)
    assert client.get("/healthz").status_code == 200
    expected = _offline(checkpoint, 3)
    answers = [_complete(client, "full", p, task=3).json() for p in PROMPTS]
    assert [a["choices"][0]["text"] for a in answers] == expected
