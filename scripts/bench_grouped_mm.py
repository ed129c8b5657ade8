"""One CPU grouped matmul (forward only) five ways, interleaved, median of rounds.

    OMP_NUM_THREADS=2 python scripts/bench_grouped_mm.py [--experts 64] [--rows 16384]

- ops:    `moe.ops.grouped_mm_torch` (row blocks shared out to the block workers)
- loop:   a `torch.mm` per row block on the calling thread (each mm uses every
          intra-op thread: the CPU path before the block workers)
- padded: the blocks padded to the largest into [E, C, D] and one `torch.bmm`
- torch:  `torch._grouped_mm` (torch's own grouped matmul; a C++ loop on CPU)
- dense:  one matmul of the same FLOPs (rows x D @ D x H): the floor
Routing: each row's expert uniform at random (seed 0). Results are checked against
`loop` before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moe.ops.cpu import _layout, grouped_mm_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rows", type=int, default=16384, help="routed rows (T * K)")
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-out", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", metavar="PATH", help="write the medians here")
    args = parser.parse_args()
    E, R, D, H = args.experts, args.rows, args.d_in, args.d_out
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.randint(0, E, (R,), generator=gen), minlength=E)
    x, w = torch.randn(R, D, generator=gen), torch.randn(E, D, H, generator=gen)
    expert_of_row = torch.repeat_interleave(torch.arange(E), counts)
    position = torch.arange(R) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    capacity = int(counts.max())
    offsets = torch.cumsum(counts, 0).to(torch.int32)

    def loop() -> torch.Tensor:
        y = x.new_empty(R, H)
        for expert, start, stop in _layout(counts, R).blocks:
            torch.mm(x[start:stop], w[expert], out=y[start:stop])
        return y

    def padded() -> torch.Tensor:
        x_ECD = x.new_zeros(E, capacity, D)
        x_ECD[expert_of_row, position] = x
        return torch.bmm(x_ECD, w)[expert_of_row, position]

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "ops": lambda: grouped_mm_torch(x, w, counts),
        "loop": loop,
        "padded": padded,
        "torch": lambda: torch._grouped_mm(x, w, offs=offsets),
        "dense": lambda: x @ w[0],
    }
    reference = loop()
    for name in ("ops", "padded", "torch"):
        torch.testing.assert_close(variants[name](), reference, rtol=1e-4, atol=1e-3)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds + 1):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            if round_index:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    print(f"# E={E} rows={R} D={D} H={H} threads={torch.get_num_threads()} "
          f"max rows per expert {capacity} (mean {R / E:.0f})")  # fmt: skip
    floor = statistics.median(times["dense"])
    medians_ms = {}
    for name, values in times.items():
        median = statistics.median(values)
        medians_ms[name] = median * 1e3
        print(f"{name:>7} {median * 1e3:8.1f} ms  {median / floor:5.2f} x dense")
    if args.json:
        record = {
            "command": " ".join(["python scripts/bench_grouped_mm.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average": os.getloadavg()[0],
            "threads": torch.get_num_threads(),
            "shape": {"E": E, "rows": R, "D": D, "H": H, "max_rows_per_expert": capacity},
            "median_ms": medians_ms,
            "over_dense": {name: ms / (floor * 1e3) for name, ms in medians_ms.items()},
        }
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
