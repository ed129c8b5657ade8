"""Measure this machine for the inference planner and write `conf/hardware/local.yaml`.

What it measures (torch on CPU, `--threads` threads, the fastest of `--repeats`: the
machine is shared, and the minimum is the figure least disturbed by other jobs):
- peak matmul FLOP/s: an [N, N] @ [N, N] matmul in fp32 and bf16, and `torch._int_mm`
  (int8 x int8 -> int32) where this torch has it; bf16 at the full N on a CPU with native
  bf16 matmuls (`moe.precision.bf16_matmul_support`: amx_bf16 or avx512_bf16), else, like
  int8, at N <= 256 (emulated there, too slow for more);
- memory: read bandwidth of `torch.sum` over a buffer far larger than the last-level
  cache; memory size from /proc/meminfo;
- interconnect: an all-to-all between 2 gloo processes on loopback at several sizes,
  fitted to time = latency + bytes sent to the other rank / bandwidth (one host: the
  intra- and inter-node figures are the same wire);
- host overhead of the eager engine: `moe.inference.InferenceEngine` on random-weight
  models of shapes other than the demo model's (which is kept for the check,
  `scripts/plan_check.py`), fp32 and int8 experts, several batch and prompt sizes. Each
  prefill and decode step's time minus the planner's roofline (max(compute, memory) with
  the figures above) is fitted by non-negative least squares on relative error to
  host_step + host_layer * layers + host_expert(_int8) * experts run + host_sequence *
  sequences + host_token * tokens (`moe.planning.hardware`).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/calibrate_hardware.py \\
        [--out conf/hardware/local.yaml] [--json docs/results/planner_calibration_local.json]
        [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_utils import timed_runs
from _engine_timing import fastest_prefill_decode, random_prompts
from _machine import matmul_flops, read_bandwidth

from moe.config import ModelConfig
from moe.inference import InferenceEngine, SamplingParams
from moe.planning.hardware import HOST_FIELDS, Hardware
from moe.planning.model_costs import Costs, Workload, shape_from_config
from moe.planning.planner import estimate
from moe.precision import bf16_matmul_support
from moe.transformer import MoETransformer
from routing import RoutingConfig

A2A_BYTES = (1 << 10, 1 << 14, 1 << 18, 1 << 21, 1 << 23)
# (d_model, n_layers, num_experts, expert_hidden, prompt_len): not the demo shape.
SHAPES = ((64, 2, 4, 64, 16), (64, 4, 16, 64, 40), (128, 2, 4, 128, 40), (128, 3, 16, 64, 24))
BATCHES = (1, 4, 16)
DECODE_STEPS = 8


def fastest_s(run: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed runs after one untimed: on a machine shared with
    other jobs the minimum is the estimate least disturbed by them."""
    return min(timed_runs(run, repeats))


def matmul_peaks(size: int, repeats: int) -> dict[str, float]:
    out = {"fp32": matmul_flops(size, repeats, statistic=min)}
    # Without native bf16 (and for int8 x int8 on CPU) torch has no fast kernel (~0.4 and
    # ~0.2 GFLOP/s at 256 and 512 alike): a smaller matrix keeps the measurement to seconds.
    small = min(size, 256)
    native_bf16, why = bf16_matmul_support(torch.device("cpu"))
    print(f"[calibrate] bf16 matmul: {'native' if native_bf16 else 'emulated'} ({why})")
    out["bf16"] = matmul_flops(
        size if native_bf16 else small, repeats, statistic=min, dtype=torch.bfloat16
    )
    a8 = torch.randint(-127, 127, (small, small), dtype=torch.int8)
    try:
        out["int8"] = 2.0 * small**3 / fastest_s(lambda: torch._int_mm(a8, a8), repeats)
    except (RuntimeError, AttributeError) as error:  # no int8 matmul: use bf16, say so
        print(f"[calibrate] int8 matmul unavailable ({error}); using the bf16 figure")
        out["int8"] = out["bf16"]
    return out


def memory_total_bytes() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _a2a_worker(rank: int, port: int, repeats: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for nbytes in A2A_BYTES:
            send = torch.ones(nbytes // 4)
            recv = torch.empty_like(send)

            def run(recv: torch.Tensor = recv, send: torch.Tensor = send) -> None:
                dist.all_to_all_single(recv, send)

            dist.barrier()
            seconds = fastest_s(run, repeats)
            if rank == 0:
                out[nbytes] = seconds
    finally:
        dist.destroy_process_group()


def loopback_all_to_all(repeats: int) -> tuple[float, float, dict[int, float]]:
    """(latency s, bandwidth B/s, seconds per size) of a 2-rank gloo all-to-all."""
    manager = mp.Manager()
    out = manager.dict()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_a2a_worker, args=(port, repeats, out), nprocs=2, join=True)
    sizes = dict(sorted(out.items()))
    # Each rank sends half its buffer to the other: time = latency + (bytes / 2) / bw.
    x = torch.tensor([[1.0, b / 2] for b in sizes], dtype=torch.float64)
    y = torch.tensor(list(sizes.values()), dtype=torch.float64)
    weighted = x / y.unsqueeze(1)
    latency, per_byte = torch.linalg.lstsq(weighted, torch.ones_like(y).unsqueeze(1)).solution[:, 0]
    return max(float(latency), 1e-9), 1.0 / max(float(per_byte), 1e-15), sizes


def _nnls(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """min |a x - b| with x >= 0: drop the most negative coefficient until none is."""
    active = list(range(a.shape[1]))
    while True:
        solution = torch.linalg.lstsq(a[:, active], b.unsqueeze(1)).solution[:, 0]
        if bool((solution >= 0).all()):
            x = torch.zeros(a.shape[1], dtype=a.dtype)
            x[active] = solution
            return x
        active.pop(int(solution.argmin()))


def engine_rows(hw: Hardware, repeats: int) -> list[dict[str, object]]:
    """Measured prefill and decode step times of random-weight models, with the
    planner's roofline and the host features of each."""
    from moe.inference.quant import quantize_experts

    rows: list[dict[str, object]] = []
    for d_model, layers, experts, hidden, prompt_len in SHAPES:
        config = ModelConfig(
            d_model=d_model, n_layers=layers, n_heads=4, n_kv_heads=2, max_seq_len=128,
            ffn_hidden=2 * hidden, expert_hidden=hidden, num_experts=experts,
        )  # fmt: skip
        for precision in ("fp32", "int8"):
            model = MoETransformer(config, RoutingConfig(top_k=2), None, seed=0).eval()
            if precision == "int8":
                quantize_experts(model)
            shape = shape_from_config(config, top_k=2)
            for batch in BATCHES:
                # fastest repeat (the median of its decode steps): see fastest_s
                new_engine = partial(InferenceEngine, model, max_batch=batch, max_step_tokens=4096)
                params = SamplingParams(max_tokens=DECODE_STEPS + 1, temperature=0.0)
                prefill_s, decode_s = fastest_prefill_decode(
                    new_engine,
                    random_prompts(batch, prompt_len),
                    params,
                    repeats,
                    statistics.median,
                )
                work = Workload(
                    batch=batch, prompt_len=prompt_len, gen_len=DECODE_STEPS,
                    weights=precision, activations="fp32", int8_scope="experts",
                )  # fmt: skip
                est = estimate(shape, work, hw, "replicated", 1)
                costs = Costs(shape, work)
                for phase, seconds, tokens in (
                    ("prefill", prefill_s, batch * prompt_len),
                    ("decode", decode_s, batch),
                ):
                    roof = est.prefill if phase == "prefill" else est.decode
                    run = costs.experts_run(tokens)
                    rows.append({
                        "d_model": d_model, "n_layers": layers, "num_experts": experts,
                        "expert_hidden": hidden, "prompt_len": prompt_len,
                        "precision": precision, "batch": batch, "phase": phase,
                        "measured_s": seconds,
                        "roofline_s": max(roof.compute_s, roof.memory_s),
                        "features": [1.0, float(layers),
                                     run if precision == "fp32" else 0.0,
                                     run if precision == "int8" else 0.0,
                                     float(batch), float(tokens)],
                    })  # fmt: skip
                print(f"[calibrate] d={d_model} L={layers} E={experts} {precision} B={batch}: "
                      f"prefill {1e3 * rows[-2]['measured_s']:.2f} ms, "  # type: ignore[operator]
                      f"decode {1e3 * rows[-1]['measured_s']:.2f} ms", flush=True)  # type: ignore[operator]  # fmt: skip
    return rows


def fit_host(rows: list[dict[str, object]]) -> dict[str, float]:
    a = torch.tensor([r["features"] for r in rows], dtype=torch.float64)
    measured = torch.tensor([r["measured_s"] for r in rows], dtype=torch.float64)
    roof = torch.tensor([r["roofline_s"] for r in rows], dtype=torch.float64)
    scale = a.abs().amax(0).clamp_min(1e-30)
    weighted = a / scale / measured.unsqueeze(1)  # relative error
    x = _nnls(weighted, (measured - roof) / measured) / scale
    predicted = roof + a @ x
    for r, p in zip(rows, predicted.tolist()):
        r["fitted_s"] = p
    return dict(zip(HOST_FIELDS, x.tolist()))


def write_yaml(path: Path, hw: dict[str, object], header: list[str]) -> None:
    lines = [f"# {h}" for h in header] + ["defaults:", "  - base_hardware", "  - _self_", ""]
    for key, value in hw.items():
        if isinstance(value, str):
            lines.append(f"{key}: {json.dumps(value)}")
        elif isinstance(value, float):
            lines.append(f"{key}: {value:.4e}")
        else:
            lines.append(f"{key}: {value}")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="conf/hardware/local.yaml")
    parser.add_argument("--json", default="docs/results/planner_calibration_local.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=2048)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    peaks = matmul_peaks(args.matmul_size, args.repeats)
    bandwidth = read_bandwidth(512 << 20, args.repeats + 4, statistic=min)
    latency, link_bw, a2a = loopback_all_to_all(args.repeats + 4)
    print(f"[calibrate] matmul GFLOP/s {({k: round(v / 1e9, 1) for k, v in peaks.items()})}, "
          f"read {bandwidth / 1e9:.1f} GB/s, loopback a2a {1e6 * latency:.0f} us + "
          f"{link_bw / 1e9:.2f} GB/s", flush=True)  # fmt: skip
    roofline_hw = Hardware(
        name="local", peak_flops_fp32=peaks["fp32"], peak_flops_bf16=peaks["bf16"],
        peak_flops_int8=peaks["int8"], memory_bytes=memory_total_bytes(),
        memory_bandwidth=bandwidth, intra_node_bandwidth=link_bw,
        intra_node_latency_s=latency, inter_node_bandwidth=link_bw,
        inter_node_latency_s=latency,
    )  # fmt: skip
    rows = engine_rows(roofline_hw, args.repeats)
    host = fit_host(rows)
    load_after = os.getloadavg()
    errors = [abs(r["fitted_s"] / r["measured_s"] - 1) for r in rows]  # type: ignore[operator]
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    source = (
        f"measured by scripts/calibrate_hardware.py on {date}, {platform.processor() or 'cpu'}, "
        f"{args.threads} threads, torch {torch.__version__}; 1-min load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (a machine shared with other "
        "jobs when above the core count)"
    )
    hw = Hardware(**{**roofline_hw.to_dict(), **host, "source": source})  # type: ignore[arg-type]
    header = [
        "This machine, MEASURED (do not edit by hand): written by",
        f"  OMP_NUM_THREADS={args.threads} .venv/bin/python scripts/calibrate_hardware.py",
        f"{source}.",
        "One CPU 'chip'; the interconnect is a 2-rank gloo all-to-all on loopback (intra and",
        "inter node are the same wire). host_* terms: the eager engine's per-call overhead",
        f"fitted on {len(rows)} random-weight prefill/decode steps (mean |error| of the fit "
        f"{100 * statistics.mean(errors):.0f}%); see docs/PLANNER.md.",
    ]
    write_yaml(Path(args.out), hw.to_dict(), header)
    record = {"hardware": hw.to_dict(), "matmul_flops": peaks, "read_bandwidth": bandwidth,
              "all_to_all_s": {str(k): v for k, v in a2a.items()}, "rows": rows,
              "fit_mean_abs_error": statistics.mean(errors)}  # fmt: skip
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"[calibrate] host terms { ({k: f'{v * 1e6:.1f} us' for k, v in host.items()}) }; "
        f"fit mean |error| {100 * statistics.mean(errors):.0f}%; wrote {args.out}, {args.json}"
    )


if __name__ == "__main__":
    main()
