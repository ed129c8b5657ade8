"""Compare the routing methods on the KJV corpus at equal tokens and at equal seconds.

    OMP_NUM_THREADS=1 python scripts/compare_routing.py --budget-s 3000 \\
        --out runs/compare_routing --seeds 0 1

Variants (`scripts/_routing_sweep.py`): dense at equal active and at equal total
parameters, Switch top-1, top-2, sigma-MoE (16 experts of 64, K=4, parameter-equal with
the dense model of FFN width 1024), top-2 with vanilla and BPR capacity at C=1.0 and 0.5,
task-level routing, PR-MoE, and dynamic capacity once `conf/routing/dynamic.yaml` exists.
Each is one `python -m launch.train` subprocess per seed in `OUT/<variant>_s<seed>`, all
with the same data, batch, LR schedule (warmup 10% then cosine), seed per run (data order
and initialisation) and token budget.

Equal tokens: every run trains for the same tokens (`--tokens`; else, with `--budget-s`, as
many as let the whole sweep fit in that many seconds, from a calibration of `--parallel`
concurrent runs); its final validation bpb is the equal-token figure. Equal seconds: the
seconds a run logs on a shared machine measure its neighbours as much as itself, so after
the sweep every variant's training step is timed side by side in this process, one thread,
interleaved (`--speed-rounds` x `--speed-steps`, median; `measure_throughput`). A variant's
time for t tokens is t / that rate; every curve (val bpb at each evaluation against tokens)
is read, by linear interpolation, at the common time T* = the shortest time any variant
needs for the whole budget, so a slower model is read after fewer tokens (None when T* falls
before its first evaluation), part way through its cosine schedule at a higher learning rate
than at its own end, which slightly disfavours it; the alternative (one schedule per run
fitted to T*) needs a second sweep. The logged seconds and tokens/s are kept in the rows.

Per run: validation bpb of the trainer (the first `--eval-batches` fixed validation
batches, trained capacity policy), bpb per book group and the dropped fraction on the
first `--group-windows` validation windows of each group, interleaved so that every
batch mixes the groups as training does (trained capacity policy, eval mode), training
tokens/s (under `--parallel` concurrent runs), and parameters and FFN FLOPs per token
counted from the config. The settings live in `OUT/sweep.json`; rerunning the command
skips finished runs and resumes the others from their checkpoints. `--report-only` writes
the report of the runs finished so far without launching any (also while the sweep runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _routing_report import literature, markdown, plot, summarise
from _routing_sweep import (
    BY_NAME,
    ROOT,
    count_cost,
    cumulative_seconds,
    default_variants,
    measure_throughput,
)
from _runs import cached_json, is_finished, launch_runs, read_metrics

from moe.data import DataConfig, TokenDataset, build_dataset
from moe.inference import load_model
from moe.transformer import MoETransformer, bits_per_byte

BATCH_SIZE = 16
SEQ_LEN = 128


def train_settings(steps: int, evals: int, eval_batches: int) -> dict[str, Any]:
    every = max(1, steps // evals)
    return {
        "steps": steps, "batch_size": BATCH_SIZE, "lr": 3e-3, "min_lr": 3e-4,
        "warmup_steps": max(1, steps // 10), "weight_decay": 0.1, "grad_clip": 1.0,
        "eval_every": every, "checkpoint_every": every, "log_every": every,
        "eval_batches": eval_batches, "keep_last": 2, "sample_tokens": 0, "progress": False,
        "engine": "torch", "resume": "auto",
    }  # fmt: skip


def overrides(variant: str, seed: int, train: dict[str, Any], run_dir: Path) -> list[str]:
    """The Hydra overrides of one run (also used to compose its config in process)."""
    base = ["comm=local", "data=kjv", f"data.seq_len={SEQ_LEN}", "wandb.mode=disabled"]
    values = {k: str(v).lower() if isinstance(v, bool) else v for k, v in train.items()}
    return [
        *base, *BY_NAME[variant].overrides, f"run_dir={run_dir}", f"train.seed={seed}",
        *(f"train.{key}={value}" for key, value in values.items()),
    ]  # fmt: skip


def compose_configs(variants: list[str]) -> dict[str, Any]:
    """Each variant's `RunConfig`, composed by Hydra as its runs compose it."""
    from hydra import compose, initialize_config_dir

    from launch.config import register_configs, to_run_config

    register_configs()
    train = train_settings(10, 1, 1)
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return {
            variant: to_run_config(compose("config", overrides(variant, 0, train, Path("x"))))
            for variant in variants
        }


def compose_costs(variants: list[str]) -> dict[str, dict[str, int]]:
    """Each variant's parameters and FFN FLOPs, counted from its composed config."""
    costs = {}
    for variant, config in compose_configs(variants).items():
        has_moe = bool(config.model.moe_layer_indices())
        costs[variant] = count_cost(config.model, config.routing if has_moe else None).as_dict()
    return costs


def throughput(args: argparse.Namespace) -> dict[str, float]:
    """Interleaved training tokens/s of every variant (`measure_throughput`), cached in
    `OUT/throughput.json` per variant list and repeat counts."""
    key = {"variants": args.variants, "rounds": args.speed_rounds, "steps": args.speed_steps}

    def measure() -> dict[str, Any]:
        print("[compare_routing] measuring throughput, interleaved", file=sys.stderr)
        rates = measure_throughput(
            compose_configs(args.variants), BATCH_SIZE, SEQ_LEN, args.speed_rounds,
            args.speed_steps,
        )  # fmt: skip
        return {"tokens_per_s": rates}

    return cached_json(args.out / "throughput.json", key, measure)["tokens_per_s"]


def launch(jobs: list[tuple[str, int, Path]], train: dict[str, Any], args: argparse.Namespace,
           desc: str) -> dict[str, float]:  # fmt: skip
    """Run the `(variant, seed, run_dir)` jobs, `--parallel` at a time, with a progress bar
    (`_runs.launch_runs`); returns each run's wall seconds and reports (naming the logs)
    the runs that failed."""

    def command(variant: str, seed: int, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "launch.train", *overrides(variant, seed, train, run_dir)]

    walls, failed = launch_runs(jobs, command, args.out / "logs", args.parallel, args.threads, desc)
    if failed:
        print("[compare_routing] runs failed: " + ", ".join(failed), file=sys.stderr)
    return walls


def calibrate(args: argparse.Namespace, num_runs: int) -> dict[str, Any]:
    """Tokens per run that let `num_runs` runs (`--parallel` at a time) fit `--budget-s`:
    `--parallel` concurrent runs (top-2 and the wide dense model, alternately) of
    `--calibration-steps` give the seconds per training token and the start-up overhead;
    the evaluations (and the per-group one) are counted at a third of the cost of as
    many training tokens, and training gets a 15% margin. The calibration reads the
    machine as it is then: on a shared machine whose load changes, the sweep takes
    correspondingly longer or shorter."""
    steps = args.calibration_steps
    train = train_settings(steps, 1, 1)
    directory = args.out / "_calibration"
    names = ["top2", "dense_total"] * args.parallel
    jobs = [(name, 0, directory / f"{name}_{i}") for i, name in enumerate(names[: args.parallel])]
    start = time.perf_counter()
    walls = launch(jobs, train, args, "calibration")
    spent = time.perf_counter() - start
    rates = [read_metrics(run_dir)[-1]["tokens_per_s"] for _, _, run_dir in jobs]
    shutil.rmtree(directory, ignore_errors=True)
    seconds_per_token = statistics.mean(1 / rate for rate in rates)
    tokens_per_step = BATCH_SIZE * SEQ_LEN
    overhead_s = max(
        statistics.mean(walls.values()) - steps * tokens_per_step * seconds_per_token, 0
    )
    per_run_s = (args.budget_s - spent) * args.parallel / num_runs
    forward_tokens = (
        args.evals * args.eval_batches * tokens_per_step + 6 * args.group_windows * SEQ_LEN
    )
    eval_s = forward_tokens * seconds_per_token / 3
    fit_steps = int(
        (per_run_s - overhead_s - eval_s) / (1.15 * seconds_per_token * tokens_per_step)
    )
    if fit_steps < 10:
        raise ValueError(
            f"--budget-s {args.budget_s} fits {fit_steps} steps per run for {num_runs} runs "
            f"({overhead_s:.0f} s start-up per run); give a larger budget or fewer --variants"
        )
    return {
        "tokens": fit_steps * tokens_per_step, "seconds_per_token": seconds_per_token,
        "overhead_s": overhead_s, "calibration_s": spent, "budget_s": args.budget_s,
    }  # fmt: skip


@torch.no_grad()
def group_eval(model: MoETransformer, dataset: TokenDataset, windows: int) -> dict[str, Any]:
    """bpb per book group on its first `windows` validation windows, the groups interleaved
    row by row in batches of the training batch size, and the mean dropped fraction."""
    model.eval()
    names = dataset.task_names
    chosen = [dataset.task_validation_windows(task, windows) for task in range(len(names))]
    count = min(len(rows) for rows in chosen)
    # Row i*G + g is group g's i-th window: the groups interleaved row by row.
    windows_NT = torch.stack([rows[:count] for rows in chosen], dim=1).flatten(0, 1)
    tasks_N = torch.arange(len(names)).repeat(count)
    totals, dropped = torch.zeros(len(names), dtype=torch.float64), []
    for begin in range(0, len(windows_NT), BATCH_SIZE):
        tokens_BT = windows_NT[begin : begin + BATCH_SIZE]
        task_ids_B = tasks_N[begin : begin + BATCH_SIZE]
        logits_BTV = model(tokens_BT[:, :-1], task_ids_B).logits_BTV
        ce_BT = torch.nn.functional.cross_entropy(
            logits_BTV.transpose(1, 2).float(), tokens_BT[:, 1:], reduction="none"
        )
        totals.index_add_(0, task_ids_B, ce_BT.mean(1).double())
        stats = model.routing_stats()
        dropped.append(
            statistics.mean(float(s.dropped_fraction) for s in stats.values()) if stats else 0.0
        )
    per_group = {name: bits_per_byte(float(totals[i]) / count) for i, name in enumerate(names)}
    return {"val_bpb_per_group": per_group, "dropped_fraction": statistics.mean(dropped),
            "group_windows": count}  # fmt: skip


def evaluate_run(variant: str, seed: int, run_dir: Path, dataset: TokenDataset,
                 args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One run's row: its curve against tokens and seconds, the per-group evaluation of its
    final checkpoint (cached in `run_dir/group_eval.json`)."""
    records = read_metrics(run_dir)
    key = {"step": records[-1]["step"], "group_windows": args.group_windows}
    cached = cached_json(
        run_dir / "group_eval.json", key,
        lambda: group_eval(load_model(run_dir).model, dataset, args.group_windows),
    )  # fmt: skip
    tokens_per_step = BATCH_SIZE * SEQ_LEN
    seconds = cumulative_seconds(records, tokens_per_step)
    return {
        "variant": variant, "seed": seed, "run_dir": str(run_dir), "steps": records[-1]["step"],
        "val_bpb": records[-1]["val_bpb"], "train_seconds": seconds[-1],
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in records),
        "val_bpb_per_group": cached["val_bpb_per_group"],
        "dropped_fraction": cached["dropped_fraction"],
        "curve": [
            {"step": r["step"], "tokens": r["step"] * tokens_per_step, "seconds": s,
             "val_bpb": r["val_bpb"]}
            for r, s in zip(records, seconds)
        ],
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=3000.0, help="seconds for the sweep")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, help="training tokens per run (skips calibration)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=default_variants(), choices=list(BY_NAME))
    parser.add_argument("--evals", type=int, default=5, help="evaluations per run")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--group-windows", type=int, default=24, help="per book group")
    parser.add_argument("--calibration-steps", type=int, default=20)
    parser.add_argument("--speed-rounds", type=int, default=5, help="throughput repeats")
    parser.add_argument("--speed-steps", type=int, default=2, help="steps per repeat")
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument(
        "--report-only", action="store_true",
        help="launch nothing: report the finished runs of the sweep in OUT (while it runs)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="default: OUT/routing_summary.json")
    parser.add_argument("--plot", type=Path, help="default: OUT/routing_bpb.png")
    args = parser.parse_args(argv)
    for key in ("tokens", "evals", "eval_batches", "group_windows", "calibration_steps",
                "speed_rounds", "speed_steps", "threads", "parallel"):  # fmt: skip
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} {value} is invalid; accepted: >= 1")
    if not args.budget_s > 0:
        parser.error(f"--budget-s {args.budget_s} is invalid; accepted: > 0")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds} repeats a seed")
    args.out = args.out.resolve()
    args.json = args.json or args.out / "routing_summary.json"
    args.plot = args.plot or args.out / "routing_bpb.png"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Seed-major, so that a sweep cut short has every variant at its first seed.
    jobs = [(v, seed, args.out / f"{v}_s{seed}") for seed in args.seeds for v in args.variants]
    saved_path = args.out / "sweep.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else None
    try:
        if args.report_only and saved is None:
            raise ValueError(f"--report-only: {saved_path} does not exist (no sweep there)")
        costs = compose_costs(args.variants)
        if args.tokens is not None:
            tokens, calibration = args.tokens, None
        elif saved is not None:  # a sweep under way keeps its budget
            tokens, calibration = saved["tokens"], saved["calibration"]
        else:
            calibration = calibrate(args, len(jobs))
            tokens = calibration["tokens"]
        steps = max(1, tokens // (BATCH_SIZE * SEQ_LEN))
        train = train_settings(steps, args.evals, args.eval_batches)
        if saved is not None and saved["train"] != train:
            raise ValueError(
                f"{saved_path} holds a sweep with other settings ({saved['train']}); rerun it "
                "with its --tokens/--evals/--eval-batches or choose another --out"
            )
        record = {"tokens": steps * BATCH_SIZE * SEQ_LEN, "train": train,
                  "calibration": calibration, "seq_len": SEQ_LEN}  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        if not args.report_only:
            saved_path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"[compare_routing] {steps} steps = {record['tokens']:,} tokens per run",
              file=sys.stderr)  # fmt: skip
        pending = [job for job in jobs if not is_finished(job[2], steps)]
        if len(pending) < len(jobs):
            print(f"[compare_routing] {len(jobs) - len(pending)} runs already finished",
                  file=sys.stderr)  # fmt: skip
        if pending and not args.report_only:
            launch(pending, train, args, "runs")
    except (RuntimeError, ValueError) as error:
        sys.exit(f"compare_routing: {error}")
    dataset = build_dataset(DataConfig(source="kjv", seq_len=SEQ_LEN))
    finished = [job for job in jobs if is_finished(job[2], steps)]
    failed = [job[2].name for job in jobs if job not in finished]
    if not finished:
        sys.exit(f"compare_routing: no run finished; see the logs in {args.out / 'logs'}")
    rows = [
        evaluate_run(v, seed, run_dir, dataset, args)
        for v, seed, run_dir in tqdm(finished, desc="evaluation")
    ]
    rates = throughput(args)
    summary = summarise(rows, costs, rates)
    claims = literature(summary["variants"])
    result = {"settings": record, "costs": costs, "rows": rows, **summary, "literature": claims,
              "unfinished_runs": failed,
              "conditions": {"parallel": args.parallel, "threads": args.threads}}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, rates, summary["common_seconds"], args.plot)
    print(markdown(summary, claims))
    if failed:
        sys.exit(f"compare_routing: unfinished runs (rerun to resume): {', '.join(failed)}")


if __name__ == "__main__":
    main()
