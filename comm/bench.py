"""`python -m comm.bench`: an nccl-tests-style benchmark of the all-to-all (and friends).

It spawns `--nproc` ranks on 127.0.0.1 (or, started by torchrun, uses the ranks torchrun
made), sweeps message sizes from `--min-bytes` to `--max-bytes` by `--factor`, and for
every size runs the chosen operations interleaved (one iteration of each in turn, after
`--warmup` rounds), checking the result of every iteration. Columns as in nccl-tests:
size (bytes one rank sends), count (elements), type, time (us), algbw = size / time,
busbw (alltoall and dispatch: algbw * (n-1)/n; allreduce: algbw * 2(n-1)/n), #wrong
(elements that differed from the expected result, summed over ranks and iterations).
Time is the median over iterations of the slowest rank's time.

Operations (`--ops`) and their algorithms:
- alltoall: `raw` (`all_to_all_single` called directly into a preallocated output,
  as nccl-tests does: the floor), `raw_alloc` (the same into a fresh output, as any
  function that returns a new tensor must; on CUDA the caching allocator makes the two
  equal, on CPU a fresh MiB-sized buffer costs page faults), `flat` and
  `hierarchical` (through `comm.alltoall`), `memcpy` (one process copying the same
  bytes: the memory floor; the other ranks wait).
- dispatch: the MoE pattern: rows of `--row-bytes` routed to 4 experts per rank with a
  Zipf(`--skew`) popularity, so splits are uneven and some are zero; counts exchange
  plus row exchange, `raw` / `flat` / `hierarchical`. Size is the mean bytes per rank.
- allreduce: `raw` `all_reduce` (sum) over all ranks.

`--dtype` (float32, bfloat16, float16) is the element type moved: bf16 is what the MoE
layer's all-to-all carries under mixed precision (`train.precision=bf16`), half the
bytes of a float32 row. Sizes stay in bytes, so a bf16 row is `--row-bytes` long.

The backend is NCCL when CUDA is present, else gloo (`--backend` overrides). This module
is the command line and the report; `comm.bench_measure` measures and `comm.spawn` starts
the ranks. The JSON records the command line, the date and the host next to the rows.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from comm.bench_measure import DTYPES, OPS, Sweep, measure
from comm.spawn import default_backend, run_on_ranks
from comm.topology import Topology, build_process_groups


@dataclass(frozen=True)
class Options:
    """The command line: what to measure (`sweep`) and how to run it."""

    sweep: Sweep
    nproc: int
    ranks_per_node: int
    backend: str
    json_path: str | None
    threads: int


def _print_table(rows: list[dict[str, object]]) -> None:
    print(
        f"{'op':>10} {'algo':>13} {'size':>10} {'count':>9} {'type':>7} "
        f"{'time(us)':>10} {'algbw':>7} {'busbw':>7} {'#wrong':>6}"
    )
    for r in sorted(rows, key=lambda r: (str(r["op"]), str(r["algo"]), int(str(r["bytes"])))):
        print(
            f"{r['op']:>10} {r['algo']:>13} {r['bytes']:>10} {r['count']:>9} {r['type']:>7} "
            f"{r['time_us']:>10.1f} {r['algbw_GBps']:>7.3f} {r['busbw_GBps']:>7.3f} "
            f"{r['wrong']:>6}"
        )
    by_key = {(r["op"], r["algo"], r["bytes"]): float(str(r["time_us"])) for r in rows}
    print("\n# ratios (time / time of the floor, same size, same run)")
    for (op, algo, nbytes), t in sorted(
        by_key.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), int(str(kv[0][2])))
    ):
        raw = by_key.get((op, "raw", nbytes))
        raw_alloc = by_key.get((op, "raw_alloc", nbytes))
        if algo in ("flat", "hierarchical") and raw:
            line = f"#   {op:>9} {algo:>13} {nbytes:>10} B: {t / raw:5.2f} x raw"
            if raw_alloc:
                line += f", {t / raw_alloc:5.2f} x raw_alloc"
            print(line)


def _report(opts: Options, rows: list[dict[str, object]], world: int) -> None:
    print(
        f"# comm.bench: nproc={world} ranks_per_node={opts.ranks_per_node} "
        f"backend={opts.backend} dtype={opts.sweep.dtype} iters={opts.sweep.iters} "
        f"warmup={opts.sweep.warmup}"
    )
    _print_table(rows)
    if not opts.json_path:
        return
    record = {
        "command": " ".join(["python -m comm.bench", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "torch": torch.__version__,
        },
        "nproc": world,
        "ranks_per_node": opts.ranks_per_node,
        "backend": opts.backend,
        "threads": opts.threads,
        **asdict(opts.sweep),
        "rows": rows,
    }
    with open(opts.json_path, "w") as handle:
        json.dump(record, handle, indent=1)


def _bench_worker(opts: Options, device: torch.device) -> None:
    world = dist.get_world_size()
    groups = build_process_groups(Topology(world, opts.ranks_per_node, world), device=device)
    rows = measure(opts.sweep, groups, device)
    if groups.rank == 0:
        _report(opts, rows, world)


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m comm.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=4,
        help="processes to launch (ignored under torchrun, which sets the world size)",
    )
    parser.add_argument(
        "--ranks-per-node",
        type=int,
        default=2,
        help="ranks per (simulated) node; the hierarchical algorithm needs >= 2 nodes",
    )
    parser.add_argument("--min-bytes", type=int, default=1024, help="smallest send buffer")
    parser.add_argument("--max-bytes", type=int, default=4 << 20, help="largest send buffer")
    parser.add_argument("--factor", type=int, default=4, help="size multiplier per step")
    parser.add_argument(
        "--ops",
        default="alltoall,dispatch,allreduce",
        help=f"comma list of {', '.join(OPS)}",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per size")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations per size")
    parser.add_argument(
        "--row-bytes", type=int, default=1024, help="bytes per row (a token's activation)"
    )
    parser.add_argument(
        "--skew",
        type=float,
        default=1.0,
        help="Zipf exponent of the expert popularity in the dispatch op (0 = uniform)",
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "gloo", "nccl"],
        default="auto",
        help="auto: nccl when CUDA is available, else gloo",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="float32",
        help="element type moved (bfloat16: the all-to-all under mixed precision)",
    )  # fmt: skip
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    ops = tuple(o for o in args.ops.split(",") if o)
    backend = default_backend() if args.backend == "auto" else args.backend
    try:
        sweep = Sweep(
            min_bytes=args.min_bytes,
            max_bytes=args.max_bytes,
            factor=args.factor,
            ops=ops,
            iters=args.iters,
            warmup=args.warmup,
            row_bytes=args.row_bytes,
            skew=args.skew,
            dtype=args.dtype,
        )
    except ValueError as err:
        parser.error(str(err))
    return Options(sweep, args.nproc, args.ranks_per_node, backend, args.json_path, args.threads)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    Topology(opts.nproc, opts.ranks_per_node, opts.nproc)  # fail early, before spawning
    run_on_ranks(
        functools.partial(_bench_worker, opts), opts.nproc, opts.backend, threads=opts.threads
    )


if __name__ == "__main__":
    main()
