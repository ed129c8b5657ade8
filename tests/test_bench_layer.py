"""Smoke test of scripts/bench_layer.py: `--quick` runs end to end in a subprocess (our
layer, the dense floor and DeepSpeed's MoE, peak memory in child processes) and writes
the JSON schema and the plot that docs/BENCHMARKS.md relies on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG_KEYS = {
    "name": str,
    "D": int,
    "H": int,
    "E": int,
    "K": int,
    "T": int,
    "moe_ms": float,
    "moe_capacity_ms": float,
    "dense_ms": float,
    "deepspeed_ms": float,
    "moe_peak_mb": float,
    "dense_peak_mb": float,
    "deepspeed_peak_mb": float,
    "moe_over_dense_round_median": float,
    "round_ms": dict,
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_quick_benchmark_writes_table_json_and_plot(tmp_path: Path, dtype: str) -> None:
    json_path = tmp_path / "bench.json"
    plot_path = tmp_path / "bench.png"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [
        sys.executable, str(ROOT / "scripts" / "bench_layer.py"), "--quick", "--dtype", dtype,
        "--threads", "1", "--repeats", "2", "--json", str(json_path), "--plot", str(plot_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "moe/dense" in done.stdout and "quick-E8" in done.stdout

    result = json.loads(json_path.read_text())
    assert result["meta"]["dtype"] == dtype
    implementations = {"moe", "moe_capacity", "dense", "deepspeed"}
    if dtype == "bf16":
        implementations |= {"moe_bf16_params", "moe_fp32"}
        assert "autocast / bf16 params" in done.stdout
    configs = result["configs"]
    assert [c["name"] for c in configs] == ["quick-E8", "quick-E32"]
    for config in configs:
        assert set(CONFIG_KEYS) <= set(config), set(CONFIG_KEYS) - set(config)
        for key, kind in CONFIG_KEYS.items():
            assert isinstance(config[key], kind), (key, config[key])
        for key in ("moe_ms", "moe_capacity_ms", "dense_ms", "deepspeed_ms"):
            assert math.isfinite(config[key]) and config[key] > 0, (key, config[key])
        for key in ("moe_peak_mb", "dense_peak_mb", "deepspeed_peak_mb"):
            assert math.isfinite(config[key]) and config[key] >= 0, (key, config[key])
        assert set(config["round_ms"]) == implementations
        assert all(math.isfinite(config[f"{name}_ms"]) for name in implementations)
        assert all(len(times) == 2 for times in config["round_ms"].values())
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_rejected() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_layer.py"), "--repeats", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "--repeats=0 must be >= 1" in done.stderr


@pytest.mark.slow
def test_quick_fine_grained_benchmark(tmp_path: Path) -> None:
    """`--fine-grained`: top-8 shapes, our layer folded and unfolded and the dense floor."""
    json_path = tmp_path / "fine.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable, str(ROOT / "scripts" / "bench_layer.py"), "--quick", "--fine-grained",
        "--threads", "1", "--repeats", "2", "--json", str(json_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "unfolded/moe" in done.stdout
    result = json.loads(json_path.read_text())
    assert result["meta"]["fine_grained"] is True
    configs = result["configs"]
    assert [(c["E"], c["K"]) for c in configs] == [(64, 8), (128, 8)]
    for config in configs:
        assert set(config["round_ms"]) == {"moe", "moe_unfolded", "dense"}
        for key in ("moe_ms", "moe_unfolded_ms", "dense_ms", "unfolded_over_moe_round_median"):
            assert math.isfinite(config[key]) and config[key] > 0, (key, config[key])
        for key in ("moe_peak_mb", "moe_unfolded_peak_mb", "dense_peak_mb"):
            assert math.isfinite(config[key]) and config[key] >= 0, (key, config[key])


@pytest.mark.slow
def test_quick_fine_grained_bf16_with_one_tier(tmp_path: Path) -> None:
    """`--fine-grained --dtype bf16 --with-one-tier`: the padded blocks in one tier timed
    beside ours, their ratio reported."""
    json_path = tmp_path / "tiers.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable, str(ROOT / "scripts" / "bench_layer.py"), "--quick", "--fine-grained",
        "--dtype", "bf16", "--with-one-tier", "--no-memory", "--threads", "1",
        "--repeats", "2", "--json", str(json_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "one tier/two tiers" in done.stdout
    for config in json.loads(json_path.read_text())["configs"]:
        assert set(config["round_ms"]) == {"moe", "moe_unfolded", "dense", "moe_one_tier"}
        ratio = config["one_tier_over_moe_round_median"]
        assert math.isfinite(ratio) and ratio > 0
