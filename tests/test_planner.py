"""The inference planner (moe.planning.planner, moe.planning.hardware, launch.plan).

Every term is checked against numbers worked out by hand in this file for a small model
(no planner code is reused to compute the expectation):

    V=16, D=8, 2 blocks, 2 heads of 4, 1 KV head; block 0 MoE (E=4 experts of H=4,
    K=2), block 1 dense (F=16); gelu (2 matrices per FFN); tied embeddings.
    attention: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192 params; expert 8x4 + 4x8 = 64;
    dense FFN 8x16 + 16x8 = 256; router 8x4 = 32; embedding 16x8 = 128.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from moe.planning.hardware import Hardware, load_hardware
from moe.planning.model_costs import ModelShape, Workload, experts_touched
from moe.planning.planner import Layout, estimate, plan

ROOT = Path(__file__).resolve().parent.parent

SMALL = ModelShape(
    vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4,
    ffn_hidden=16, expert_hidden=4, experts_per_block=(4, 0), top_k=2,
)  # fmt: skip
# Round numbers so that times are easy to work out: 1000 FLOP/s, 1000 B/s.
HW = Hardware(
    name="toy", chips=4, chips_per_node=4, peak_flops_fp32=1000.0, peak_flops_bf16=2000.0,
    peak_flops_int8=4000.0, memory_bytes=1e6, memory_bandwidth=1000.0,
    intra_node_bandwidth=1e4, intra_node_latency_s=1e-4, inter_node_bandwidth=1e3,
    inter_node_latency_s=1e-3, collective_call_s=1e-3, host_step_s=0.5, host_layer_s=0.25,
    host_expert_s=0.1, host_expert_int8_s=0.2, host_sequence_s=0.01, host_token_s=0.001,
)  # fmt: skip
FP32 = Workload(batch=3, prompt_len=6, gen_len=4, weights="fp32", activations="fp32")


def test_experts_touched_at_one_token_and_many() -> None:
    assert experts_touched(8, 2, 1) == pytest.approx(2.0)  # B = 1 touches exactly K
    assert experts_touched(4, 2, 2) == pytest.approx(3.0)  # 4 * (1 - 0.5^2)
    assert experts_touched(64, 2, 10_000) == pytest.approx(64.0)  # large B: every expert
    assert experts_touched(64, 1, 64) == pytest.approx(64 * (1 - (63 / 64) ** 64))


def test_decode_terms_by_hand() -> None:
    e = estimate(SMALL, FP32, HW, "replicated", 1).decode
    # weights: non-expert (attention 2x192, router 32, dense FFN 256, embedding 128) x 4 B
    # = 3200; experts touched by 3 tokens: 4 * (1 - (1/2)^3) = 3.5 of 64 x 4 B = 896;
    # KV: 3 sequences x context (6 + 4/2 = 8) x 2 blocks x (K and V) x 1 head x 4 x 4 B.
    assert e.bytes_read_per_chip == pytest.approx(3200 + 896 + 3 * 8 * 2 * 2 * 4 * 4)
    assert e.memory_s == pytest.approx(5632 / 1000)
    # FLOPs: 3 tokens x (2 x active (block 0: 192 + 2 x 64 + 32; block 1: 192 + 256;
    # LM head 128 = 928) + attention 4 x 8 x 2 heads x 4 x 2 blocks = 512).
    assert e.flops_per_chip == pytest.approx(3 * (2 * 928 + 512))
    assert e.compute_s == pytest.approx(7.104)
    host = 0.5 + 0.25 * 2 + 0.1 * 3.5 + 0.01 * 3 + 0.001 * 3
    assert e.host_s == pytest.approx(host)
    assert e.comm_s == 0.0
    assert e.time_s == pytest.approx(max(7.104, 5.632) + host)


def test_prefill_terms_and_mfu_by_hand() -> None:
    est = estimate(SMALL, FP32, HW, "replicated", 1)
    p = est.prefill
    tokens = 3 * 6
    touched = 4 * (1 - 0.5**tokens)
    assert p.bytes_read_per_chip == pytest.approx(3200 + touched * 256 + tokens * 2 * 2 * 4 * 4)
    # causal attention: each prompt token attends over 6 / 2 = 3 positions on average
    flops = tokens * (2 * 928 + 4 * 3 * 2 * 4 * 2)
    assert p.flops_per_chip == pytest.approx(flops)
    host = 0.5 + 0.5 + 0.1 * touched + 0.01 * 3 + 0.001 * tokens
    assert p.time_s == pytest.approx(max(flops / 1000, p.memory_s) + host)
    assert est.prefill_mfu == pytest.approx(2 * 928 * tokens / 1000 / p.time_s)


def test_memory_per_chip_by_hand() -> None:
    est = estimate(SMALL, FP32, HW, "replicated", 1)
    # every weight (3200 + 4 experts x 256) and the KV of 3 sequences x 10 positions
    assert est.weight_bytes_per_chip == pytest.approx(3200 + 1024)
    assert est.kv_bytes_per_chip == pytest.approx(3 * 10 * 64)
    assert est.fits
    # weight-gathered over 4: a quarter of every weight + the largest block gathered (block
    # 0: (192 + 32) x 4 + 4 experts x 256 = 1920); the KV of 1 of the 3 sequences
    gathered = estimate(SMALL, FP32, HW, "weight_gathered", 4)
    assert gathered.weight_bytes_per_chip == pytest.approx(4224 / 4 + 1920)
    assert gathered.kv_bytes_per_chip == pytest.approx(1 * 10 * 64)
    # 1D tensor parallel over 4: a quarter of the weights; KV split over min(4, B=3) chips
    one_d = estimate(SMALL, FP32, HW, "tp_1d", 4)
    assert one_d.weight_bytes_per_chip == pytest.approx(4224 / 4)
    assert one_d.kv_bytes_per_chip == pytest.approx(3 * 10 * 64 / 3)
    tight = Hardware(**{**HW.to_dict(), "memory_bytes": 3200 + 1024 + 1919})
    assert not estimate(SMALL, FP32, tight, "replicated", 1).fits


def test_expert_parallel_all_to_all_by_hand() -> None:
    work = Workload(batch=4, prompt_len=6, gen_len=4, weights="fp32", activations="fp32")
    est = estimate(SMALL, work, HW, "expert_parallel", 2)
    # 2 sequences per chip send 2 tokens x K=2 x D=8 x 4 B = 128 B; one node of 2: flat
    # = 1 call + 1 message latency + half the bytes over the link; dispatch and combine.
    one = 1e-3 + 1e-4 + 64 / 1e4
    assert est.decode.all_to_all == "flat"
    assert est.decode.comm_s == pytest.approx(2 * one)
    # experts stored: 2 of 4 per chip; KV of 2 sequences
    assert est.weight_bytes_per_chip == pytest.approx(3200 + 2 * 256)
    # reads: non-expert + (experts touched by all 4 tokens) / 2 chips + KV of 2 sequences
    touched = 4 * (1 - 0.5**4)
    assert est.decode.bytes_read_per_chip == pytest.approx(3200 + touched * 256 / 2 + 2 * 8 * 64)


def test_tensor_parallel_and_weight_gathered_comm_by_hand() -> None:
    act = 3 * 8 * 4  # B*L*D activations of a decode step, fp32 bytes
    one_d = estimate(SMALL, FP32, HW, "tp_1d", 2).decode
    ring = act / 2 / 1e4 + 1e-3 + 1e-4  # (n-1)/n of the bytes, 1 launch, n-1 hops
    assert one_d.comm_s == pytest.approx(2 * 2 * 2 * ring)  # blocks x sublayers x (AG + RS)
    two_d = estimate(SMALL, FP32, HW, "tp_2d", 4).decode
    sublayer = 8 * act / (2 * 1e4) + 4 * (1e-3 + 1 * 1e-4)  # Pope: 8BLE / (sqrt(n) bw)
    assert two_d.comm_s == pytest.approx(2 * 2 * sublayer)
    gathered = estimate(SMALL, FP32, HW, "weight_gathered", 2).decode
    touched_bytes = 4 * (1 - 0.5**3) * 256
    block0 = (192 + 32) * 4 + touched_bytes
    block1 = (192 + 256) * 4
    expected = sum(b / 2 / 1e4 + 1e-3 + 1e-4 for b in (block0, block1))
    assert gathered.comm_s == pytest.approx(expected)
    # across nodes the slower link is used
    wide = Hardware(**{**HW.to_dict(), "chips_per_node": 2})
    assert estimate(SMALL, FP32, wide, "tp_1d", 4).decode.comm_s == pytest.approx(
        2 * 2 * 2 * (act * 3 / 4 / 1e3 + 1e-3 + 3 * 1e-3)
    )


def test_int8_halves_bf16_weight_bytes() -> None:
    big = ModelShape(
        vocab_size=256, d_model=4096, n_layers=2, n_heads=32, n_kv_heads=8, head_dim=128,
        ffn_hidden=14336, expert_hidden=14336, experts_per_block=(8, 8), top_k=2,
    )  # fmt: skip
    bf16 = estimate(big, Workload(weights="bf16"), HW, "replicated", 1).weight_bytes_per_chip
    int8 = estimate(big, Workload(weights="int8"), HW, "replicated", 1).weight_bytes_per_chip
    embeddings = 256 * 4096 * 2  # kept in the activation precision
    routers = 2 * 4096 * 8 * 2
    ratio = (int8 - embeddings - routers) / (bf16 - embeddings - routers)
    assert 0.5 < ratio < 0.5005  # exactly half plus the fp32 scales (4 B per output)
    # by hand on the small model: one expert int8 = 64 B + 4 B x (4 + 8) outputs
    small_int8 = Workload(batch=1, weights="int8", activations="bf16", int8_scope="experts")
    est = estimate(SMALL, small_int8, HW, "replicated", 1)
    assert est.weight_bytes_per_chip == pytest.approx(3200 / 2 + 4 * (64 + 48))


@pytest.mark.parametrize("layout", [layout.value for layout in Layout])
def test_more_chips_never_raise_memory_per_chip(layout: str) -> None:
    work = Workload(batch=16, prompt_len=32, gen_len=32)
    big = Hardware(**{**HW.to_dict(), "chips": 8, "chips_per_node": 4})
    chips = [1, 2, 4] if layout == "expert_parallel" else [1, 2, 4, 8]
    if layout != "replicated":
        chips = chips[1:]
    memory = [estimate(SMALL, work, big, layout, n).memory_per_chip for n in chips]
    assert all(b <= a for a, b in itertools.pairwise(memory)), memory


def test_plan_ranks_fitting_rows_by_cost_and_latency() -> None:
    rows = plan(SMALL, FP32, HW, objective="cost")
    costs = [r.chip_s_per_token(3) for r in rows if r.fits]
    assert costs == sorted(costs)
    fast = plan(SMALL, FP32, HW, objective="latency")
    assert fast[0].decode.time_s == min(r.decode.time_s for r in fast)
    target = plan(SMALL, FP32, HW, latency_target_ms=1e3 * fast[0].decode.time_s)
    assert target[0].decode.time_s <= fast[0].decode.time_s
    with pytest.raises(ValueError, match=r"plan\.objective"):
        plan(SMALL, FP32, HW, objective="speed")


def test_bad_hardware_file_names_the_field(tmp_path: Path) -> None:
    good = load_hardware(ROOT / "conf/hardware/h100x8.yaml")
    assert good.chips == 8 and good.peak_flops_bf16 == pytest.approx(9.89e14)
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "conf/hardware/h100x8.yaml").read_text().replace(
        "memory_bandwidth: 3.35e+12", "memory_bandwidth: -3"))  # fmt: skip
    with pytest.raises(ValueError, match=r"hardware\.memory_bandwidth=-3.*> 0"):
        load_hardware(bad)
    bad.write_text("chips: 8\nchips_per_node: 8\nmemory_bandwith: 1.0e+12\n")
    with pytest.raises(ValueError, match=r"memory_bandwith.*accepted: .*memory_bandwidth"):
        load_hardware(bad)
    with pytest.raises(ValueError, match=r"hardware\.chips=12 .*multiple of chips_per_node=8"):
        Hardware(chips=12, chips_per_node=8)


def test_bad_model_shape_names_the_field() -> None:
    fields = {**SMALL.__dict__}
    with pytest.raises(ValueError, match=r"model\.n_kv_heads=3"):
        ModelShape(**{**fields, "n_kv_heads": 3})
    with pytest.raises(ValueError, match=r"model\.top_k=5 .*at most .*4"):
        ModelShape(**{**fields, "top_k": 5})
    with pytest.raises(ValueError, match=r"model\.experts_per_block"):
        ModelShape(**{**fields, "experts_per_block": (4,)})
    with pytest.raises(ValueError, match=r"plan\.precision='fp8'.*fp32, bf16, int8"):
        Workload(weights="fp8")
    with pytest.raises(ValueError, match="expert_parallel over 4 chips"):
        estimate(ModelShape(**{**fields, "experts_per_block": (2, 0)}), FP32, HW,
                 "expert_parallel", 4)  # fmt: skip


def _compose(overrides: list[str]) -> object:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("plan", overrides=overrides)


def test_cli_prints_a_table_and_rejects_a_bad_override(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`main` under Hydra's compose (the `@hydra.main` layer is Hydra's own): the example
    command of the issue, and a bad override exiting 2 with one line."""
    from launch import plan as plan_cli

    entry = plan_cli.main.__wrapped__  # type: ignore[attr-defined]
    out = tmp_path / "plan.json"
    entry(_compose(["model=small", "hardware=h100x8", "plan.batch=8", f"plan.json={out}"]))
    printed = capsys.readouterr().out
    assert "| 1 | " in printed and "expert_parallel" in printed and "on h100x8" in printed
    assert out.is_file() and '"rows"' in out.read_text()
    with pytest.raises(SystemExit) as exit_info:
        entry(_compose(["plan.precision=fp8"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("launch.plan: plan.precision='fp8'")


def test_local_preset_is_measured() -> None:
    text = (ROOT / "conf/hardware/local.yaml").read_text()
    assert "written by" in text and "calibrate_hardware.py" in text
    local = load_hardware(ROOT / "conf/hardware/local.yaml")
    assert local.chips == 1 and math.isfinite(local.host_step_s)


def test_the_planner_imports_no_torch() -> None:
    """The planner is plain arithmetic: importing it (and the alpha-beta model it uses)
    must not import torch, so it runs anywhere a Python does."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import moe.planning.planner, moe.planning.hardware, moe.planning.model_costs\n"
        "from comm.cost import CostModel\n"
        "CostModel.projected_cluster()\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
