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

The backend is NCCL when CUDA is present, else gloo (`--backend` overrides). Reading
torchrun's environment here is the launcher's job, not library code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from comm.alltoall import FlatAllToAll, HierarchicalAllToAll, exchange_counts
from comm.topology import ProcessGroups, Topology, build_process_groups

OPS = {
    "alltoall": ["raw", "flat", "hierarchical", "memcpy"],
    "dispatch": ["raw", "flat", "hierarchical"],
    "allreduce": ["raw"],
}


@dataclass(frozen=True)
class Options:
    nproc: int
    ranks_per_node: int
    min_bytes: int
    max_bytes: int
    factor: int
    ops: tuple[str, ...]
    iters: int
    warmup: int
    row_bytes: int
    skew: float
    backend: str
    json_path: str | None
    threads: int


@dataclass
class Case:
    """One (op, algo) at one size: `run` does the timed work and returns the result,
    `expected` is what it must equal, `reset` restores in-place inputs (not timed)."""

    op: str
    algo: str
    nbytes: int
    count: int
    run: Callable[[], torch.Tensor | None]
    expected: torch.Tensor | None
    reset: Callable[[], None] = lambda: None
    times_s: list[float] = field(default_factory=list)
    wrong: int = 0


def _pattern(src: int, count: int, device: torch.device) -> torch.Tensor:
    """Distinct, exactly representable float32 values per source rank."""
    base = torch.arange(count, device=device, dtype=torch.int64) * 7 + src * 1_000_003
    return (base % 16_777_213).to(torch.float32)


def _dispatch_counts(size: int, rows: int, skew: float, seed: int) -> torch.Tensor:
    """counts_PP[src, dst]: rows src sends to dst when each row picks one of 4 * size
    experts with Zipf popularity (expert e on rank e // 4)."""
    experts = 4 * size
    popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** skew
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(size, size, dtype=torch.int64)
    for src in range(size):
        if rows == 0:
            continue
        picks = torch.multinomial(popularity, rows, replacement=True, generator=gen)
        counts[src] = torch.bincount(picks // 4, minlength=size)
    return counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_cases(
    nbytes: int, opts: Options, groups: ProcessGroups, device: torch.device
) -> list[Case]:
    rank, size = groups.rank, groups.topology.world_size
    cases: list[Case] = []
    count = max(size, (nbytes // 4) // size * size)
    chunk = count // size
    split = [chunk] * size
    if "alltoall" in opts.ops:
        x = _pattern(rank, count, device)
        expected = torch.cat(
            [_pattern(src, count, device)[rank * chunk : (rank + 1) * chunk] for src in range(size)]
        )
        out = torch.empty_like(x)
        flat = FlatAllToAll(groups.ep)
        hier = HierarchicalAllToAll(groups.ep_intra, groups.ep_inter)

        def raw() -> torch.Tensor:
            dist.all_to_all_single(out, x, split, split, group=groups.ep)
            return out

        def raw_alloc() -> torch.Tensor:
            fresh = torch.empty_like(x)
            dist.all_to_all_single(fresh, x, split, split, group=groups.ep)
            return fresh

        runs: dict[str, Callable[[], torch.Tensor | None]] = {
            "raw": raw,
            "raw_alloc": raw_alloc,
            "flat": lambda: flat.exchange(x, split, split),
            "hierarchical": lambda: hier.exchange(x, split, split),
        }
        for algo, run in runs.items():
            cases.append(Case("alltoall", algo, count * 4, count, run, expected))
        copy_out = torch.empty_like(x)

        def memcpy() -> torch.Tensor | None:
            if rank == 0:
                copy_out.copy_(x)
                return copy_out
            return None

        cases.append(Case("alltoall", "memcpy", count * 4, count, memcpy, x if rank == 0 else None))
    if "dispatch" in opts.ops:
        row_elems = max(1, opts.row_bytes // 4)
        rows = max(1, nbytes // (row_elems * 4))
        counts_PP = _dispatch_counts(size, rows, opts.skew, seed=nbytes)
        x_RD = _pattern(rank, rows * row_elems, device).view(rows, row_elems)
        pieces = []
        for src in range(size):
            start = int(counts_PP[src, :rank].sum())
            src_rows = _pattern(src, rows * row_elems, device).view(rows, row_elems)
            pieces.append(src_rows[start : start + int(counts_PP[src, rank])])
        expected_rows = torch.cat(pieces)
        send_P1 = counts_PP[rank].view(size, 1).to(device)
        flat = FlatAllToAll(groups.ep)
        hier = HierarchicalAllToAll(groups.ep_intra, groups.ep_inter)

        def dispatch_raw() -> torch.Tensor:
            recv = exchange_counts(send_P1, groups.ep).view(-1).tolist()
            out = x_RD.new_empty((sum(recv), row_elems))
            dist.all_to_all_single(out, x_RD, recv, counts_PP[rank].tolist(), group=groups.ep)
            return out

        def via(algo: FlatAllToAll | HierarchicalAllToAll) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                recv = exchange_counts(send_P1, groups.ep).view(-1)
                return algo.exchange(x_RD, counts_PP[rank], recv)

            return run

        mean_bytes = rows * row_elems * 4
        for algo, run in {
            "raw": dispatch_raw,
            "flat": via(flat),
            "hierarchical": via(hier),
        }.items():
            cases.append(Case("dispatch", algo, mean_bytes, rows * row_elems, run, expected_rows))
    if "allreduce" in opts.ops:
        # Small integers, so every partial sum is exact in float32 whatever the order.
        source = _pattern(rank, count, device) % 4093
        buffer = source.clone()
        total = sum(_pattern(src, count, device).to(torch.float64) % 4093 for src in range(size))
        assert isinstance(total, torch.Tensor)

        def allreduce() -> torch.Tensor:
            dist.all_reduce(buffer, group=groups.world)
            return buffer

        def reset() -> None:
            buffer.copy_(source)

        cases.append(
            Case("allreduce", "raw", count * 4, count, allreduce, total.to(torch.float32), reset)
        )
    return cases


def _bus_factor(op: str, size: int) -> float:
    if op == "allreduce":
        return 2 * (size - 1) / size
    if op == "memcpy":
        return 1.0
    return (size - 1) / size


def _measure(opts: Options, groups: ProcessGroups, device: torch.device) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    size = groups.topology.world_size
    nbytes = opts.min_bytes
    while nbytes <= opts.max_bytes:
        cases = _make_cases(nbytes, opts, groups, device)
        for step in range(opts.warmup + opts.iters):
            for case in cases:
                case.reset()
                _sync(device)
                dist.barrier(group=groups.world)
                start = time.perf_counter()
                result = case.run()
                _sync(device)
                elapsed = time.perf_counter() - start
                if step >= opts.warmup:
                    case.times_s.append(elapsed)
                if case.expected is not None:
                    assert result is not None
                    if result.shape != case.expected.shape:
                        case.wrong += case.expected.numel()
                    else:
                        case.wrong += int((result != case.expected).sum())
        for case in cases:
            times = torch.tensor(case.times_s, dtype=torch.float64, device=device)
            slowest = [torch.empty_like(times) for _ in range(size)]
            dist.all_gather(slowest, times, group=groups.world)
            per_iter = torch.stack(slowest).amax(0).tolist()
            wrong = torch.tensor([case.wrong], device=device)
            dist.all_reduce(wrong, group=groups.world)
            time_s = statistics.median(per_iter)
            algbw = case.nbytes / time_s / 1e9
            factor = _bus_factor("memcpy" if case.algo == "memcpy" else case.op, size)
            rows.append(
                {
                    "op": case.op,
                    "algo": case.algo,
                    "bytes": case.nbytes,
                    "count": case.count,
                    "type": "float32",
                    "time_us": time_s * 1e6,
                    "algbw_GBps": algbw,
                    "busbw_GBps": algbw * factor,
                    "wrong": int(wrong.item()),
                }
            )
        nbytes *= opts.factor
    return rows


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


def _worker(rank: int, opts: Options, port: int | None) -> None:
    torch.set_num_threads(opts.threads)
    use_cuda = opts.backend == "nccl"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=120)
    if port is None:
        dist.init_process_group(opts.backend, timeout=timeout)
    else:
        dist.init_process_group(
            opts.backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=opts.nproc,
            timeout=timeout,
        )
    try:
        world = dist.get_world_size()
        groups = build_process_groups(Topology(world, opts.ranks_per_node, world), device=device)
        rows = _measure(opts, groups, device)
        if groups.rank == 0:
            print(
                f"# comm.bench: nproc={world} ranks_per_node={opts.ranks_per_node} "
                f"backend={opts.backend} iters={opts.iters} warmup={opts.warmup}"
            )
            _print_table(rows)
            if opts.json_path:
                with open(opts.json_path, "w") as handle:
                    json.dump(
                        {
                            "nproc": world,
                            "ranks_per_node": opts.ranks_per_node,
                            "backend": opts.backend,
                            "iters": opts.iters,
                            "row_bytes": opts.row_bytes,
                            "skew": opts.skew,
                            "rows": rows,
                        },
                        handle,
                        indent=1,
                    )
    finally:
        dist.destroy_process_group()


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
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    ops = tuple(o for o in args.ops.split(",") if o)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; accepted: {', '.join(OPS)}")
    if args.factor < 2 or args.min_bytes < 4 or args.max_bytes < args.min_bytes:
        parser.error("need --factor >= 2 and 4 <= --min-bytes <= --max-bytes")
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    return Options(
        args.nproc,
        args.ranks_per_node,
        args.min_bytes,
        args.max_bytes,
        args.factor,
        ops,
        args.iters,
        args.warmup,
        args.row_bytes,
        args.skew,
        backend,
        args.json_path,
        args.threads,
    )


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        _worker(int(os.environ["RANK"]), opts, None)
        return
    Topology(opts.nproc, opts.ranks_per_node, opts.nproc)  # fail early, before spawning
    sock_port = _free_port()
    mp.start_processes(_worker, args=(opts, sock_port), nprocs=opts.nproc, start_method="spawn")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()
