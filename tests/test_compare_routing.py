"""scripts/compare_routing.py: the parameter and FFN FLOP counts from the config against
the built models and against a hand count, the equal-seconds arithmetic, the literature
verdicts, and a tiny sweep end to end (rows, plot, table, a rerun skips finished runs)."""

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

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _load(name: str) -> ModuleType:
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _load("compare_routing")


@pytest.fixture(scope="module")
def costs(script: ModuleType) -> dict[str, dict[str, int]]:
    return script.compose_costs(list(script.BY_NAME))


# By hand, D=128, 4 blocks, byte vocabulary (256), GELU (2 matrices per MLP), tied embedding:
#   embedding 256*128 = 32768;
#   per block: qkv 128*(4 + 2*2)*32 = 32768, out 128*128 = 16384, 2 RMSNorms 256 -> 49408;
#   4 blocks + final norm: 4*49408 + 128 = 197760 (in every variant).
# FFNs per block (parameters; forward FLOPs = 2 per multiply-accumulate):
#   dense 256:  2*128*256 = 65536 (FLOPs 131072);  dense 1024: 262144 (FLOPs 524288)
#   top-k, 8 experts of 128: experts 8*32768, router 128*8 = 1024; active K*32768 + 1024;
#     FLOPs K*65536 + 2*1024
#   sigma, 16 experts of 64: experts 16*16384, router 2048; active 4*16384 + 2048;
#     FLOPs 4*32768 + 4096
#   task, 8 experts, 6 tasks: router table 6*8 = 48 (a lookup: no FLOPs)
#   PR-MoE [4, 4, 8, 8] top-1: + residual MLP 32768 + gate 128*2 + 2 = 258 per block;
#     FLOPs 65536 (expert) + 2*128*E (router) + 65536 (residual) + 2*256 (gate)
SHARED, EMBEDDING = 197760, 32768
HAND = {
    "dense_active": (EMBEDDING + SHARED + 4 * 65536, SHARED + 4 * 65536, 4 * 131072),
    "dense_total": (EMBEDDING + SHARED + 4 * 262144, SHARED + 4 * 262144, 4 * 524288),
    "switch_top1": (
        EMBEDDING + SHARED + 4 * (8 * 32768 + 1024), SHARED + 4 * (32768 + 1024),
        4 * (65536 + 2048),
    ),
    "top2": (
        EMBEDDING + SHARED + 4 * (8 * 32768 + 1024), SHARED + 4 * (2 * 32768 + 1024),
        4 * (2 * 65536 + 2048),
    ),
    "sigma_moe": (
        EMBEDDING + SHARED + 4 * (16 * 16384 + 2048), SHARED + 4 * (4 * 16384 + 2048),
        4 * (4 * 32768 + 4096),
    ),
    "task": (
        EMBEDDING + SHARED + 4 * (8 * 32768 + 48), SHARED + 4 * (2 * 32768 + 48),
        4 * 2 * 65536,
    ),
    "prmoe": (
        EMBEDDING + SHARED + 24 * 32768 + 24 * 128 + 4 * (32768 + 258),
        SHARED + 4 * 32768 + 24 * 128 + 4 * (32768 + 258),
        4 * (65536 + 65536 + 512) + 2 * 128 * 24,
    ),
}  # fmt: skip
for _name in ("vanilla_c1.0", "bpr_c1.0", "vanilla_c0.5", "bpr_c0.5", "dynamic"):
    HAND[_name] = HAND["top2"]


def test_counts_match_a_hand_count(costs: dict[str, dict[str, int]]) -> None:
    assert set(costs) == set(HAND)
    for name, (total, active, flops) in HAND.items():
        got = costs[name]
        assert (got["params_total"], got["params_active"], got["ffn_flops_per_token"]) == (
            total,
            active,
            flops,
        ), name
    # The settings the comparisons rest on: sigma-MoE is parameter-equal with dense_total
    # (up to its router) at about a quarter of its FFN FLOPs; dense_active has top2's
    # active parameters (up to the router).
    sigma, dense = costs["sigma_moe"], costs["dense_total"]
    assert sigma["params_total"] - dense["params_total"] == 4 * 2048
    assert sigma["ffn_flops_per_token"] / dense["ffn_flops_per_token"] == pytest.approx(0.258, 1e-2)
    assert costs["top2"]["params_active"] - costs["dense_active"]["params_active"] == 4 * 1024


def test_counts_match_the_built_models(script: ModuleType, costs: dict[str, dict[str, int]]):
    from hydra import compose, initialize_config_dir

    from launch.config import to_run_config
    from moe.params import count_parameters
    from moe.transformer import MoETransformer

    train = script.train_settings(10, 1, 1)
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        for name in costs:
            config = to_run_config(compose("config", script.overrides(name, 0, train, Path("x"))))
            routing = config.routing if config.model.moe_layer_indices() else None
            counted = count_parameters(MoETransformer(config.model, routing))
            assert costs[name]["params_total"] == counted.total, name
            assert costs[name]["params_active"] == counted.active, name
            assert costs[name]["params_embedding"] == counted.embedding, name


def test_seconds_and_reading_a_curve_at_a_common_time() -> None:
    sweep = _load("_routing_sweep")
    records = [{"step": 10, "tokens_per_s": 100.0}, {"step": 30, "tokens_per_s": 200.0}]
    assert sweep.cumulative_seconds(records, 50) == pytest.approx([5.0, 10.0])
    assert sweep.read_at([5.0, 10.0], [3.0, 2.0], 7.5) == pytest.approx(2.5)
    assert sweep.read_at([5.0, 10.0], [3.0, 2.0], 10.0) == 2.0
    assert sweep.read_at([5.0, 10.0], [3.0, 2.0], 4.0) is None


def _row(variant: str, seed: int, bpb: float, seconds: float, dropped: float = 0.0) -> dict:
    curve = [
        {"step": 1, "tokens": 100, "seconds": seconds / 2, "val_bpb": bpb + 1.0},
        {"step": 2, "tokens": 200, "seconds": seconds, "val_bpb": bpb},
    ]
    return {
        "variant": variant, "seed": seed, "val_bpb": bpb, "train_seconds": seconds,
        "tokens_per_s": 200 / seconds, "val_bpb_per_group": {"law": bpb},
        "dropped_fraction": dropped, "curve": curve,
    }  # fmt: skip


def test_summary_and_literature_verdicts() -> None:
    report = _load("_routing_report")
    bpbs = {
        "dense_active": (3.0, 3.02), "dense_total": (2.5, 2.52), "top2": (2.6, 2.62),
        "task": (2.9, 2.92), "sigma_moe": (2.51, 2.53), "bpr_c0.5": (2.7, 2.71),
        "vanilla_c0.5": (2.8, 2.81),
    }  # fmt: skip
    rows = [_row(v, s, bpb, 10.0 + s) for v, pair in bpbs.items() for s, bpb in enumerate(pair)]
    # 200 tokens per run: dense_total needs 200 / 20 = 10 s, the fastest; top2 reaches
    # 150 tokens in 10 s, dense_active 100.
    rates = {v: 15.0 if v == "top2" else 10.0 if v == "dense_active" else 20.0 for v in bpbs}
    costs = {
        v: {"ffn_flops_per_token": 100 if v == "sigma_moe" else 400, "params_total": 10,
            "params_active": 5, "params_embedding": 1}
        for v in bpbs
    }  # fmt: skip
    summary = report.summarise(rows, costs, rates)
    assert summary["common_seconds"] == 10.0
    top2, dense = summary["variants"]["top2"], summary["variants"]["dense_active"]
    # top2 seed 0 at 150 tokens: halfway between (100, 3.6) and (200, 2.6).
    assert top2["val_bpb_at_common_seconds"]["values"][0] == pytest.approx(3.1)
    assert dense["val_bpb_at_common_seconds"]["values"] == pytest.approx([4.0, 4.02])
    assert summary["variants"]["dense_total"]["val_bpb_at_common_seconds"]["mean"] == 2.51
    assert top2["val_bpb"]["std"] == pytest.approx(math.sqrt(2e-4))
    claims = {
        claim["claim"].split(" ")[0]: claim for claim in report.literature(summary["variants"])
    }
    assert claims["sigma-MoE"]["reproduced"] and claims["sigma-MoE"]["ffn_flops_share"] == 0.25
    assert claims["BPR"]["reproduced"] and claims["BPR"]["difference"] == pytest.approx(-0.1)
    # task keeps (3.01 - 2.91) / (3.01 - 2.61) = 25% of top2's gain over dense_active.
    assert claims["task-level"]["gain_kept"] == pytest.approx(0.25)
    assert not claims["task-level"]["reproduced"]
    table = report.markdown(summary, list(claims.values()))
    assert "| sigma_moe | 2 | 2.5200 ± 0.0141 |" in table and "not reproduced" in table


@pytest.mark.slow
def test_tiny_sweep_writes_rows_plot_and_table_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    command = [
        sys.executable, str(SCRIPTS / "compare_routing.py"), "--out", str(out),
        "--tokens", "4096", "--seeds", "0", "--variants", "dense_active", "top2",
        "--evals", "2", "--eval-batches", "1", "--group-windows", "2",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| top2 | 1 |" in done.stdout and "| dense_active | 1 |" in done.stdout

    result = json.loads((out / "routing_summary.json").read_text())
    rows = result["rows"]
    assert [(row["variant"], row["seed"]) for row in rows] == [("dense_active", 0), ("top2", 0)]
    for row in rows:
        assert [point["step"] for point in row["curve"]] == [1, 2]
        assert row["curve"][-1]["tokens"] == 4096 and row["train_seconds"] > 0
        assert math.isfinite(row["val_bpb"]) and len(row["val_bpb_per_group"]) == 6
        assert 0.0 <= row["dropped_fraction"] < 1.0
    assert rows[0]["dropped_fraction"] == 0.0  # a dense model drops nothing
    assert result["variants"]["top2"]["params_total"] == HAND["top2"][0]
    assert all(
        result["variants"][v]["tokens_per_s_interleaved"] > 0 for v in ("top2", "dense_active")
    )
    assert (out / "routing_bpb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "2 runs already finished" in again.stderr
    assert json.loads((out / "routing_summary.json").read_text())["rows"] == rows


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--tokens", "0"], "--tokens 0 is invalid"),
        (["--budget-s", "-1"], "--budget-s -1.0 is invalid"),
        (["--seeds", "0", "0"], "repeats a seed"),
        (["--variants", "top3"], "invalid choice"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    script: ModuleType, arguments: list[str], message: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--out", str(out), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_report_only_needs_a_sweep(script: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--out", str(tmp_path / "sweep"), "--report-only"])
    assert "--report-only" in str(exit_info.value.code) and "does not exist" in str(
        exit_info.value.code
    )
    assert not (tmp_path / "sweep").exists()
