"""Where the time of one flat exchange goes, layer by layer, at one message size.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 scripts/bench_alltoall_overhead.py [--bytes N]

Each variant adds one layer on top of the previous one:
  pre      all_to_all_single into a preallocated output (the nccl-tests floor)
  fresh    the same into a fresh torch.empty_like output
  helper   comm.alltoall's raw helper (split lists, new_empty, contiguous)
  planrun  a prepared FlatPlan's run (the counts fixed beforehand)
  exchange FlatAllToAll.exchange (builds the plan from the counts, then runs it)
  autograd the same on an input that requires grad (through the autograd node)
Variants run in a shuffled order each round (the same order on every rank), 5 calls
back to back per sample after a barrier; the table gives percentiles of rank 0's
per-call time. Results are checked against the preallocated floor once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from comm.alltoall import FlatAllToAll, _all_to_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=int, default=1 << 20, help="bytes each rank sends")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--json", metavar="PATH", help="write rank 0's percentiles here")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    count = max(world, args.bytes // 4 // world * world)
    split = [count // world] * world
    x = torch.randn(count, generator=torch.Generator().manual_seed(rank))
    x_grad = x.clone().requires_grad_(True)
    out = torch.empty_like(x)
    group = dist.group.WORLD
    assert group is not None
    flat = FlatAllToAll(group)
    plan = flat.plan(split, split, x.device)

    def fresh() -> torch.Tensor:
        result = torch.empty_like(x)
        dist.all_to_all_single(result, x, split, split, group=group)
        return result

    def pre() -> torch.Tensor:
        dist.all_to_all_single(out, x, split, split, group=group)
        return out

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "pre": pre,
        "fresh": fresh,
        "helper": lambda: _all_to_all(x, split, split, group),
        "planrun": lambda: plan.run(x, False),
        "exchange": lambda: flat.exchange(x, split, split),
        "autograd": lambda: flat.exchange(x_grad, split, split),
    }
    reference = pre().clone()
    for name, run in variants.items():
        assert torch.equal(run().detach(), reference), name
    times: dict[str, list[float]] = {name: [] for name in variants}
    order_rng = random.Random(0)
    for round_index in range(args.rounds):
        order = list(variants.items())
        order_rng.shuffle(order)
        for name, run in order:
            dist.barrier(group=group)
            start = time.perf_counter()
            for _ in range(5):
                run()
            if round_index >= args.rounds // 20:
                times[name].append((time.perf_counter() - start) / 5)
    if rank == 0:
        print(f"# {world} ranks, {count * 4} bytes per rank, per-call time (us), rank 0")
        floor = sorted(times["pre"])[len(times["pre"]) // 2]
        rows = {}
        for name, values in times.items():
            values.sort()

            def at(q: float, v: list[float] = values) -> float:
                return v[int(q * (len(v) - 1))] * 1e6

            rows[name] = {"p10_us": at(0.1), "p50_us": at(0.5), "p90_us": at(0.9)}
            rows[name]["p50_over_pre"] = at(0.5) / (floor * 1e6)
            print(
                f"{name:>9}  p10 {at(0.1):7.0f}  p50 {at(0.5):7.0f}  p90 {at(0.9):7.0f}"
                f"  p50/pre {at(0.5) / (floor * 1e6):5.2f}"
            )
        if args.json:
            record = {
                "command": " ".join(["torchrun scripts/bench_alltoall_overhead.py", *sys.argv[1:]]),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "load_average": os.getloadavg()[0],
                "world_size": world,
                "bytes_per_rank": count * 4,
                "rounds": args.rounds,
                "variants": rows,
            }
            Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
