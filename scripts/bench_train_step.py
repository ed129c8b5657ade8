"""Training-step throughput: the demo MoE against its dense twin, eager and compiled, in
one process, interleaved; and (`--ep`) whole training runs at EP=1 against EP=2.

Step mode (default): `experiment=demo comm=local`, `model=small` (MoE) and `model=dense`
(its dense twin at equal active parameters), each eager and compiled
(`launch.training.compile.CompiledStep`, inductor). One step = forward, loss, backward, gradient
clipping, AdamW, on the next KJV training batch of the demo's size (32 x 128 bytes; the
sampling is not timed). Each variant is compiled and warmed up first, then trained for
`--pretrain-steps` steps, so that its routing is that of a model in training: a fresh
MoE's router sends most slots to a few experts, and at the demo's fixed capacity C=1.25
the eager step then drops about 45% of them and does that much less expert work (the
figures in docs/BENCHMARKS.md up to 2026-11-26 06:20 UTC were measured so, on one
repeated batch). Then `--rounds` rounds each run every variant for `--steps` steps (the first variant rotates from round to round) and record the
median step time of the round; the figure is the median over rounds. Tokens/s =
batch tokens / step time.

Run modes: `launch.train experiment=demo` runs of `--train-steps` steps, alternated
`--repeats` times, eager or compiled (`--compile`); tokens/s is read from each run's
metrics.jsonl (windows after the first). `--ep`: EP=1 (`comm=local`, one process with 2
threads) against EP=2 (`comm=ep2`, `torchrun --nproc-per-node 2`, 1 thread each).
`--dense`: the MoE (`model=small`) against its dense twin (`model=dense`) at EP=1, the
issue's "training tokens/s" comparison; unlike step mode, the routing is the one
training reaches, not that of a fresh model repeating one batch.

`--profile`: torch.profiler table (by op, self CPU time) of a few eager MoE and dense
steps. Results go to `--json` (docs/results/train_step_*.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _bench_utils import round_ratio_median  # noqa: E402
from _runs import run_demo_training  # noqa: E402

from launch.config import RunConfig, register_configs, to_run_config  # noqa: E402
from launch.training.allocator import reuse_heap  # noqa: E402
from launch.training.compile import CompiledStep  # noqa: E402
from launch.training.optim import (  # noqa: E402
    build_optimizer,
    clip_gradients,
    global_grad_norm,
    split_parameters,
)
from moe.data import build_dataset  # noqa: E402
from moe.transformer import MoETransformer, lm_loss  # noqa: E402


def compose(*overrides: str) -> RunConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = hydra_compose("config", overrides=["experiment=demo", "comm=local", *overrides])
    return to_run_config(cfg)


def make_step(
    model_name: str, compiled: bool
) -> tuple[Callable[[], float], int, CompiledStep | None]:
    """A closure running one full training step on a fixed batch; its tokens per step."""
    config = compose(f"model={model_name}")
    model = MoETransformer(config.model, config.routing, seed=config.train.seed)
    model.train()
    optimizer = build_optimizer(model, config.train)
    split = split_parameters(model)
    dataset = build_dataset(config.data)
    sampler = dataset.sampler(config.train.batch_size, 0, 0, 1, config.data.balance_tasks)
    step_model = CompiledStep(model) if compiled else None
    call = step_model or model

    def step() -> float:
        batch = sampler.next_batch()  # outside the timing; every variant sees the same
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(call(batch.tokens_BT[:, :-1], batch.task_ids_B), batch.tokens_BT[:, 1:]).loss
        loss.backward()
        clip_gradients(split, config.train.grad_clip, global_grad_norm(split, None, 1))
        optimizer.step()
        return time.perf_counter() - started

    tokens = config.train.batch_size * config.data.seq_len
    return step, tokens, step_model


def bench_steps(args: argparse.Namespace) -> dict:
    variants = {}
    for model_name in ("small", "dense"):
        for compiled in (False, True):
            name = f"{'moe' if model_name == 'small' else 'dense'}_{'compiled' if compiled else 'eager'}"
            step, tokens, step_model = make_step(model_name, compiled)
            started = time.perf_counter()
            for _ in range(args.warmup):
                step()
            warm_s = time.perf_counter() - started
            for _ in tqdm(range(args.pretrain_steps), desc=f"pre-train {name}", leave=False):
                step()
            variants[name] = (step, tokens, step_model, warm_s)
            print(f"# {name}: warm-up {args.warmup} steps {warm_s:.1f} s", flush=True)
    names = list(variants)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times = [variants[name][0]() for _ in range(args.steps)]
            rounds[name].append(statistics.median(times))
        print(f"# round {r}: " + " ".join(f"{n}={rounds[n][-1] * 1e3:.1f}ms" for n in names),
              flush=True)  # fmt: skip
    result = {}
    for name in names:
        _, tokens, step_model, warm_s = variants[name]
        median = statistics.median(rounds[name])
        result[name] = {
            "step_ms": median * 1e3,
            "fastest_round_ms": min(rounds[name]) * 1e3,
            "tokens_per_s": tokens / median,
            "round_step_ms": [t * 1e3 for t in rounds[name]],
            "warmup_s": warm_s,
            **(step_model.scalars() if step_model is not None else {}),
        }
    for mode in ("eager", "compiled"):
        moe, dense = rounds[f"moe_{mode}"], rounds[f"dense_{mode}"]
        result[f"moe_over_dense_{mode}"] = (
            result[f"moe_{mode}"]["tokens_per_s"] / result[f"dense_{mode}"]["tokens_per_s"]
        )
        # Per round (the two ran back to back), and fastest against fastest.
        result[f"moe_over_dense_{mode}_round_median"] = round_ratio_median(dense, moe)
        result[f"moe_over_dense_{mode}_fastest"] = min(dense) / min(moe)
    result["compiled_over_eager_moe"] = (
        result["moe_compiled"]["tokens_per_s"] / result["moe_eager"]["tokens_per_s"]
    )
    return result


def profile(args: argparse.Namespace) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for model_name in ("small", "dense"):
        step, _, _ = make_step(model_name, compiled=False)
        for _ in range(3):
            step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(f"## {model_name}, {args.steps} steps\n{table}", flush=True)
        tables[model_name] = table
    return {"profile": tables}


def bench_runs(args: argparse.Namespace) -> dict:
    """Whole training runs, alternated: EP=1 against EP=2 (`--ep`) or the MoE against
    its dense twin at EP=1 (`--dense`); tokens/s from every metrics window after the
    first (compilation and warm-up)."""
    window = max(args.train_steps // 4, 1)
    overrides = [f"train.steps={args.train_steps}", f"train.eval_every={window}"]
    if args.compile:
        overrides.append("train.compile=true")
    # name -> (EP, extra overrides); the figure is numerator / denominator tokens/s.
    if args.ep:
        runs = {"ep1": (1, []), "ep2": (2, [])}
        numerator, denominator = "ep2", "ep1"
    else:
        runs = {"moe": (1, ["model=small"]), "dense": (1, ["model=dense"])}
        numerator, denominator = "moe", "dense"
    windows: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 == 0 else list(runs)[::-1]
            for name in order:
                ep, extra = runs[name]
                records = run_demo_training(
                    ep, [*overrides, *extra], Path(tmp) / f"{name}-{repeat}"
                )
                got = [r["tokens_per_s"] for r in records[1:]]  # the first window: warm-up
                windows[name] += got
                print(f"# repeat {repeat} {name}: {[round(w) for w in got]} tokens/s", flush=True)
    medians = {name: statistics.median(values) for name, values in windows.items()}
    return {
        "compile": args.compile,
        "train_steps": args.train_steps,
        "windows_tokens_per_s": windows,
        "median_tokens_per_s": medians,
        f"{numerator}_over_{denominator}": medians[numerator] / medians[denominator],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--pretrain-steps", type=int, default=100,
        help="step mode: training steps before timing (routing as in training)",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--ep", action="store_true", help="EP=2 against EP=1 training runs")
    parser.add_argument(
        "--dense", action="store_true", help="MoE against dense twin training runs at EP=1"
    )
    parser.add_argument(
        "--compile", action="store_true", help="with --ep/--dense: train.compile=true"
    )
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--allocator", choices=("reuse", "default"), default="reuse",
        help="step mode: glibc malloc as train.reuse_heap=true sets it (default) or glibc's own",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args()
    if args.ep and args.dense:
        parser.error("--ep and --dense are two different comparisons: pick one")
    runs_mode = args.ep or args.dense
    if not runs_mode:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    # As launch.training.loop does with train.reuse_heap=true (the run modes run launch.train).
    heap_reused = not runs_mode and args.allocator == "reuse" and reuse_heap()
    started = time.time()
    if args.profile:
        result = profile(args)
    elif runs_mode:
        result = bench_runs(args)
    else:
        result = bench_steps(args)
    record = {
        "command": " ".join(["python scripts/bench_train_step.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "threads": torch.get_num_threads(),
        "load_average_end": os.getloadavg(),
        "allocator": "reuse_heap" if heap_reused else "glibc default",
        "torch": torch.__version__,
        **result,
    }
    print(json.dumps({k: v for k, v in record.items() if k != "profile"}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
