"""Check the inference planner against measurement, reproduce a Pope et al. operating
point, and project our MoE shapes onto H100 clusters.

1. This machine: the planner's prefill and decode step times of the demo model (shape
   from the checkpoint the benchmark used) on `conf/hardware/local.yaml`, one chip,
   `replicated`, fp32 and int8 experts (fp32 activations, as the engine runs them), at
   the batch sizes of `scripts/bench_generate.py`'s saved JSON, against its measured
   medians; the error per point with the calibrated host-overhead terms and without
   them (the roofline alone).
2. PaLM 540B on 64 TPU v4 chips (Pope et al. 2022): the shape and the chip's figures
   from the paper (Sec. 2 and 4), int8 weights, batch 64, 2048-token context, 2D
   weight-stationary decode, beside the paper's ~29 ms per token; and its large-batch
   prefill MFU (weight-gathered, bf16) beside the paper's 76%.
3. Projections: the demo shape with 8 and 64 experts per layer and a Mixtral-8x7B-like
   shape on `h100x8` and `h100x512`, bf16, the best layout per batch size.

   `--measure-now` also re-measures the engine on the demo checkpoint in the calibration's
   conditions (`--threads`, the fastest of `--repeats`, 16 new tokens) and checks the
   planner against that too.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/plan_check.py [--measure-now] \\
        [--bench docs/results/bench_generate_token_2026-11-25.json] \\
        [--hardware conf/hardware/local.yaml] [--json docs/results/planner_check.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _engine_timing import fastest_prefill_decode, random_prompts

from moe.checkpoint import read_meta
from moe.config import ModelConfig
from moe.inference.loading import configs_of, resolve_checkpoint
from moe.planning.hardware import HOST_FIELDS, Hardware, load_hardware
from moe.planning.model_costs import ModelShape, Workload, shape_from_config
from moe.planning.planner import estimate, plan

# Pope et al. 2022, Sec. 4: TPU v4, 275 TFLOP/s bf16 (int8 weights are computed in bf16),
# 32 GiB HBM at 1200 GB/s per chip, 3D-torus ICI. The per-chip network bandwidth used in
# their estimates is our reading of the paper (270 GB/s); latencies are assumptions.
TPU_V4_64 = Hardware(
    name="tpu_v4x64 (Pope et al.)", chips=64, chips_per_node=64, peak_flops_fp32=275e12,
    peak_flops_bf16=275e12, peak_flops_int8=275e12, memory_bytes=32 * 2**30,
    memory_bandwidth=1.2e12, intra_node_bandwidth=270e9, intra_node_latency_s=1e-6,
    inter_node_bandwidth=270e9, inter_node_latency_s=1e-6, collective_call_s=0.0,
    source="Pope et al. 2022 Sec. 4 (TPU v4); latencies assumed",
)  # fmt: skip
# PaLM 540B (Chowdhery et al. 2022, Table 1): 118 layers, D 18432, 48 heads of 256,
# multi-query (1 KV head), SwiGLU FFN 4D, 256k vocabulary, shared embeddings, parallel
# attention + FFN blocks.
PALM_540B = ModelShape(
    vocab_size=256000, d_model=18432, n_layers=118, n_heads=48, n_kv_heads=1, head_dim=256,
    ffn_hidden=73728, expert_hidden=1, experts_per_block=(0,) * 118, top_k=1, ffn_matrices=3,
    parallel_block=True, name="PaLM 540B",
)  # fmt: skip
# Mixtral 8x7B (Jiang et al. 2024): 32 layers, D 4096, 32 heads / 8 KV heads of 128,
# 8 SwiGLU experts of 14336, top-2, 32k vocabulary, untied embeddings.
MIXTRAL = ModelShape(
    vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
    ffn_hidden=14336, expert_hidden=14336, experts_per_block=(8,) * 32, top_k=2,
    ffn_matrices=3, tie_embeddings=False, name="Mixtral-8x7B-like",
)  # fmt: skip
PROJECTION_BATCHES = (1, 8, 32, 128, 512)


def measure_now(
    checkpoint: str, batches: list[int], prompt_len: int, new_tokens: int, repeats: int
) -> dict:
    """The engine's prefill and decode step times on the demo checkpoint, measured now in
    the calibration's conditions (the caller's threads; the fastest of `repeats`, as
    `scripts/calibrate_hardware.py` takes them), in the shape of the benchmark JSON."""
    import statistics
    from functools import partial

    from moe.inference import InferenceEngine, SamplingParams, load_model

    rows = []
    for variant in ("fp32", "int8"):
        loaded = load_model(checkpoint, quantize="none" if variant == "fp32" else "int8")
        for batch in batches:
            new_engine = partial(InferenceEngine, loaded.model, max_batch=batch,
                                 max_step_tokens=4096, task_ids=loaded.task_ids)  # fmt: skip
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
            prefill_s, decode_s = fastest_prefill_decode(
                new_engine, random_prompts(batch, prompt_len), params, repeats, statistics.mean
            )
            rows.append({"variant": variant, "batch": batch, "prefill_ms": 1e3 * prefill_s,
                         "decode_step_ms": 1e3 * decode_s,
                         "bytes_per_decode_step": float("nan")})  # fmt: skip
            print(f"[plan_check] measured now: {variant} B={batch} prefill "
                  f"{rows[-1]['prefill_ms']:.1f} ms, decode {rows[-1]['decode_step_ms']:.1f} ms",
                  flush=True)  # fmt: skip
    settings = {"checkpoint": checkpoint, "prompt_len": prompt_len, "new_tokens": new_tokens}
    return {"settings": settings, "rows": rows}


def check_local(bench: dict, hw: Hardware) -> list[dict]:
    """Planner vs measured, per (variant, batch), with and without the host terms."""
    settings = bench["settings"]
    model_config, routing = configs_of(read_meta(resolve_checkpoint(settings["checkpoint"])))
    shape = shape_from_config(model_config, routing.top_k if routing else 2, "demo")
    roofline = dataclasses.replace(hw, **{k: 0.0 for k in HOST_FIELDS})
    out = []
    for row in bench["rows"]:
        if row["variant"] not in ("fp32", "int8"):
            continue
        work = Workload(
            batch=row["batch"], prompt_len=settings["prompt_len"], gen_len=settings["new_tokens"],
            weights=row["variant"], activations="fp32", int8_scope="experts",
        )  # fmt: skip
        with_host = estimate(shape, work, hw, "replicated", 1)
        without = estimate(shape, work, roofline, "replicated", 1)
        for phase, measured_ms in (("prefill", row["prefill_ms"]),
                                   ("decode", row["decode_step_ms"])):  # fmt: skip
            a, b = getattr(with_host, phase), getattr(without, phase)
            out.append({
                "variant": row["variant"], "batch": row["batch"], "phase": phase,
                "measured_ms": measured_ms, "predicted_ms": 1e3 * a.time_s,
                "error": a.time_s * 1e3 / measured_ms - 1,
                "roofline_ms": 1e3 * b.time_s, "roofline_error": b.time_s * 1e3 / measured_ms - 1,
                "host_ms": 1e3 * a.host_s, "memory_ms": 1e3 * a.memory_s,
                "compute_ms": 1e3 * a.compute_s,
                "bytes_read": a.bytes_read_per_chip,
                "bench_bytes_per_decode_step": row["bytes_per_decode_step"],
            })  # fmt: skip
    return out


def palm() -> dict:
    decode_work = Workload(batch=64, prompt_len=2048, gen_len=64, weights="int8",
                           activations="bf16")  # fmt: skip
    decode = estimate(PALM_540B, decode_work, TPU_V4_64, "tp_2d", 64)
    ranked = plan(PALM_540B, decode_work, TPU_V4_64, objective="latency")
    prefill_work = Workload(batch=512, prompt_len=2048, gen_len=1, weights="bf16",
                            activations="bf16")  # fmt: skip
    prefill = estimate(PALM_540B, prefill_work, TPU_V4_64, "weight_gathered", 64)
    d = decode.decode
    return {
        "decode_int8_b64_tp2d_64chips": {
            "paper_ms_per_token": 29.0, "estimate_ms_per_token": 1e3 * d.time_s,
            "compute_ms": 1e3 * d.compute_s, "memory_ms": 1e3 * d.memory_s,
            "comm_ms": 1e3 * d.comm_s, "weight_gb_per_chip": decode.weight_bytes_per_chip / 1e9,
            "kv_gb_per_chip": decode.kv_bytes_per_chip / 1e9, "fits": decode.fits,
        },
        "best_decode_layout": {"layout": ranked[0].layout, "chips": ranked[0].chips,
                               "ms_per_token": ranked[0].decode_ms_per_token},
        "prefill_bf16_b512_weight_gathered_64chips": {
            "paper_mfu": 0.76, "estimate_mfu": prefill.prefill_mfu,
            "estimate_s": prefill.prefill.time_s, "comm_s": prefill.prefill.comm_s,
        },
    }  # fmt: skip


def projections(hardware_dir: Path) -> list[dict]:
    small = ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128,
                        ffn_hidden=256, expert_hidden=128, num_experts=8)  # fmt: skip
    shapes = [
        shape_from_config(small, 2, "demo, 8 experts"),
        shape_from_config(dataclasses.replace(small, num_experts=64), 2, "demo, 64 experts"),
        MIXTRAL,
    ]
    out = []
    for hw_name in ("h100x8", "h100x512"):
        hw = load_hardware(hardware_dir / f"{hw_name}.yaml")
        for shape in shapes:
            for batch in PROJECTION_BATCHES:
                work = Workload(batch=batch, prompt_len=512, gen_len=256, weights="bf16",
                                activations="bf16")  # fmt: skip
                for objective in ("latency", "cost"):
                    best = plan(shape, work, hw, objective=objective)[0]
                    out.append({
                        "hardware": hw_name, "model": shape.name, "batch": batch,
                        "objective": objective, "layout": best.layout, "chips": best.chips,
                        "decode_ms_per_token": best.decode_ms_per_token,
                        "chip_ms_per_token": 1e3 * best.chip_s_per_token(batch),
                        "prefill_ms": 1e3 * best.prefill.time_s, "prefill_mfu": best.prefill_mfu,
                        "gb_per_chip": best.memory_per_chip / 1e9, "fits": best.fits,
                        "a2a": best.decode.all_to_all,
                    })  # fmt: skip
    return out


def _print_check(label: str, local: list[dict]) -> None:
    print(f"\n## planner vs {label}\n")
    print("| variant | B | phase | measured ms | planner ms | error | roofline-only ms | error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in local:
        print(f"| {r['variant']} | {r['batch']} | {r['phase']} | {r['measured_ms']:.2f} "
              f"| {r['predicted_ms']:.2f} | {100 * r['error']:+.0f}% | {r['roofline_ms']:.3f} "
              f"| {100 * r['roofline_error']:+.0f}% |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", default="docs/results/bench_generate_token_2026-11-25.json")
    parser.add_argument("--hardware", default="conf/hardware/local.yaml")
    parser.add_argument("--json", default="docs/results/planner_check.json")
    parser.add_argument(
        "--measure-now",
        action="store_true",
        help="also re-measure the engine now, in the calibration's conditions",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    bench = json.loads(Path(args.bench).read_text())
    hw = load_hardware(args.hardware)
    checks = {"saved benchmark": check_local(bench, hw)}
    if args.measure_now:
        import torch

        torch.set_num_threads(args.threads)
        now = measure_now(bench["settings"]["checkpoint"], bench["settings"]["batches"],
                          bench["settings"]["prompt_len"], 16, args.repeats)  # fmt: skip
        checks["measured now"] = check_local(now, hw)
    for label, local in checks.items():
        _print_check(label, local)
    palm_result = palm()
    print("\n## PaLM 540B on 64 TPU v4 (Pope et al. 2022)\n")
    print(json.dumps(palm_result, indent=1))
    projected = projections(Path(args.hardware).parent)
    print("\n## projections (bf16, prompt 512, generate 256): best layout per batch\n")
    print(
        "| hardware | model | B | objective | layout | chips | decode ms/tok | chip-ms/tok "
        "| GB/chip | a2a |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in projected:
        print(f"| {r['hardware']} | {r['model']} | {r['batch']} | {r['objective']} "
              f"| {r['layout']} | {r['chips']} | {r['decode_ms_per_token']:.3f} "
              f"| {r['chip_ms_per_token']:.4f} | {r['gb_per_chip']:.2f} | {r['a2a']} |")  # fmt: skip
    record = {"bench": args.bench, "hardware": hw.to_dict(), "local": checks,
              "palm": palm_result, "projections": projected}  # fmt: skip
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n[plan_check] wrote {args.json}")


if __name__ == "__main__":
    main()
