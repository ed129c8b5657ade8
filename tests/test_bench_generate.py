"""Smoke test of scripts/bench_generate.py: `--quick` runs end to end in a subprocess on
a tiny checkpoint built here (fp32, a task subset written by the script, int8 when
`moe.inference.quant` imports) and writes the JSON schema and the plot that
docs/BENCHMARKS.md relies on; bad arguments are refused with the offending value."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe.checkpoint import save_checkpoint
from moe.config import ModelConfig
from moe.data import DataConfig
from moe.transformer import MoETransformer
from routing import RoutingConfig

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_generate.py"
ROW_KEYS = {
    "variant": str,
    "batch": int,
    "prefill_tokens_per_s": float,
    "decode_tokens_per_s": float,
    "floor_fraction": float,
}
MACHINE_KEYS = ("threads", "read_gbs", "copy_gbs", "matmul_flops", "torch", "cpu", "date")


def save_tiny_checkpoint(directory: Path) -> Path:
    """A random 2-block MoE (4 experts, top-2) on synthetic data, saved as a run."""
    from launch.config import RunConfig
    from launch.training.checkpointing import config_dict

    config = ModelConfig(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, ffn_hidden=48,
        expert_hidden=16, num_experts=4, moe_every=1,
    )  # fmt: skip
    routing = RoutingConfig(capacity="dropless")
    model = MoETransformer(config, routing, seed=0).eval()
    data = DataConfig(source="synthetic", seq_len=32, synthetic_train_bytes_per_task=4096,
                      synthetic_val_bytes_per_task=2048)  # fmt: skip
    run = RunConfig(model=config, routing=routing, data=data)
    return save_checkpoint(directory / "checkpoints", model, None, 1, config_dict(run))


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_quick_benchmark_writes_table_json_and_plot(tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path / "run")
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    # The compiled variant with aot_eager: the script's plumbing, not inductor's compile.
    done = run_script("--quick", "--threads", "1", "--checkpoint", str(tmp_path / "run"),
                      "--json", str(json_path), "--plot", str(plot_path), "--compile",
                      "--compile-backend", "aot_eager", "--precision", "fp32,bf16",
                      timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "decode tok/s" in done.stdout and "fp32" in done.stdout

    result = json.loads(json_path.read_text())
    for key in MACHINE_KEYS:
        assert key in result["machine"], key
    assert result["machine"]["read_gbs"] > 0 and result["machine"]["matmul_flops"] > 0
    rows = result["rows"]
    variants = {row["variant"] for row in rows}
    assert {"fp32", "bf16", "compiled"} <= variants
    assert set(result["compiled_speedups"]) == {"1", "4"}
    assert result["compile"]["compiled_buckets"] == [1, 2, 4]
    if importlib.util.find_spec("moe.inference.quant") is not None:
        assert {"int8", "int8_bf16"} <= variants
    by_variant = {r["variant"]: r for r in rows if r["batch"] == 1}
    # bf16 weights and KV cache: about half the bytes of an fp32 decode step.
    ratio = (
        by_variant["bf16"]["bytes_per_decode_step"] / by_variant["fp32"]["bytes_per_decode_step"]
    )
    assert ratio == pytest.approx(0.5, abs=0.01)
    if importlib.util.find_spec("moe.inference.subset") is not None:
        assert "subset" in variants
    for variant in variants:
        assert sorted(r["batch"] for r in rows if r["variant"] == variant) == [1, 4]
    for row in rows:
        for key, kind in ROW_KEYS.items():
            assert isinstance(row[key], kind), (key, row[key])
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "floor_fraction"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
        assert row["bound"] in ("memory", "compute")
        # Batch 1 routes each decode token to exactly top_k = 2 experts per layer.
        if row["batch"] == 1:
            assert row["experts_touched_per_layer"] == pytest.approx(2.0)
    assert set(result["ratios"]) == variants
    for ratio in result["ratios"].values():
        assert ratio["batch"] == 4 and ratio["decode_ratio"] > 0
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batches", "0,4"], "--batches='0,4' is invalid"),
        (["--batches", "one"], "--batches='one' is invalid"),
        (["--new-tokens", "1"], "--new-tokens=1 must be >= 2"),
        (["--repeats", "0"], "--repeats=0 must be >= 1"),
        (["--prompt-len", "0"], "--prompt-len=0 must be >= 1"),
        (["--precision", "fp8"], "--precision='fp8' is invalid"),
    ],
)
def test_bad_arguments_are_rejected(
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_prompt_longer_than_the_window_is_refused(tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path / "run")
    done = run_script("--checkpoint", str(tmp_path / "run"), "--prompt-len", "60",
                      "--new-tokens", "8", "--batches", "1")  # fmt: skip
    assert done.returncode != 0
    assert "--prompt-len=60 + --new-tokens=8 - 1 exceeds the model's max_seq_len=64" in done.stderr
