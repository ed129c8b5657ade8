"""Every entry point answers bad input with the one-line reason and exit status 2, no
traceback (a traceback stays for real bugs, and with HYDRA_FULL_ERROR=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

CASES = [
    ("launch.train", ["routing.top_k=0"], "routing.top_k=0 must be >= 1"),
    ("launch.ray_train", ["train.steps=0"], "train.steps=0 must be >= 1"),
    ("launch.distill", ["teacher=/nonexistent/run"], "teacher='/nonexistent/run'"),
    ("launch.ray_distill", ["distill.width=-3"], "distill.width=-3 is invalid"),
    ("launch.generate", ["checkpoint=/nonexistent/run", "prompt=x"], "is not a checkpoint"),
    ("launch.generate", ["checkpoint=/x", "prompt=x", "top_p=1.5"], "top_p=1.5 is invalid"),
    ("launch.subset", ["checkpoint=/nonexistent/run", "task=0", "out=/tmp/x"], "not a checkpoint"),
    ("launch.import_hf", ["path=/nonexistent/model", "out=/tmp/x"], "has no config.json"),
    ("launch.import_hf", ["path=/x", "out=/tmp/x", "dtype=int4"], "dtype='int4' is invalid"),
    ("launch.export_hf", ["checkpoint=/nonexistent/run", "out=/tmp/x"], "not a checkpoint"),
    ("launch.train", ["train.init_from=/nonexistent/run"], "is not a checkpoint"),
    ("launch.tokenizer", ["out=/tmp/x", "tokenizer.vocab_size=100"], "vocab_size=100 is invalid"),
    ("launch.train", ["data.tokenizer=/nonexistent/tok"], "holds no tokenizer.json"),
    ("launch.prune", ["checkpoint=/x", "out=/tmp/x"], "prune.method=magnitude needs prune."),
    (
        "launch.prune",
        ["checkpoint=/nonexistent", "out=/y", "prune.sparsity=0.5"],
        "not a checkpoint",
    ),
]


def _run(module: str, args: list[str], run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environment.update(OMP_NUM_THREADS="1", **env)
    if module.endswith(("train", "distill")):  # their configs have a run_dir
        args = [*args, f"run_dir={run_dir}"]
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=environment,
    )  # fmt: skip


@pytest.mark.parametrize(("module", "args", "message"), CASES)
def test_bad_input_exits_2_with_the_reason(
    module: str, args: list[str], message: str, tmp_path: Path
) -> None:
    result = _run(module, args, tmp_path / "run")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    assert result.stderr.strip().startswith(f"{module}: ")


def test_hydra_full_error_keeps_the_traceback(tmp_path: Path) -> None:
    result = _run("launch.train", ["routing.top_k=0"], tmp_path / "run", HYDRA_FULL_ERROR="1")
    assert result.returncode != 0 and "Traceback" in result.stderr
