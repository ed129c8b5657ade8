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
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    if args.variants and "plain" not in args.variants:
        parser.error("--variants needs plain: the others are measured against it")
    most = max([*args.clients, args.variant_clients])
    options = ServeOptions(
        port=args.port, tasks=[str(args.task)], ep_size=args.ep_size, max_batch=args.max_batch,
        max_ongoing_requests=most, max_queued_requests=most, max_tokens=max(64, args.max_tokens),
    )  # fmt: skip
    config = ServeConfig(checkpoint=args.checkpoint, serve=options)
    variants: dict[str, Any] | None = None
    try:
        url = start(config, probe=True)
        if args.variants:
            variants = _variant_rounds(url, f"task-{args.task}", args.task, args)
            print(json.dumps(variants["summary"], indent=1), flush=True)
        sweep = None if args.variants_only else _sweep(url, args)
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
