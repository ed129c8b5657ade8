"""Benchmark of batched generation on CPU: prefill and decode tokens/s of the inference
engine at several batch sizes, each decode figure against this machine's floor.

Variants (one checkpoint, built three ways):
- fp32:   the checkpoint as trained (`load_model`);
- subset: a task subset checkpoint, `--subset`, or else written once into a temporary
          directory by `write_subset(checkpoint, --task, coverage=0.99)`; requests carry
          the task id;
- int8:   `load_model(quantize="int8")`: int8 weight-only experts;
- compiled (`--compile`): the fp32 checkpoint decoding through the compiled step
          (`InferenceEngine(compile=True)`, `moe.inference.decode`): one engine of
          `max_batch` = the largest B, built (and its buckets compiled, timed and
          reported under "compile") before the measurements, reused by every B. Its
          floor is fp32's (same model, same routing); its padded MoE layout reads every
          expert of a layer, which the floor does not count.
With `--precision fp32,bf16` (or `bf16` alone), also:
- bf16:      `load_model(precision="bf16")`: bf16 weights and KV cache, fp32 sampling;
- int8_bf16: int8 experts with bf16 activations in an otherwise bf16 model.
A variant whose module (`moe.inference.subset`, `moe.inference.quant`) does not import
is skipped with the reason printed.

One measurement (variant, B): B distinct prompts of `--prompt-len` bytes from the
validation text of task `--task` (the checkpoint's own data config, the KJV for the
demo runs), greedy, `max_tokens=--new-tokens`, all submitted to a fresh
`InferenceEngine(max_batch=B)`. The first `step()` prefills every prompt in one call
and samples each first token; the other new_tokens - 1 steps decode one token per
request. prefill tokens/s = B * prompt_len / first step; decode tokens/s =
B * (new_tokens - 1) / the decode steps. B = 1 is "one request at a time", the baseline
of the target: decode tokens/s at the largest B over B = 1 (issue 7 asks >= 8 at 32).
Every (variant, B) runs once untimed first (warm-up; it also counts the routing, see
below); the timed rounds then run every (variant, B) once each, the first one rotating
from round to round (`_bench_utils.interleaved_times`); figures are medians.

Floor of a decode step (Pope et al. 2022; docs/METHODS.md, "Inference cost"):
- memory: bytes read / read bandwidth. Bytes = every non-expert parameter (tied
  embeddings once) + per MoE layer the experts the step touched x bytes per expert (the
  nbytes of the expert tensors: fp32 or bf16 weights, or int8 weights + fp32 scales) +
  the KV cache read (each sequence's length x blocks x 2 x kv heads x head width x the
  bytes of the model's dtype: 4, or 2 in bf16),
  averaged over the decode steps. Experts touched are counted from the routing of each
  decode step (a forward hook on the routers, in the untimed run); the uniform-routing
  expectation E * (1 - (1 - K/E)^B) is reported beside them.
- compute: 2 * active parameters * B FLOPs over the FLOP/s of a large matmul in the
  variant's dtype (fp32, or bf16 for the bf16 variants).
Bandwidth is measured in the same run: the median time of `torch.sum` over a buffer far
larger than the last-level cache (and of a copy, reported). `floor_fraction` = memory
floor / measured step (1.0 = at the floor); `roofline_fraction` uses max(memory,
compute); `bound` names the larger. The demo model's weights fit in the L3 cache, so
`cached_floor_fraction` repeats the memory floor with the read bandwidth of a buffer of
the step's size, read over and over (it stays cached as the weights do).

Here: the arguments, the run of every measurement, the rows, table, JSON and plot. The
variants, prompts, timed runs and decode-step traffic are in
`scripts/_generate_workloads.py`; the machine's figures in `scripts/_machine.py`.

    python scripts/bench_generate.py [--checkpoint runs/demo_token] [--subset PATH]
        [--task 0] [--batches 1,8,32] [--prompt-len 64] [--new-tokens 64] [--repeats 3]
        [--threads 2] [--json PATH] [--plot PATH] [--quick] [--precision fp32,bf16]
        [--compile] [--compile-backend inductor]

Shapes: B requests (batch), P prompt bytes, N new tokens per request, E experts of a
layer, K experts per token.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _bench_utils import MIB, interleaved_times
from _generate_workloads import (
    Measurement,
    build_variants,
    count_traffic,
    run_requests,
    validation_prompts,
)
from _machine import copy_bandwidth, cpu_model, matmul_flops, read_bandwidth

VARIANTS = ("fp32", "bf16", "subset", "int8", "int8_bf16", "compiled", "compiled_compact")
PRECISIONS = ("fp32", "bf16")
TARGET_RATIO = 8.0
# Compiled decode tokens/s over fp32's, by batch (issue 26's targets).
COMPILED_TARGETS = {1: 4.0, 32: 3.0}
REQUIRED_KEYS = (
    "variant", "batch", "prefill_tokens_per_s", "decode_tokens_per_s", "floor_fraction"
)  # fmt: skip


# --- output ---------------------------------------------------------------------------


def make_row(m: Measurement, args: argparse.Namespace, machine: dict) -> dict:
    prefill_s = statistics.median(t.prefill_s for t in m.timings)
    decode_s = statistics.median(t.decode_s for t in m.timings)
    steps = args.new_tokens - 1
    step_s = decode_s / steps
    memory_s = m.traffic.bytes_per_step / (machine["read_gbs"] * 1e9)
    cached_s = m.traffic.bytes_per_step / (machine["read_gbs_cached"] * 1e9)
    flops = machine["matmul_flops_bf16" if m.variant.compute_dtype == "bf16" else "matmul_flops"]
    compute_s = m.traffic.flops_per_step / flops
    return {
        "variant": m.variant.name,
        "batch": m.batch,
        "prefill_tokens_per_s": m.batch * args.prompt_len / prefill_s,
        "decode_tokens_per_s": m.batch * steps / decode_s,
        "floor_fraction": memory_s / step_s,
        "decode_step_ms": 1e3 * step_s,
        "prefill_ms": 1e3 * prefill_s,
        "memory_floor_ms": 1e3 * memory_s,
        "compute_floor_ms": 1e3 * compute_s,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "roofline_fraction": max(memory_s, compute_s) / step_s,
        "cached_floor_fraction": cached_s / step_s,
        "bytes_per_decode_step": m.traffic.bytes_per_step,
        "experts_per_layer": m.traffic.experts_per_layer,
        "experts_touched_per_layer": m.traffic.experts_touched_per_layer,
        "experts_expected_per_layer": m.traffic.experts_expected_per_layer,
        "experts_touched_from": "routing of each decode step",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": len(m.timings),
    }


def decode_ratios(rows: list[dict]) -> dict[str, dict]:
    """Per variant: decode tokens/s at the largest batch over batch 1."""
    ratios = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        own = {r["batch"]: r["decode_tokens_per_s"] for r in rows if r["variant"] == variant}
        if 1 not in own or len(own) < 2:
            continue
        largest = max(own)
        ratio = own[largest] / own[1]
        ratios[variant] = {
            "batch": largest, "baseline_batch": 1, "decode_ratio": ratio,
            "target": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO,
        }  # fmt: skip
    return ratios


def compiled_speedups(rows: list[dict]) -> dict[str, dict]:
    """Per batch: compiled decode tokens/s over fp32's, against COMPILED_TARGETS."""
    by = {(r["variant"], r["batch"]): r["decode_tokens_per_s"] for r in rows}
    out = {}
    for (variant, batch), speed in by.items():
        if variant.startswith("compiled") and ("fp32", batch) in by:
            ratio = speed / by["fp32", batch]
            target = COMPILED_TARGETS.get(batch)
            key = str(batch) if variant == "compiled" else f"{variant}/{batch}"
            out[key] = {"speedup": ratio, "target": target,
                        "meets_target": None if target is None else ratio >= target}  # fmt: skip
    return out


def format_table(rows: list[dict], ratios: dict[str, dict]) -> str:
    header = (
        f"{'variant':<7} {'B':>3} | {'prefill tok/s':>13} {'decode tok/s':>12} "
        f"{'step ms':>8} | {'mem fl ms':>9} {'cmp fl ms':>9} {'bound':>7} {'floor fr':>8} "
        f"{'cached fr':>9} | {'experts touched/held (exp.)':>27}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['variant']:<7} {r['batch']:>3} | {r['prefill_tokens_per_s']:>13.0f} "
            f"{r['decode_tokens_per_s']:>12.0f} {r['decode_step_ms']:>8.2f} | "
            f"{r['memory_floor_ms']:>9.3f} {r['compute_floor_ms']:>9.3f} {r['bound']:>7} "
            f"{r['floor_fraction']:>8.3f} {r['cached_floor_fraction']:>9.3f} | "
            f"{r['experts_touched_per_layer']:>9.2f} / {r['experts_per_layer']:<4.3g} "
            f"({r['experts_expected_per_layer']:.2f})"
        )
    for variant, ratio in ratios.items():
        verdict = "meets" if ratio["meets_target"] else "misses"
        lines.append(
            f"{variant}: decode tok/s at B={ratio['batch']} / B=1 = {ratio['decode_ratio']:.2f}x "
            f"({verdict} the {TARGET_RATIO:.0f}x target)"
        )
    return "\n".join(lines)


def plot_decode(rows: list[dict], path: str, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for index, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        own = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["batch"])
        batches = [r["batch"] for r in own]
        color = f"C{index}"
        ax.plot(batches, [r["decode_tokens_per_s"] for r in own], "o-", color=color,
                label=f"{variant} measured")  # fmt: skip
        floor = [1e3 * r["batch"] / max(r["memory_floor_ms"], r["compute_floor_ms"]) for r in own]
        ax.plot(batches, floor, "--", color=color, label=f"{variant} floor")
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yscale("log")
    ax.set_xlabel("batch (concurrent requests)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(
        f"Decode throughput vs floor (max of memory at {machine['read_gbs']:.1f} GB/s, "
        f"compute)\n{machine['threads']} threads, {machine['cpu']}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------


def parse_batches(text: str) -> list[int]:
    try:
        batches = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        batches = []
    if not batches or batches[0] < 1:
        raise argparse.ArgumentTypeError(
            f"--batches={text!r} is invalid; accepted: comma-separated integers >= 1"
        )
    return batches


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo_token", help="run or step directory")
    parser.add_argument("--subset", help="a task subset checkpoint (default: write one)")
    parser.add_argument("--task", type=int, default=0, help="task of the prompts and subset")
    parser.add_argument("--batches", type=parse_batches, default=None, help="default 1,8,32")
    parser.add_argument("--prompt-len", type=int, default=None, help="bytes (default 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="per request (default 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of decode tokens/s")
    parser.add_argument("--quick", action="store_true", help="batches 1,4; 8 tokens; 1 round")
    parser.add_argument("--compile", action="store_true", help="add the compiled variant")
    parser.add_argument(
        "--compile-layouts", default="padded",
        help="comma-separated among padded, compact: the compiled step's MoE layout, a "
        "variant each (compiled, compiled_compact)",
    )  # fmt: skip
    parser.add_argument("--compile-backend", default="inductor",
                        help="its dynamo backend (the smoke test: aot_eager)")  # fmt: skip
    parser.add_argument(
        "--precision", default="fp32",
        help="comma-separated among fp32, bf16: the variants' weights and KV cache",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.compile_layouts = [p.strip() for p in args.compile_layouts.split(",") if p.strip()]
    if not args.compile_layouts or any(
        p not in ("padded", "compact") for p in args.compile_layouts
    ):
        parser.error(
            f"--compile-layouts={args.compile_layouts!r} is invalid; accepted: padded, compact"
        )
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        parser.error(f"--precision={args.precision!r} is invalid; accepted: fp32, bf16 or both")
    args.precision = precisions
    quick = args.quick
    defaults = {"batches": [1, 4] if quick else [1, 8, 32], "prompt_len": 16 if quick else 64,
                "new_tokens": 8 if quick else 64, "repeats": 1 if quick else 3}  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag, value, low in (("--prompt-len", args.prompt_len, 1), ("--repeats", args.repeats, 1),
                             ("--threads", args.threads, 1), ("--task", args.task, 0)):  # fmt: skip
        if value < low:
            parser.error(f"{flag}={value} must be >= {low}")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens={args.new_tokens} must be >= 2 (one prefill, >= 1 decode)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="bench_generate_") as workdir:
        variants = build_variants(args, Path(workdir))
        prompts = validation_prompts(variants[0].loaded, args.task, max(args.batches),
                                     args.prompt_len)  # fmt: skip
        total = len(variants) * len(args.batches) * (1 + args.repeats)
        with tqdm(total=total, desc="measurements", file=sys.stderr) as progress:
            measurements = {}
            for variant in variants:
                for batch in args.batches:  # untimed: the warm-up, counting the routing
                    if variant.engine is not None:  # compiled: fp32's routing; no hooks
                        run_requests(variant, prompts[:batch], args.new_tokens)
                        traffic = measurements[f"fp32@{batch}"].traffic
                    else:
                        traffic = count_traffic(variant, prompts[:batch], args.new_tokens)
                    measurements[f"{variant.name}@{batch}"] = Measurement(variant, batch, traffic)
                    progress.update()

            def measure(m: Measurement) -> Callable[[], None]:
                def run() -> None:
                    m.timings.append(run_requests(m.variant, prompts[: m.batch], args.new_tokens))
                    progress.update()

                return run

            largest_step = max(m.traffic.bytes_per_step for m in measurements.values())
            machine = {
                "threads": args.threads,
                "cpu": cpu_model(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "read_gbs": read_bandwidth((64 if args.quick else 512) * MIB) / 1e9,
                "copy_gbs": copy_bandwidth((64 if args.quick else 512) * MIB) / 1e9,
                "read_gbs_cached": read_bandwidth(int(largest_step), repeats=51) / 1e9,
                "matmul_flops": matmul_flops(512 if args.quick else 1024),
                "matmul_flops_bf16": matmul_flops(
                    512 if args.quick else 1024, dtype=torch.bfloat16
                ),
            }
            interleaved_times(
                {name: measure(m) for name, m in measurements.items()},
                repeats=args.repeats,
                warmup=0,
            )
    rows = [make_row(m, args, machine) for m in measurements.values()]
    rows.sort(key=lambda r: (VARIANTS.index(r["variant"]), r["batch"]))
    ratios = decode_ratios(rows)
    compiled = next((v.engine for v in variants if v.engine is not None), None)
    compile_report = compiled.compile_report() if compiled is not None else None
    speedups = compiled_speedups(rows)
    print(
        f"Generation, {args.checkpoint}, task {args.task}, prompt {args.prompt_len} B, "
        f"{args.new_tokens} new tokens, greedy, {args.threads} threads, median of "
        f"{args.repeats}; read {machine['read_gbs']:.1f} GB/s (cached "
        f"{machine['read_gbs_cached']:.1f}), copy {machine['copy_gbs']:.1f} GB/s, matmul "
        f"{machine['matmul_flops'] / 1e9:.1f} GFLOP/s"
    )
    print(format_table(rows, ratios))
    for batch, entry in speedups.items():
        target = entry["target"]
        verdict = (
            ""
            if target is None
            else (f" ({'meets' if entry['meets_target'] else 'misses'} the {target:.0f}x target)")
        )
        variant, _, b = batch.rpartition("/")
        print(
            f"{variant or 'compiled'} / fp32 decode tok/s at B={b}: {entry['speedup']:.2f}x{verdict}"
        )
    if compile_report is not None:
        for bucket in compile_report["per_bucket"]:
            print(f"compiled bucket {bucket['batch']}: first call {bucket['first_call_s']:.1f} s "
                  f"({bucket['graphs']} graphs, inductor {bucket['compile_s']:.1f} s)")  # fmt: skip
    if args.json:
        settings = {k: getattr(args, k) for k in ("checkpoint", "subset", "task", "batches",
                                                   "prompt_len", "new_tokens", "repeats",
                                                   "precision")}  # fmt: skip
        payload = {"machine": machine, "settings": settings, "rows": rows, "ratios": ratios,
                   "compiled_speedups": speedups, "compile": compile_report}  # fmt: skip
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        plot_decode(rows, args.plot, machine)


if __name__ == "__main__":
    main()
