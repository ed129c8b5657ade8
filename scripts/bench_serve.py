"""Load benchmark of the HTTP service (`launch.serve`): a task-subset deployment against
the full-model deployment, in one run, over real loopback sockets.

    OMP_NUM_THREADS=1 python scripts/bench_serve.py --checkpoint runs/demo_task --task 2 \\
        --json docs/results/serve_bench.json --plot docs/results/serve_bench.png

For each concurrency level (1, 8, 32, 64) and, interleaved, each deployment (`task-T`,
its subset; `full` with `task=T`, the whole model), closed-loop clients (each sends its
next request when the previous answer is complete) stream greedy completions of fixed
prompts for `--duration-s`. Per cell: completion tokens/s, p50/p99 request latency, p50
time to first token (first server-sent event), errors. Every request is counted: the
clients' count against the gateway's (`/v1/stats`), completion ids unique.

API variants (`--variants`, at `--variant-clients` clients on the task deployment,
interleaved over `--variant-rounds` rounds, medians): the same load as plain requests,
with `logprobs=5` (each token's log-probability and 5 alternatives, computed in the
sampling step), and with `n=4` (four sampled choices per request, 4x the sequences).
Tokens/s counts every choice's tokens (the answers' `usage`); the target is logprobs
costing under 10% of the plain tokens/s. `--variants-only` skips the concurrency sweep
and the memory check.

The serving path against the engine (`--ratio-rounds`, run first): the same
`--ratio-clients` greedy requests of `--ratio-tokens` tokens each (prompts cycled from
PROMPTS, task `--task`), answered (a) in this process by an `InferenceEngine` over the
full checkpoint with the replica's settings (threads, max_batch, compile), all submitted
at once and stepped to the end, and (b) over HTTP by the `full` deployment, one streaming
client per request, all at once. Rounds alternate (a, b, a, b, ...) after one untimed
round of each; tokens/s per round = completion tokens / wall time; `ratio` = median
HTTP / median in-process. The texts of both must be equal (greedy), else the script
fails. `--ratio-only` skips everything else.

Memory: resident set size per deployment (the replica's process, and an EP model's
workers), idle (after start-up) and after the load. The target: task RSS <= its dense
weights + its experts + the runtime overhead, measured on the `probe` deployment: the same
architecture with one MoE layer of one expert (so it runs, and imports, what an MoE
forward does), its RSS minus its weight bytes. The probe gets the same load as the
others (one cell at the highest client count, `probe_cell`) before the after-load
measurement, so activation and allocator growth count on both sides of the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from launch.serve import ServeConfig, ServeOptions, start, stop

PROMPTS = ["In the beginning ", "And the LORD said unto ", "Blessed are the ", "And it came "]
# The fields each API variant adds to a request (sampled: n > 1 needs temperature > 0).
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"temperature": 1.0, "seed": 0},
    "logprobs5": {"temperature": 1.0, "seed": 0, "logprobs": 5},
    "n4": {"temperature": 1.0, "seed": 0, "n": 4},
}


async def _one(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    first = None
    tokens, completion_id, status = 0, "", 0
    async with client.stream("POST", "/v1/completions", json=body) as answer:
        status = answer.status_code
        if status != 200:
            await answer.aread()
            return {"status": status, "latency_s": time.perf_counter() - started}
        async for line in answer.aiter_lines():
            if not line.startswith("data: "):
                continue
            if first is None:
                first = time.perf_counter() - started
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                status = 599
                break
            completion_id = chunk["id"]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"status": status, "latency_s": time.perf_counter() - started, "ttft_s": first,
            "tokens": tokens, "id": completion_id}  # fmt: skip


async def _cell(url: str, model: str, task: int, clients: int, duration_s: float,
                max_tokens: int, variant: str = "") -> dict[str, Any]:  # fmt: skip
    limits = httpx.Limits(max_connections=clients + 4)
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:
        before = (await client.get("/v1/stats")).json()["responses"]
        deadline = time.perf_counter() + duration_s

        async def loop(index: int) -> None:
            sent = 0
            while time.perf_counter() < deadline:
                body = {"model": model, "prompt": PROMPTS[(index + sent) % len(PROMPTS)],
                        "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True},
                        **VARIANTS.get(variant, {})}  # fmt: skip
                if model == "full":
                    body["task"] = task
                results.append(await _one(client, body))
                sent += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(clients)))
        wall = time.perf_counter() - started
        after = (await client.get("/v1/stats")).json()["responses"]
    ok = [r for r in results if r["status"] == 200]
    answered = sum(after.values()) - sum(before.values())
    ids = [r["id"] for r in ok]
    latencies = sorted(r["latency_s"] for r in ok)
    return {
        "model": model, "variant": variant, "clients": clients, "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok), "gateway_answered": answered,
        "lost": len(results) - answered, "answered_twice": len(ids) - len(set(ids)),
        "wall_s": wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "latency_p50_s": _quantile(latencies, 0.5), "latency_p99_s": _quantile(latencies, 0.99),
        "ttft_p50_s": _quantile(sorted(r["ttft_s"] for r in ok), 0.5),
    }  # fmt: skip


def _in_process_round(engine: Any, prompts: list[bytes], task: int, max_tokens: int,
                      ) -> tuple[float, list[str]]:  # fmt: skip
    """All requests submitted at once to the engine, stepped until done: tokens/s, texts."""
    from moe.inference import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    started = time.perf_counter()
    ids = [engine.submit(prompt, params, task) for prompt in prompts]
    done = {c.request_id: c for c in engine.run()}
    wall = time.perf_counter() - started
    tokens = sum(c.completion_tokens for c in done.values())
    return tokens / wall, [done[i].text for i in ids]


async def _http_round(url: str, prompts: list[bytes], task: int, max_tokens: int,
                      ) -> tuple[float, list[str]]:  # fmt: skip
    """One streaming client per request, all at once, to the `full` deployment."""
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:

        async def one(prompt: bytes) -> tuple[int, str]:
            body = {"model": "full", "prompt": prompt.decode(), "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "task": task,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            pieces: list[str] = []
            tokens = 0
            async with client.stream("POST", "/v1/completions", json=body) as answer:
                answer.raise_for_status()
                async for line in answer.aiter_lines():
                    payload = line.removeprefix("data: ")
                    if not line.startswith("data: ") or payload == "[DONE]":
                        continue
                    chunk = json.loads(payload)
                    pieces.extend(choice["text"] for choice in chunk["choices"])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            return tokens, "".join(pieces)

        started = time.perf_counter()
        answers = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - started
    return sum(t for t, _ in answers) / wall, [text for _, text in answers]


def _ratio(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """HTTP over in-process tokens/s for the same requests, alternated rounds (see the
    module docstring)."""
    import torch

    from moe.inference import InferenceEngine, load_model
    from moe.inference.decode import CompileWarmup, DecodeCompileOptions

    torch.set_num_threads(args.threads)
    loaded = load_model(args.checkpoint)
    engine = InferenceEngine(
        loaded.model, max_batch=args.max_batch, task_ids=loaded.task_ids, compile=args.compile,
        tokenizer=loaded.tokenizer,
        compile_options=DecodeCompileOptions(warmup=CompileWarmup.START),
    )  # fmt: skip
    prompts = [PROMPTS[i % len(PROMPTS)].encode() for i in range(args.ratio_clients)]
    rounds: dict[str, list[float]] = {"in_process": [], "http": []}
    cpu: dict[str, float] = {}
    http_wall = 0.0
    for index in range(args.ratio_rounds + 1):  # round 0 warms both paths up, untimed
        speed, texts = _in_process_round(engine, prompts, args.task, args.ratio_tokens)
        before, started = _cpu_seconds(), time.perf_counter()
        http_speed, http_texts = asyncio.run(_http_round(url, prompts, args.task,
                                                         args.ratio_tokens))  # fmt: skip
        if index:
            http_wall += time.perf_counter() - started
            for role, seconds in _cpu_seconds(before).items():
                cpu[role] = cpu.get(role, 0.0) + seconds
        if http_texts != texts:
            raise SystemExit("HTTP and in-process greedy texts differ: the comparison is void")
        if index:
            rounds["in_process"].append(speed)
            rounds["http"].append(http_speed)
        print(f"[ratio] round {index}: in-process {speed:.0f} tok/s, HTTP {http_speed:.0f} "
              f"tok/s", flush=True)  # fmt: skip
    engine.restore()
    medians = {k: statistics.median(v) for k, v in rounds.items()}
    timed = max(1, args.ratio_rounds)
    cpu_per_round = {role: seconds / timed for role, seconds in sorted(cpu.items())}
    print("[ratio] CPU seconds per HTTP round by process (wall "
          f"{http_wall / timed:.3f} s): " + json.dumps({k: round(v, 3) for k, v in
                                                       cpu_per_round.items()}), flush=True)  # fmt: skip
    return {
        "http_cpu_s_per_round": cpu_per_round, "http_wall_s_per_round": http_wall / timed,
        "clients": args.ratio_clients, "max_tokens": args.ratio_tokens, "task": args.task,
        "compile": args.compile, "threads": args.threads, "rounds": rounds,
        "stream_interval_s": args.stream_interval_s,
        "in_process_tokens_per_s": medians["in_process"], "http_tokens_per_s": medians["http"],
        "ratio": medians["http"] / medians["in_process"], "target": 0.8,
        "ratio_per_round_median": statistics.median(
            h / i for h, i in zip(rounds["http"], rounds["in_process"], strict=True)
        ),
    }  # fmt: skip


def _cpu_seconds(since: dict[str, float] | None = None) -> dict[str, float]:
    """CPU seconds (user + system) of every process on the machine, summed by role: this
    script (the HTTP clients), Ray Serve's proxy, each deployment's replica, Ray's own
    daemons, the rest; with `since`, the difference from that snapshot."""
    import psutil

    totals: dict[str, float] = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            times = process.cpu_times()
            command = " ".join(process.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if process.pid == os.getpid():
            role = "client (this script)"
        elif command.startswith("ray::ServeReplica:"):
            role = "replica " + command.split(":")[-1].split()[0]
        elif command.startswith("ray::"):
            role = command.split()[0].removeprefix("ray::").split(".")[0]
        elif "ray" in command and ("raylet" in command or "gcs_server" in command):
            role = "ray daemons"
        else:
            role = "other"
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    if since is None:
        return totals
    return {role: seconds - since.get(role, 0.0) for role, seconds in totals.items()
            if seconds - since.get(role, 0.0) > 0.005}  # fmt: skip


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def _memory(url: str) -> dict[str, Any]:
    models = {m["id"]: m for m in httpx.get(url + "/v1/models", timeout=120).json()["data"]}
    memory = {
        name: {k: models[name][k] for k in ("resident_bytes", "weight_bytes", "expert_bytes",
                                            "dense_bytes", "experts", "ep_size")}
        for name in models if name in ("full", "probe") or models[name]["deployment"] == name
    }  # fmt: skip
    probe = memory.pop("probe")
    overhead = probe["resident_bytes"] - probe["weight_bytes"]
    for entry in memory.values():
        entry["bound_bytes"] = entry["dense_bytes"] + entry["expert_bytes"] + overhead
        entry["margin_bytes"] = entry["bound_bytes"] - entry["resident_bytes"]
        entry["within_bound"] = entry["margin_bytes"] >= 0
    return {"runtime_overhead_bytes": overhead, "probe": probe, "deployments": memory}


def _variant_rounds(url: str, model: str, task: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant once per round, the order rotated each round; medians per variant
    and each variant's tokens/s against plain's of the same round."""
    cells: list[dict[str, Any]] = []
    for round_index in range(args.variant_rounds):
        shift = round_index % len(args.variants)
        for variant in args.variants[shift:] + args.variants[:shift]:
            cell = asyncio.run(_cell(url, model, task, args.variant_clients, args.duration_s,
                                     args.max_tokens, variant))  # fmt: skip
            cell["round"] = round_index
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    summary: dict[str, Any] = {}
    for variant in args.variants:
        mine = sorted(c["tokens_per_s"] for c in cells if c["variant"] == variant)
        ratios = sorted(
            c["tokens_per_s"] / plain["tokens_per_s"]
            for c in cells if c["variant"] == variant
            for plain in cells if plain["variant"] == "plain" and plain["round"] == c["round"]
        )  # fmt: skip
        summary[variant] = {
            "tokens_per_s_median": statistics.median(mine), "tokens_per_s": mine,
            "ratio_to_plain_median": statistics.median(ratios) if ratios else None,
            "errors": sum(c["errors"] for c in cells if c["variant"] == variant),
        }  # fmt: skip
    return {"clients": args.variant_clients, "rounds": args.variant_rounds, "cells": cells,
            "summary": summary}  # fmt: skip


def _plot(cells: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for model in sorted({c["model"] for c in cells}):
        mine = [c for c in cells if c["model"] == model]
        clients = [c["clients"] for c in mine]
        left.plot(clients, [c["tokens_per_s"] for c in mine], marker="o", label=model)
        right.plot(clients, [c["latency_p50_s"] for c in mine], marker="o", label=f"{model} p50")
        right.plot(clients, [c["latency_p99_s"] for c in mine], marker="x", ls="--",
                   label=f"{model} p99")  # fmt: skip
    left.set(xscale="log", xlabel="concurrent clients", ylabel="completion tokens/s",
             title="throughput")  # fmt: skip
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency (s)",
              title="request latency")  # fmt: skip
    left.legend()
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _sweep(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The concurrency sweep (task against full, level by level), the probe cell, and
    the memory check before and after."""
    memory_idle = _memory(url)
    cells = []
    for clients in args.clients:
        for model in (f"task-{args.task}", "full"):
            cell = asyncio.run(_cell(url, model, args.task, clients, args.duration_s,
                                     args.max_tokens))  # fmt: skip
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    probe_cell = asyncio.run(_cell(url, "probe", args.task, max(args.clients),
                                   args.duration_s, args.max_tokens))  # fmt: skip
    print(json.dumps(probe_cell), flush=True)
    return {"cells": cells, "memory_idle": memory_idle, "probe_cell": probe_cell,
            "memory_after_load": _memory(url)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo_task")
    parser.add_argument("--task", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--ep-size", type=int, default=1)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--variant-clients", type=int, default=32)
    parser.add_argument("--variant-rounds", type=int, default=3)
    parser.add_argument("--variants-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--compile", action="store_true", help="serve.compile (and in-process)")
    parser.add_argument("--stream-interval-s", type=float, default=None,
                        help="serve.stream_interval_s (default: the service's)")  # fmt: skip
    parser.add_argument("--ratio-rounds", type=int, default=5, help="0: no ratio")
    parser.add_argument("--ratio-clients", type=int, default=32)
    parser.add_argument("--ratio-tokens", type=int, default=64)
    parser.add_argument("--ratio-only", action="store_true", help="only the ratio")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    if args.variants and "plain" not in args.variants:
        parser.error("--variants needs plain: the others are measured against it")
    most = max([*args.clients, args.variant_clients, args.ratio_clients])
    options = ServeOptions(
        port=args.port, tasks=[str(args.task)], ep_size=args.ep_size, max_batch=args.max_batch,
        max_ongoing_requests=most, max_queued_requests=most,
        max_tokens=max(64, args.max_tokens, args.ratio_tokens),
        threads_per_replica=args.threads, compile=args.compile,
    )  # fmt: skip
    if args.stream_interval_s is not None:
        options.stream_interval_s = args.stream_interval_s
    args.stream_interval_s = options.stream_interval_s  # recorded with the results
    config = ServeConfig(checkpoint=args.checkpoint, serve=options)
    variants: dict[str, Any] | None = None
    ratio: dict[str, Any] | None = None
    sweep = None
    try:
        url = start(config, probe=not args.ratio_only)
        if args.ratio_rounds:
            ratio = _ratio(url, args)
            print(json.dumps({k: v for k, v in ratio.items() if k != "rounds"}), flush=True)
        if args.variants and not args.ratio_only:
            variants = _variant_rounds(url, f"task-{args.task}", args.task, args)
            print(json.dumps(variants["summary"], indent=1), flush=True)
        if not (args.variants_only or args.ratio_only):
            sweep = _sweep(url, args)
    finally:
        stop()
    cells = sweep["cells"] if sweep else []
    every = cells + (variants["cells"] if variants else [])  # each request counted
    result = {
        "date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(sys.argv), "checkpoint": args.checkpoint, "task": args.task,
        "max_tokens": args.max_tokens, "max_batch": args.max_batch, "ep_size": args.ep_size,
        "duration_s": args.duration_s, "cells": cells,
        "memory_idle": sweep and sweep["memory_idle"], "probe_cell": sweep and sweep["probe_cell"],
        "memory_after_load": sweep and sweep["memory_after_load"], "variants": variants,
        "ratio": ratio,
        "load_average": os.getloadavg(),
        "lost": sum(c["lost"] for c in every),
        "answered_twice": sum(c["answered_twice"] for c in every),
    }  # fmt: skip
    print(json.dumps({k: result[k] for k in ("lost", "answered_twice", "memory_after_load")},
                     indent=1))  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot and cells:
        _plot(cells, args.plot)


if __name__ == "__main__":
    main()
