"""Benchmark of one MoE layer on CPU: forward + backward, side by side in one run, in
fp32 or (`--dtype bf16`) in mixed precision.

Implementations (same input, same upstream gradient, gradients dropped between steps):
- moe:          our `MoELayer`, top-2 softmax router, dropless;
- moe_capacity: our `MoELayer`, fixed capacity C=1.25;
- dense:        a dense FFN of hidden width K*H with the same activation (the physical
                floor: the same active parameters and matmul FLOPs per token, no routing);
- deepspeed:    `deepspeed.moe.layer.MoE` (k=2, capacity_factor=1.25, ep_size=1) with an
                expert of the same shape, on CPU (`DS_ACCELERATOR=cpu`, a 1-rank gloo group).

`--fine-grained` times instead the shapes of OLMoE, Qwen3-MoE and DeepSeek (top-8 of 64,
128 and 256 narrow experts, T=4096, D=512): our layer dropless (`moe`), the same layer
with the experts on the permuted rows (`moe_unfolded`: gather, grouped matmuls, weighted
combine as separate passes, the layout every configuration used before the experts
folded the permute into their matmuls) and the dense floor. `--with-one-tier` adds
`moe_one_tier`: our layer with the bf16 padded blocks in one tier (every expert padded
to the largest), to measure the second tier in the same run.

`--dtype bf16` runs every implementation as a bf16 training step runs
(`train.precision=bf16`): fp32 parameters (the master weights), the forward under
`torch.autocast("cpu", torch.bfloat16)`, fp32 input and upstream gradient. It adds
- moe_bf16_params: our layer with bf16 parameters and a bf16 input, no autocast: the
                other way to train in bf16 (bf16 parameter copies beside fp32 masters,
                the copy and the master update not timed), measured against autocast;
- moe_fp32:     our layer in fp32 (no autocast), the same run: bf16's speed-up.

Times are medians over interleaved rounds (each round runs every implementation once; the
starting one rotates). Peak memory is the peak resident set size above the resident set
after setup, one implementation per subprocess (see `scripts/_bench_utils.py`).

    python scripts/bench_layer.py [--quick] [--json PATH] [--plot PATH] [--repeats N]
        [--allocator reuse|default] [--dtype fp32|bf16] [--fine-grained]

`--allocator reuse` (the default) sets glibc's malloc the way a training run does
(`train.reuse_heap`, `launch.training.allocator`): freed blocks stay in the heap instead of
going back to the kernel, for every implementation alike; `default` leaves glibc's.

Shapes: T tokens, D model width, H expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# DeepSpeed picks its accelerator when it is first imported; a script may set it.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _bench_layer_report import format_fine_grained_table, format_table, plot_ratios
from _bench_utils import (
    free_port,
    interleaved_times,
    peak_rss_above_baseline_mb,
    round_ratio_median,
)

from launch.training.allocator import reuse_heap
from moe.experts import DenseMLP
from moe.layer import MoELayer
from moe.ops import padded_blocks
from moe.precision import BF16_CPU_FLAGS, cpu_flags
from routing import RoutingConfig

IMPLEMENTATIONS = ("moe", "moe_capacity", "dense", "deepspeed")
BF16_ONLY = ("moe_bf16_params", "moe_fp32")
FINE_GRAINED = ("moe", "moe_unfolded", "dense")
CAPACITY_FACTOR = 1.25


def implementations(
    dtype: str, fine_grained: bool = False, unfolded: bool = False, one_tier: bool = False
) -> list[str]:
    if fine_grained:
        return list(FINE_GRAINED) + (["moe_one_tier"] if one_tier else [])
    names = list(IMPLEMENTATIONS) + (list(BF16_ONLY) if dtype == "bf16" else [])
    return names + (["moe_unfolded"] if unfolded else [])


@dataclass(frozen=True)
class BenchConfig:
    name: str
    D: int
    H: int
    E: int
    K: int
    T: int


FULL_CONFIGS = (
    BenchConfig("E8", D=512, H=1024, E=8, K=2, T=4096),
    BenchConfig("E64", D=512, H=512, E=64, K=2, T=8192),
)
QUICK_CONFIGS = (
    BenchConfig("quick-E8", D=64, H=128, E=8, K=2, T=512),
    BenchConfig("quick-E32", D=64, H=64, E=32, K=2, T=1024),
)
# Top-8 of many narrow experts (OLMoE, Qwen3-MoE, DeepSeek-V3); the dense floor is K*H = 512 wide.
FINE_GRAINED_CONFIGS = (
    BenchConfig("E64-K8", D=512, H=128, E=64, K=8, T=4096),
    BenchConfig("E128-K8", D=512, H=64, E=128, K=8, T=4096),
    BenchConfig("E256-K8", D=512, H=32, E=256, K=8, T=4096),
)
QUICK_FINE_GRAINED_CONFIGS = (
    BenchConfig("quick-E64-K8", D=64, H=16, E=64, K=8, T=512),
    BenchConfig("quick-E128-K8", D=64, H=8, E=128, K=8, T=512),
)


class Runner:
    """One implementation on one config: `step()` runs forward + backward (the forward
    under bf16 autocast when `autocast`; the input and upstream gradient in `dtype`)."""

    def __init__(
        self,
        module: nn.Module,
        forward: Callable[[Tensor], list[Tensor]],
        cfg: BenchConfig,
        autocast: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        generator = torch.Generator().manual_seed(1)
        self.module = module.train()
        self.forward = forward
        self.autocast = autocast
        x_TD = torch.randn(cfg.T, cfg.D, generator=generator)
        self.x_TD = x_TD.to(dtype).requires_grad_(True)
        self.dy_TD = torch.randn(cfg.T, cfg.D, generator=generator)

    def zero_grad(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.x_TD.grad = None

    def step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            outputs = self.forward(self.x_TD)
        # The output gets a fixed random upstream gradient; auxiliary losses get 1.
        grads = [self.dy_TD.to(outputs[0].dtype)] + [torch.ones_like(aux) for aux in outputs[1:]]
        torch.autograd.backward(outputs, grads)


def init_deepspeed_single_rank() -> None:
    """A 1-rank gloo group for deepspeed.comm (DeepSpeed's MoE asks for its groups even
    at ep_size=1). Idempotent."""
    import deepspeed
    from deepspeed import comm

    if not comm.is_initialized():
        deepspeed.init_distributed(
            dist_backend="gloo",
            auto_mpi_discovery=False,
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
            verbose=False,
        )


def _in_one_tier(step: Callable[[], None]) -> Callable[[], None]:
    """`step` with the padded blocks' second tier off (no tier saves all the places)."""

    def one_tier_step() -> None:
        saving = padded_blocks.OVERFLOW_MIN_SAVING
        padded_blocks.OVERFLOW_MIN_SAVING = 1.0
        try:
            step()
        finally:
            padded_blocks.OVERFLOW_MIN_SAVING = saving

    return one_tier_step


def build_runner(implementation: str, cfg: BenchConfig, dtype: str = "fp32") -> Runner:
    torch.manual_seed(0)
    autocast = dtype == "bf16"
    if implementation == "moe_one_tier":
        runner = build_runner("moe", cfg, dtype)
        runner.step = _in_one_tier(runner.step)  # type: ignore[method-assign]
        return runner
    if implementation in ("moe", "moe_capacity", "moe_bf16_params", "moe_fp32", "moe_unfolded"):
        routing = RoutingConfig(
            top_k=cfg.K,
            capacity="fixed" if implementation == "moe_capacity" else "dropless",
            capacity_factor=CAPACITY_FACTOR,
        )
        layer = MoELayer(cfg.D, cfg.H, cfg.E, routing, activation="gelu")
        if implementation == "moe_unfolded":
            layer.fold_permute = False

        def moe_forward(x_TD: Tensor) -> list[Tensor]:
            out = layer(x_TD)
            return [out.y, out.aux_loss]

        if implementation == "moe_bf16_params":
            return Runner(layer.to(torch.bfloat16), moe_forward, cfg, dtype=torch.bfloat16)
        return Runner(layer, moe_forward, cfg, autocast and implementation != "moe_fp32")
    if implementation == "dense":
        mlp = DenseMLP(cfg.D, cfg.K * cfg.H, activation="gelu")
        return Runner(mlp, lambda x_TD: [mlp(x_TD)], cfg, autocast)
    if implementation == "deepspeed":
        init_deepspeed_single_rank()
        from deepspeed.moe.layer import MoE

        expert = nn.Sequential(
            nn.Linear(cfg.D, cfg.H, bias=False), nn.GELU(), nn.Linear(cfg.H, cfg.D, bias=False)
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per new group
            ds_moe = MoE(
                cfg.D, expert, num_experts=cfg.E, ep_size=1, k=cfg.K,
                capacity_factor=CAPACITY_FACTOR,
            )  # fmt: skip
            ds_moe.set_deepspeed_parallelism()

        def ds_forward(x_TD: Tensor) -> list[Tensor]:
            y_TD, aux_loss, _ = ds_moe(x_TD)
            return [y_TD, aux_loss]

        return Runner(ds_moe, ds_forward, cfg, autocast)
    raise ValueError(f"implementation={implementation!r} is not one of {implementations(dtype)}")


def time_config(
    cfg: BenchConfig,
    names: list[str],
    repeats: int,
    progress: Callable[[], None] | None,
    dtype: str = "fp32",
) -> dict[str, list[float]]:
    """ms of forward + backward of each implementation in every round, interleaved."""
    runners = {name: build_runner(name, cfg, dtype) for name in names}
    times = interleaved_times(
        {name: runner.step for name, runner in runners.items()},
        repeats=repeats,
        warmup=1,
        before_each={name: runner.zero_grad for name, runner in runners.items()},
        on_round=progress,
    )
    return {name: [s * 1e3 for s in seconds] for name, seconds in times.items()}


def peak_memory_here(implementation: str, cfg: BenchConfig, dtype: str = "fp32") -> float:
    """Peak MiB one forward + backward adds over the state after setup and a warm-up step
    (parameters and input in the baseline; gradients, activations and temporaries above)."""
    runner = build_runner(implementation, cfg, dtype)
    runner.step()  # lazy initialisations and thread pools belong to setup
    runner.zero_grad()
    return peak_rss_above_baseline_mb(runner.step)


def peak_memory_subprocess(
    implementation: str, cfg: BenchConfig, threads: int, allocator: str, dtype: str = "fp32"
) -> float:
    command = [
        sys.executable, __file__, "--threads", str(threads), "--allocator", allocator,
        "--peak-of", implementation, "--peak-config", json.dumps(asdict(cfg)), "--dtype", dtype,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"peak-memory run of {implementation} on {cfg.name} failed:\n{done.stderr}"
        )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the ratios")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default 9; 5 quick)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--allocator", choices=("reuse", "default"), default="reuse",
        help="glibc malloc: keep freed blocks (as train.reuse_heap does) or its default",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32",
        help="fp32, or bf16 mixed precision (autocast over fp32 parameters)",
    )  # fmt: skip
    parser.add_argument(
        "--fine-grained", action="store_true",
        help="top-8 of 64, 128, 256 narrow experts: ours, ours unfolded, the dense floor",
    )  # fmt: skip
    parser.add_argument(
        "--with-unfolded", action="store_true",
        help="also time our layer with the experts on the permuted rows (moe_unfolded)",
    )  # fmt: skip
    parser.add_argument(
        "--with-one-tier", action="store_true",
        help="--fine-grained: also time our layer with the padded blocks in one tier",
    )  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--peak-of", choices=IMPLEMENTATIONS + BF16_ONLY + FINE_GRAINED, help=argparse.SUPPRESS
    )
    parser.add_argument("--peak-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    if args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    heap_reused = args.allocator == "reuse" and reuse_heap()
    if args.peak_of is not None:  # child process of peak_memory_subprocess
        cfg = BenchConfig(**json.loads(args.peak_config))
        print(json.dumps({"peak_mb": peak_memory_here(args.peak_of, cfg, args.dtype)}))
        return
    if args.fine_grained:
        configs = QUICK_FINE_GRAINED_CONFIGS if args.quick else FINE_GRAINED_CONFIGS
    else:
        configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS
    repeats = args.repeats or (5 if args.quick else 9)
    progress_bar = None
    if not args.quick:
        from tqdm import tqdm

        progress_bar = tqdm(total=len(configs) * repeats, desc="timing rounds", file=sys.stderr)
    rows = []
    names = implementations(args.dtype, args.fine_grained, args.with_unfolded, args.with_one_tier)
    for cfg in configs:
        rounds = time_config(
            cfg, names, repeats, progress_bar.update if progress_bar else None, args.dtype
        )
        row = asdict(cfg) | {f"{name}_ms": statistics.median(rounds[name]) for name in names}
        row["moe_over_dense_round_median"] = round_ratio_median(rounds["moe"], rounds["dense"])
        if "moe_unfolded" in rounds:
            row["unfolded_over_moe_round_median"] = round_ratio_median(
                rounds["moe_unfolded"], rounds["moe"]
            )
        if "moe_one_tier" in rounds:
            row["one_tier_over_moe_round_median"] = round_ratio_median(
                rounds["moe_one_tier"], rounds["moe"]
            )
        if "moe_fp32" in rounds:
            row["fp32_over_bf16_round_median"] = round_ratio_median(
                rounds["moe_fp32"], rounds["moe"]
            )
        row["round_ms"] = rounds
        for name in ("moe", "dense", "deepspeed" if "deepspeed" in names else "moe_unfolded"):
            row[f"{name}_peak_mb"] = (
                float("nan")
                if args.no_memory
                else peak_memory_subprocess(name, cfg, args.threads, args.allocator, args.dtype)
            )
        rows.append(row)
    if progress_bar is not None:
        progress_bar.close()
    mode = "fp32" if args.dtype == "fp32" else "bf16 autocast over fp32 parameters"
    print(
        f"MoE layer, forward + backward, {mode}, {args.threads} threads, median of {repeats}, "
        f"allocator: {'heap reuse' if heap_reused else 'glibc default'}"
    )
    print(format_fine_grained_table(rows) if args.fine_grained else format_table(rows))
    for row in rows:
        print(
            f"{row['name']}: moe/dense per round, median {row['moe_over_dense_round_median']:.2f}"
            + (
                f"; unfolded/moe {row['unfolded_over_moe_round_median']:.2f}"
                if "unfolded_over_moe_round_median" in row
                else ""
            )
            + (
                f"; one tier/two tiers {row['one_tier_over_moe_round_median']:.2f}"
                if "one_tier_over_moe_round_median" in row
                else ""
            )
        )
    if args.json:
        meta = {
            "threads": args.threads,
            "repeats": repeats,
            "dtype": args.dtype,
            "fine_grained": args.fine_grained,
            "cpu_flags_bf16": sorted(set(cpu_flags()) & set(BF16_CPU_FLAGS)),
            "torch": torch.__version__,
            "capacity_factor": CAPACITY_FACTOR,
            "allocator": "reuse_heap" if heap_reused else "glibc default",
            "load_average": os.getloadavg(),
            "peak_memory": "peak RSS above the RSS after setup, one subprocess each",
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "configs": rows}, indent=2) + "\n")
    if args.plot and not args.fine_grained:
        plot_ratios(rows, args.plot, args.dtype)


if __name__ == "__main__":
    main()
