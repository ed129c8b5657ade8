"""Demo training in bf16 against fp32: tokens/s and validation bits per byte of whole
runs, alternated, over seeds; the validation curves in one plot.

    python scripts/bench_precision.py [--steps 600] [--seeds 0,1] [--eval-every 50]
        [--eval-batches 8] [--ep 1|2] [--json PATH] [--plot PATH] [--keep-runs DIR]
        [-- extra overrides]

For every seed, one `launch.train experiment=demo` run per precision
(`train.precision=fp32` and `=bf16`; `_runs.run_demo_training`: EP=1 is one
process of 2 threads, EP=2 two processes of 1 thread), the precision that starts
alternating from seed to seed, so that a slow spell of a shared machine hits both.
Speed: tokens/s of every evaluation window after the first (the first holds the
warm-up; evaluation time is outside the windows); the figure is the ratio of the
medians, bf16 over fp32, with each seed's ratio of window means beside it. Quality:
validation bits per byte at every evaluation (`--eval-batches` fixed validation batches,
the same for both), the final one compared per seed (target: within 1%).

`--keep-runs DIR` keeps every run directory (`DIR/<precision>-<seed>`, with its final
checkpoint) instead of a temporary one. The host's bf16 flags (`moe.precision.BF16_CPU_FLAGS` found in /proc/cpuinfo), the CPU
model and the load average before and after go into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _runs import run_demo_training

from moe.precision import BF16_CPU_FLAGS, cpu_flags

PRECISIONS = ("fp32", "bf16")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def plot_curves(runs: dict[str, dict[str, list[dict[str, Any]]]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"fp32": "-", "bf16": "--"}
    for index, (seed, by_precision) in enumerate(sorted(runs.items())):
        for precision, records in by_precision.items():
            steps = [r["step"] for r in records]
            label = f"{precision}, seed {seed}"
            color = f"C{index}"
            ax_val.plot(steps, [r["val_bpb"] for r in records], styles[precision],
                        color=color, marker="o", markersize=3, label=label)  # fmt: skip
            ax_train.plot(steps, [r["train_loss"] for r in records], styles[precision],
                          color=color, label=label)  # fmt: skip
    ax_val.set_ylabel("validation bits per byte")
    ax_train.set_ylabel("training loss (nats, at each evaluation step)")
    for ax in (ax_val, ax_train):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1", help="comma-separated train.seed values")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--ep", type=int, choices=(1, 2), default=1)
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--plot", metavar="PATH", help="write the validation curves (PNG)")
    parser.add_argument("--keep-runs", metavar="DIR", help="keep the run directories here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or args.eval_every < 1 or args.steps < 2 * args.eval_every:
        parser.error("need >= 1 seed and --steps >= 2 * --eval-every (two windows at least)")
    overrides = [
        f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
        f"train.eval_batches={args.eval_batches}", *args.overrides,
    ]  # fmt: skip
    load_before = os.getloadavg()
    started = time.time()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    windows: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    seed_ratios = []
    from tqdm import tqdm

    with (
        tempfile.TemporaryDirectory() as scratch,
        tqdm(total=len(seeds) * len(PRECISIONS), desc="demo runs", file=sys.stderr) as progress,
    ):
        root = Path(args.keep_runs) if args.keep_runs else Path(scratch)
        for index, seed in enumerate(seeds):
            order = PRECISIONS if index % 2 == 0 else PRECISIONS[::-1]
            runs[str(seed)] = {}
            for precision in order:
                run_dir = root / f"{precision}-{seed}"
                run_overrides = [*overrides, f"train.seed={seed}", f"train.precision={precision}"]
                records = run_demo_training(args.ep, run_overrides, run_dir)
                runs[str(seed)][precision] = records
                windows[precision] += [r["tokens_per_s"] for r in records[1:]]
                progress.update()
            by = runs[str(seed)]
            seed_ratios.append(
                statistics.mean(r["tokens_per_s"] for r in by["bf16"][1:])
                / statistics.mean(r["tokens_per_s"] for r in by["fp32"][1:])
            )
    medians = {p: statistics.median(values) for p, values in windows.items()}
    final_bpb = {
        seed: {p: records[-1]["val_bpb"] for p, records in by.items()} for seed, by in runs.items()
    }
    bpb_gap = {seed: (v["bf16"] - v["fp32"]) / v["fp32"] for seed, v in final_bpb.items()}
    flags = sorted(cpu_flags() & set(BF16_CPU_FLAGS))
    result = {
        "command": " ".join(["python scripts/bench_precision.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "host": {"cpu": cpu_model(), "bf16_flags": flags, "cores": os.cpu_count()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "ep": args.ep,
        "steps": args.steps,
        "seeds": seeds,
        "overrides": args.overrides,
        "windows_tokens_per_s": windows,
        "median_tokens_per_s": medians,
        "bf16_over_fp32": medians["bf16"] / medians["fp32"],
        "seed_ratios_of_means": seed_ratios,
        "final_val_bpb": final_bpb,
        "final_val_bpb_relative_gap": bpb_gap,
        "records": runs,
    }
    print(
        f"bf16/fp32 tokens/s {result['bf16_over_fp32']:.2f} (medians {medians['bf16']:.0f} / "
        f"{medians['fp32']:.0f}; per seed {[round(r, 2) for r in seed_ratios]}); host bf16 "
        f"flags {flags or 'none'}"
    )
    for seed, values in final_bpb.items():
        print(
            f"seed {seed}: val bpb at step {args.steps}: fp32 {values['fp32']:.4f}, bf16 "
            f"{values['bf16']:.4f} ({100 * bpb_gap[seed]:+.2f}%)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        title = (f"demo model, EP={args.ep}, fp32 vs bf16 (autocast, fp32 masters); "
                 f"{cpu_model()}, bf16 flags: {', '.join(flags) or 'none'}")  # fmt: skip
        plot_curves(runs, args.plot, title)


if __name__ == "__main__":
    main()
