"""scripts/prune_experiment.py: a tiny sweep end to end (a pruned checkpoint, its
recovery runs in their own processes, the JSON, table and plot, a rerun that repeats
nothing), and the summary against a hand computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import tiny_config

from launch.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prune_experiment.py"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher")
    overrides = ("train.steps=10", "train.eval_every=10", "train.checkpoint_every=10")
    train(tiny_config(run_dir, *overrides, "train.sample_tokens=0"))
    return run_dir


@pytest.mark.slow
def test_tiny_sweep_prunes_recovers_reports_and_resumes(teacher_dir: Path, tmp_path: Path):
    out_dir, report, plot = tmp_path / "sweep", tmp_path / "result.json", tmp_path / "bpb.png"
    command = [
        sys.executable, str(SCRIPT), "--teacher", str(teacher_dir), "--out-dir", str(out_dir),
        "--steps", "2", "--seeds", "0", "--prunings", "nm24_perm", "--recoveries", "kd", "sr",
        "--eval-batches", "1", "--eval-batch-size", "4", "--permute-seconds", "0.2",
        "--parallel", "2", "--json", str(report), "--plot", str(plot), "--markdown",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| nm24_perm | 0.5 (2:4) |" in done.stdout and "Target (" in done.stdout
    result = json.loads(report.read_text())
    summary = result["summary"]
    unpruned = summary["unpruned"]["val_bpb"]
    entry = summary["variants"]["nm24_perm"]
    kd_rows = [r for r in result["rows"] if r["name"] == "nm24_perm_kd"]
    assert len(kd_rows) == 1 and kd_rows[0]["curve"][-1][0] == 2
    assert "sr" in entry and entry["sr"]["values"]
    pct = 100 * (kd_rows[0]["val_bpb"] - unpruned) / unpruned
    assert entry["kd_vs_unpruned_pct"]["mean"] == pytest.approx(pct)
    assert summary["verdict"]["met"] == (pct <= 2.0)
    assert entry["magnitude_kept"] >= entry["magnitude_kept_without_permutation"]
    assert "packed_2_4_int8" in entry["expert_memory_bytes"] and "kd_int8" in entry
    assert plot.stat().st_size > 0
    # Again: nothing is pruned, trained or evaluated twice.
    stamp = (out_dir / "nm24_perm_kd_s0" / "metrics.jsonl").stat().st_mtime_ns
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 of 2 runs done" in again.stderr
    assert (out_dir / "nm24_perm_kd_s0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert json.loads(report.read_text())["summary"] == summary
