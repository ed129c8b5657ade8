"""Training runs as the benchmark and experiment scripts drive them: subprocesses of
`launch.train` or `launch.distill`, read back from their metrics.jsonl.

- `read_metrics`, `is_finished`: a run directory's records, and whether it reached its
  last step (a sweep skips finished runs and resumes the others);
- `cached_json`: a figure of a sweep (a run's evaluation, the interleaved throughput)
  kept in a file under the key of what it depends on, so that a rerun does not repeat it;
- `launch_runs`: the `(variant, seed, run_dir)` jobs of a sweep, `parallel` processes at
  a time, each with its log (`scripts/compare_routing.py`, `scripts/distill_experiment.py`);
- `run_demo_training`: one short `launch.train experiment=demo` run at EP=1 or EP=2
  (`scripts/bench_dynamic.py`, `scripts/bench_train_step.py`, `scripts/bench_revisions.py`);
- `spread`: a sweep's figure over its seeds (mean, sample standard deviation, range).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

Job = tuple[str, int, Path]  # (variant, seed, run directory)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl` by step (a resumed run may have logged a step
    twice: the later record wins); [] when there is none yet."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["step"]] = record
    return [records[step] for step in sorted(records)]


def is_finished(run_dir: Path, steps: int) -> bool:
    """Whether `run_dir` logged step `steps` and holds a checkpoint."""
    return (
        any(r["step"] == steps for r in read_metrics(run_dir))
        and (run_dir / "checkpoints" / "latest").is_file()
    )


def cached_json(
    path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """`{"key": key, **compute()}`, written to `path`; read back from `path` instead while
    the key it holds is `key`."""
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("key") != key:
        cached = {"key": key, **compute()}
        path.write_text(json.dumps(cached, indent=1) + "\n")
    return cached


def launch_runs(
    jobs: Sequence[Job],
    command: Callable[[str, int, Path], list[str]],
    logs: Path,
    parallel: int,
    threads: int,
    desc: str,
) -> tuple[dict[str, float], list[str]]:
    """Run the jobs, `parallel` at a time, each `command(variant, seed, run_dir)` in the
    repository root with `threads` threads (OMP and MKL) and its output appended to
    `logs/<run_dir name>.log`, under a progress bar. Returns each run's wall seconds by
    run directory name, and one line per failed run (its exit code and log)."""
    from tqdm import tqdm

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    logs.mkdir(parents=True, exist_ok=True)

    def one(job: Job) -> tuple[int, float]:
        variant, seed, run_dir = job
        start = time.perf_counter()
        with open(logs / f"{run_dir.name}.log", "a") as log:
            done = subprocess.run(
                command(variant, seed, run_dir),
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
        return done.returncode, time.perf_counter() - start

    walls: dict[str, float] = {}
    failed: list[str] = []
    with ThreadPoolExecutor(parallel) as pool, tqdm(total=len(jobs), desc=desc) as bar:
        futures = {pool.submit(one, job): job for job in jobs}
        for future in as_completed(futures):
            run_dir = futures[future][2]
            code, walls[run_dir.name] = future.result()
            if code:
                failed.append(f"{run_dir.name} (exit {code}; log {logs / run_dir.name}.log)")
            bar.set_postfix_str(f"{run_dir.name} {walls[run_dir.name]:.0f}s")
            bar.update(1)
    return walls, failed


def run_demo_training(
    ep: int, overrides: Sequence[str], run_dir: Path, root: Path | None = None
) -> list[dict[str, Any]]:
    """One `launch.train experiment=demo` run without checkpoints, samples or wandb:
    EP=1 is one process with 2 threads (`comm=local`); EP=2 is `torchrun` with two
    processes of 1 thread (`comm=ep2`). `root`: the source tree to run (default this
    one; `scripts/bench_revisions.py` passes a checkout of another revision). Returns
    its metrics.jsonl records."""
    root = root or ROOT
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(root))
    common = [
        "experiment=demo", f"run_dir={run_dir}", "train.progress=false", "wandb.mode=disabled",
        "train.eval_batches=1", "train.checkpoint_every=0", "train.sample_tokens=0",
        "train.warmup_steps=5", *overrides,
    ]  # fmt: skip
    if ep == 1:
        cmd = [sys.executable, "-m", "launch.train", *common, "comm=local"]
        env["OMP_NUM_THREADS"] = "2"
    elif ep == 2:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--nproc-per-node", "2", "-m", "launch.train", *common, "comm=ep2"]
        env["OMP_NUM_THREADS"] = "1"
    else:
        raise ValueError(f"ep={ep}: accepted 1 or 2 (this machine has 2 cores)")
    subprocess.run(cmd, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    return read_metrics(run_dir)


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and the values."""
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }
