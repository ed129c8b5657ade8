"""Where an E=64 MoE layer step goes on this CPU: the figures behind the explanations in
docs/BENCHMARKS.md ("MoE layer"), each measured here rather than quoted.

    OMP_NUM_THREADS=2 python scripts/layer_anatomy.py --json docs/results/layer_anatomy.json

Parts (each can be run alone with `--only`):
- host:      fp32 matmul rate, 2048^3, at 1 and 2 threads (GFLOP/s).
- slicing:   one grouped matmul forward + backward, E=64, 256 rows per expert, D=H=512:
             slicing the stacked weight per expert inside autograd (`x_e @ w[e]`) against
             the `moe::grouped_mm` op (one [E, D, H] gradient): why the experts
             are one op (docs/ARCHITECTURE.md, `moe.ops`).
- profile:   torch.profiler of the bench_layer E=64 step (our dropless layer) and of its
             dense floor: self CPU time by op, and the matmul rate of the expert matmuls
             against the dense FFN's.
- fine_profile: the same for the fine-grained E=128, K=8, H=64 step of
             `bench_layer.py --fine-grained` (our dropless layer, the experts folding the
             permute into their matmuls: `moe.ops.fused`), against its dense floor.
- demo_profile: the same for one MoE layer of the demo model (T=4096, D=H=128, E=8,
             K=2, fixed capacity C=1.25 as the demo trains) and its dense FFN, with the
             number of ops per step.
- allocator: the same two steps in subprocesses with and without
             GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295
             (heap reuse instead of a fresh page-faulted mmap per large buffer).
- load:      64 per-expert matmuls (256 x 512 @ 512 x 512) against one dense matmul of
             the same FLOPs, at 1 and 2 threads, with 0 and 2 busy-looping background
             processes: how a contended core hurts many small OpenMP regions.
Times are medians of interleaved rounds (`scripts/_bench_utils.py`); the JSON keeps every
median and the load average when each part started.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _bench_utils import interleaved_times, median_ms
from bench_layer import FINE_GRAINED_CONFIGS, FULL_CONFIGS, BenchConfig, build_runner

from moe.ops import POOL_MIN_BLOCKS, grouped_mm

PARTS = ("host", "slicing", "profile", "fine_profile", "demo_profile", "allocator", "load")
HEAP_REUSE = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
E64 = next(cfg for cfg in FULL_CONFIGS if cfg.name == "E64")
E128_K8 = next(cfg for cfg in FINE_GRAINED_CONFIGS if cfg.name == "E128-K8")
# One MoE layer of the demo model (`model=small`, a batch of 32 x 128 tokens).
DEMO = BenchConfig("demo", D=128, H=128, E=8, K=2, T=4096)


def _load() -> float:
    return os.getloadavg()[0]


def host_rate(rounds: int) -> dict:
    """GFLOP/s of a 2048^3 fp32 matmul at 1 and 2 threads."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    out: dict = {"load_average": _load()}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times = interleaved_times({"mm": lambda: torch.mm(a, b)}, rounds)
        out[f"gflops_{threads}_threads"] = 2 * n**3 / (median_ms(times["mm"]) / 1e3) / 1e9
    torch.set_num_threads(2)
    return out


def slicing(rounds: int) -> dict:
    """Per-expert slicing inside autograd vs the grouped op, forward + backward."""
    E, rows, D, H = 64, 256, 512, 512
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(E * rows, D, generator=gen, requires_grad=True)
    w = torch.randn(E, D, H, generator=gen, requires_grad=True)
    counts = torch.full((E,), rows, dtype=torch.int64)
    dy = torch.randn(E * rows, H, generator=gen)

    def sliced() -> None:
        pieces = [x[e * rows : (e + 1) * rows] @ w[e] for e in range(E)]
        torch.autograd.backward(torch.cat(pieces), dy)

    def op() -> None:
        torch.autograd.backward(grouped_mm(x, w, counts), dy)

    def drop() -> None:
        x.grad, w.grad = None, None

    load = _load()
    times = interleaved_times(
        {"sliced": sliced, "op": op}, rounds, before_each={"sliced": drop, "op": drop}
    )
    return {
        "load_average": load,
        "shape": {"E": E, "rows_per_expert": rows, "D": D, "H": H},
        "sliced_ms": median_ms(times["sliced"]),
        "op_ms": median_ms(times["op"]),
    }


def _category(name: str) -> str:
    # The grouped ops run their per-expert mm on worker threads the profiler does not
    # record, so each grouped op's self time is its matmul work (and the backward node's
    # self time holds the data-gradient matmul it runs directly).
    if "grouped_mm" in name:
        return "expert matmuls"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "other matmuls"
    permute = ("aten::index_select", "aten::embedding_bag", "aten::_embedding_bag",
               "aten::scatter_add_", "aten::index", "aten::index_add_")  # fmt: skip
    if name.startswith("moe::") or name in permute or "embedding_bag" in name:
        return "permute / combine"
    routing = ("softmax", "topk", "sort", "aten::log", "cumsum", "one_hot", "bincount")
    if any(word in name for word in routing):
        return "routing"
    return "other"


def profile(steps: int, cfg: BenchConfig = E64, moe: str = "moe") -> dict:
    """Self CPU time per op (ms per step) and ops per step for our layer (`moe`: dropless,
    or `moe_capacity`: C=1.25) and the dense floor, on config `cfg` (default E=64)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    flops_per_step = 3 * 2 * cfg.T * cfg.K * cfg.D * cfg.H * 2  # fwd + 2 bwd, two matmuls
    out: dict = {"load_average": _load(), "config": vars(cfg) | {}, "moe": moe}
    for implementation in (moe, "dense"):
        runner = build_runner(implementation, cfg)
        runner.step()
        runner.zero_grad()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                runner.step()
                runner.zero_grad()
        by_op: dict[str, float] = defaultdict(float)
        ops_per_step = 0.0
        for event in prof.key_averages():
            by_op[event.key] += event.self_cpu_time_total / 1e3 / steps
            ops_per_step += event.count / steps
        categories: dict[str, float] = defaultdict(float)
        for name, ms in by_op.items():
            categories[_category(name)] += ms
        matmul_ms = categories["other matmuls"]
        if implementation == moe and cfg.E >= POOL_MIN_BLOCKS:
            matmul_ms = categories["expert matmuls"]
        # else: fewer blocks than POOL_MIN_BLOCKS run their `mm`s on the calling thread,
        # recorded as aten::mm (with the router's, which are counted in here too).
        out[implementation] = {
            "total_ms": sum(by_op.values()),
            "ops_per_step": ops_per_step,
            "by_category_ms": dict(categories),
            "top_ops_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:15]),
            "matmul_gflops": flops_per_step / (matmul_ms / 1e3) / 1e9 if matmul_ms else None,
        }
    return out


def _step_times_subprocess(env_extra: dict[str, str], rounds: int) -> dict:
    env = dict(os.environ, **env_extra)
    command = [sys.executable, __file__, "--only", "_steps", "--rounds", str(rounds)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def steps(rounds: int) -> dict:
    """Median ms of the E=64 dropless step and of the dense floor (run in a subprocess)."""
    runners = {name: build_runner(name, E64) for name in ("moe", "dense")}
    times = interleaved_times(
        {name: runner.step for name, runner in runners.items()},
        rounds,
        before_each={name: runner.zero_grad for name, runner in runners.items()},
    )
    return {name: median_ms(values) for name, values in times.items()}


def allocator(rounds: int) -> dict:
    load = _load()
    default = _step_times_subprocess({}, rounds)
    reuse = _step_times_subprocess({"GLIBC_TUNABLES": HEAP_REUSE}, rounds)
    return {
        "load_average": load,
        "default_ms": default,
        "heap_reuse_ms": reuse,
        "GLIBC_TUNABLES": HEAP_REUSE,
        "moe_over_dense_default": default["moe"] / default["dense"],
        "moe_over_dense_heap_reuse": reuse["moe"] / reuse["dense"],
    }


def _spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        pass


def load_effect(rounds: int) -> dict:
    E, rows, D, H = 64, 256, 512, 512
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(rows, D, generator=gen) for _ in range(E)]
    w = torch.randn(E, D, H, generator=gen)
    x_all = torch.cat(xs)
    w_dense = torch.randn(D, H, generator=gen)

    def per_expert() -> None:
        for e in range(E):
            torch.mm(xs[e], w[e])

    def dense() -> None:
        torch.mm(x_all, w_dense)

    out: dict = {"load_average": _load(), "shape": {"E": E, "rows": rows, "D": D, "H": H}}
    for background in (0, 2):
        stop = multiprocessing.get_context("spawn").Event()
        spinners = [
            multiprocessing.get_context("spawn").Process(target=_spin, args=(stop,))
            for _ in range(background)
        ]
        for spinner in spinners:
            spinner.start()
        time.sleep(0.5 if background else 0.0)
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                times = interleaved_times({"per_expert": per_expert, "dense": dense}, rounds)
                out[f"background_{background}_threads_{threads}"] = {
                    name: median_ms(values) for name, values in times.items()
                }
        finally:
            stop.set()
            for spinner in spinners:
                spinner.join()
    torch.set_num_threads(2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=(*PARTS, "_steps"), help="run one part only")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.only == "_steps":
        print(json.dumps(steps(args.rounds)))
        return
    runs = {
        "host": lambda: host_rate(args.rounds),
        "slicing": lambda: slicing(args.rounds),
        "profile": lambda: profile(max(2, args.rounds // 2)),
        "fine_profile": lambda: profile(max(2, args.rounds // 2), E128_K8),
        "demo_profile": lambda: profile(10, DEMO, "moe_capacity"),
        "allocator": lambda: allocator(args.rounds),
        "load": lambda: load_effect(args.rounds),
    }
    chosen = [args.only] if args.only else list(PARTS)
    result: dict = {
        "command": " ".join(["python scripts/layer_anatomy.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    for part in chosen:
        print(f"# {part} ...", file=sys.stderr, flush=True)
        result[part] = runs[part]()
        print(json.dumps({part: result[part]}, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
