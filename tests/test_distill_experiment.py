"""scripts/distill_experiment.py: a tiny sweep end to end (every variant trains in its own
process, the JSON rows, the plot, the table, a rerun skips finished runs), the share of the
teacher's gain against a hand computation, and bad arguments refused before anything is
written."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from test_train import tiny_config

from launch.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "distill_experiment.py"
VARIANTS = ["scratch", "kd_random", "kd_top", "kd_merge", "kd_top_alpha0"]


def _script(name: str = "distill_experiment") -> ModuleType:
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MoE (synthetic data, 4 experts, top-2) trained for 10 steps."""
    run_dir = tmp_path_factory.mktemp("teacher")
    overrides = ("train.steps=10", "train.eval_every=10", "train.checkpoint_every=10")
    train(tiny_config(run_dir, *overrides, "train.sample_tokens=0"))
    return run_dir


@pytest.mark.slow
def test_tiny_sweep_writes_rows_plot_and_table_and_resumes(teacher_dir: Path, tmp_path: Path):
    out_dir, report, plot = tmp_path / "sweep", tmp_path / "result.json", tmp_path / "bpb.png"
    command = [
        sys.executable, str(SCRIPT), "--teacher", str(teacher_dir), "--out-dir", str(out_dir),
        "--steps", "4", "--eval-every", "2", "--seeds", "0", "--parallel", "1",
        "--eval-windows", "4", "--json", str(report), "--plot", str(plot), "--markdown",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| teacher (MoE) |" in done.stdout and "Kudugunta et al. 2021" in done.stdout

    result = json.loads(report.read_text())
    teacher, rows = result["teacher"], result["rows"]
    tasks = ["markov_0", "markov_1", "markov_2", "markov_3"]
    assert list(teacher["val_bpb_per_task"]) == tasks
    assert math.isfinite(teacher["val_bpb"]) and teacher["eval_tokens_per_s"] > 0
    assert [(row["variant"], row["seed"]) for row in rows] == [(v, 0) for v in VARIANTS]
    for row in rows:
        assert row["steps"] == 4 and [step for step, _ in row["curve"]] == [2, 4]
        assert math.isfinite(row["val_bpb"]) and row["val_bpb"] > 0
        assert list(row["val_bpb_per_task"]) == tasks and row["tokens_per_s"] > 0
        assert Path(row["run_dir"]) == out_dir / f"{row['variant']}_s0"
    scratch = rows[0]
    assert scratch["gain_kept"] == pytest.approx(0.0)  # when the teacher beats it
    assert set(result["summary"]) == set(VARIANTS)
    assert result["settings"]["steps"] == 4 and result["settings"]["train"]["warmup_steps"] == 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The scratch run and the distilled students share the student's shape.
    params = [
        next(line for line in (out_dir / "logs" / f"{v}_s0.log").read_text().splitlines()
             if "parameters" in line).split("]")[1].split(" parameters")[0]
        for v in VARIANTS
    ]  # fmt: skip
    assert len(set(params)) == 1, params

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "5 runs already finished" in again.stderr
    assert json.loads(report.read_text())["rows"] == rows


def test_share_of_the_gain_kept_per_seed() -> None:
    report = _script("_distill_report")
    tasks = {"a": 1.0}
    rows = [
        {"variant": variant, "seed": seed, "val_bpb": bpb, "val_bpb_per_task": tasks,
         "tokens_per_s": 1.0, "eval_tokens_per_s": 1.0}
        for variant, seed, bpb in [
            ("scratch", 0, 3.0), ("scratch", 1, 3.2), ("kd_top", 0, 2.5), ("kd_top", 1, 2.6),
        ]
    ]  # fmt: skip
    summary = report.summarise(rows, {"val_bpb": 2.0})
    assert [row["gain_kept"] for row in rows[2:]] == pytest.approx([0.5, 0.5])
    assert summary["kd_top"]["gain_kept"]["mean"] == pytest.approx(0.5)
    assert summary["kd_top"]["val_bpb"]["std"] == pytest.approx(math.sqrt(0.005))
    assert "not met" not in report.verdict(summary) and "32%" in report.verdict(summary)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--steps", "0"], "--steps 0 is invalid"),
        (["--parallel", "0"], "--parallel 0 is invalid"),
        (["--steps", "5", "--budget-s", "60"], "not both"),
        (["--budget-s", "-1"], "--budget-s -1.0 is invalid"),
        (["--seeds", "0", "0"], "repeats a seed"),
        (["--variants", "kd_best"], "invalid choice"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        _script().main(["--teacher", str(tmp_path), "--out-dir", str(out_dir), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out_dir.exists()


def test_a_teacher_that_is_not_a_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit):
        _script().main(["--teacher", str(tmp_path / "nothing"), "--out-dir", str(out_dir)])
    assert "is not a checkpoint" in capsys.readouterr().err
    assert not out_dir.exists()
