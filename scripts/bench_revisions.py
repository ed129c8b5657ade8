"""Training speed of this tree against another git revision: whole demo runs, alternated.

    python scripts/bench_revisions.py REV [--ep 1|2] [--train-steps N] [--repeats N]
        [--json PATH] [-- extra Hydra overrides]

Checks REV out into a temporary git worktree, then runs `launch.train experiment=demo`
from each tree in turn (`_runs.run_demo_training`: EP=1 one process with 2
threads, EP=2 torchrun with 1 thread each), the starting tree alternating per repeat,
so that a change's effect is measured against its own baseline in the same spell of a
shared machine. Tokens/s come from every metrics window after the first (warm-up);
the figure is the ratio of the medians, this tree over REV, with each repeat's ratio of
means beside it (a drift within one repeat hits both trees alike).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _runs import run_demo_training

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the baseline revision (any git rev-parse name)")
    parser.add_argument("--ep", type=int, choices=(1, 2), default=2)
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both trees")
    args = parser.parse_args()
    if args.train_steps < 8 or args.repeats < 1:
        parser.error("--train-steps must be >= 8 and --repeats >= 1")
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{args.rev}^{{commit}}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if commit.returncode != 0:
        parser.error(f"rev {args.rev!r} is not a commit of {ROOT}")
    window = max(args.train_steps // 4, 1)
    overrides = [f"train.steps={args.train_steps}", f"train.eval_every={window}", *args.overrides]
    windows: dict[str, list[float]] = {"this": [], "baseline": []}
    repeat_ratios = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-f", str(baseline), commit.stdout.strip()],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        try:
            trees = {"this": ROOT, "baseline": baseline}
            for repeat in range(args.repeats):
                order = list(trees) if repeat % 2 == 0 else list(trees)[::-1]
                got: dict[str, list[float]] = {}
                for name in order:
                    run_dir = Path(tmp) / f"{name}-{repeat}"
                    records = run_demo_training(args.ep, overrides, run_dir, trees[name])
                    got[name] = [r["tokens_per_s"] for r in records[1:]]
                    windows[name] += got[name]
                    print(f"# repeat {repeat} {name}: {[round(w) for w in got[name]]} tokens/s")
                repeat_ratios.append(
                    statistics.mean(got["this"]) / statistics.mean(got["baseline"])
                )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT)
    medians = {name: statistics.median(values) for name, values in windows.items()}
    result = {
        "command": " ".join(["python scripts/bench_revisions.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "load_average_end": os.getloadavg(),
        "baseline": commit.stdout.strip(),
        "ep": args.ep,
        "train_steps": args.train_steps,
        "overrides": args.overrides,
        "windows_tokens_per_s": windows,
        "median_tokens_per_s": medians,
        "this_over_baseline": medians["this"] / medians["baseline"],
        "repeat_ratios_of_means": repeat_ratios,
    }
    print(
        f"this/baseline {result['this_over_baseline']:.3f} (medians {medians['this']:.0f} / "
        f"{medians['baseline']:.0f} tokens/s); per repeat {[round(r, 3) for r in repeat_ratios]}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
