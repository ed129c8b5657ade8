"""CPU int8 weight-only matmuls, side by side: which way to multiply at which row count.

    OMP_NUM_THREADS=2 python scripts/bench_int8.py [--dtype float32] [--json PATH] [--quick]
        [--only projections|stacks] [--threads 2] [--repeats 15]

Part 1, one projection y_MN = x_MK @ w_KN of one expert (the building block):
- dense:       `torch.mm` with the float weight (the model before quantization);
- int8mm_raw:  `torch.ops.aten._weight_int8pack_mm` on the activations as given;
- int8mm:      our `int8mm` method: the same op with bf16 activations (fp32 ones cast to
               bf16 and back), scales applied in fp32 to the output;
- dequant:     our `dequant` method: this expert's int8 weight cast to float, `torch.mm`,
               scales on the output;
- auto:        what `Int8Experts` picks for that row count.
Part 2, a whole expert stack (E experts, every expert with the same row count):
`GroupedExperts` (float) against `Int8Experts` with cpu_method auto / int8mm / dequant.

Times are medians over interleaved rounds (each round runs every variant once; the
starting one rotates). Results are checked against the float reference before timing.

Shapes: M rows of one expert, K input width, N output width, D model width, H expert
hidden width, E experts.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from _bench_utils import interleaved_times, median_ms
from torch import nn

from moe.experts import GroupedExperts
from moe.inference.quant import Int8Experts, quantize_weight
from moe.ops.int8 import CpuInt8Method, expert_int8_mm

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_ROWS = (1, 16, 64)
PROJECTIONS = ((128, 128), (256, 512), (512, 512), (512, 2048), (2048, 512))  # (K, N)
LAYERS = ((128, 128), (512, 2048))  # (D, H)
VARIANTS = ("dense", "int8mm_raw", "int8mm", "dequant", "auto")
LAYER_VARIANTS = ("float", "auto", "int8mm", "dequant")


def _discard(run: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        run()

    return step


def projection_row(k: int, n: int, rows: int, dtype: torch.dtype, repeats: int) -> dict:
    """Median microseconds of each variant for one [rows, k] @ [k, n] projection."""
    gen = torch.Generator().manual_seed(0)
    w_KN = torch.randn(k, n, generator=gen) * k**-0.5
    x_MK = torch.randn(rows, k, generator=gen).to(dtype)
    q_NK, scale_N = quantize_weight(w_KN)
    w_KN = w_KN.to(dtype)
    raw_scale_N = scale_N.to(dtype)
    steps: dict[str, Callable[[], torch.Tensor]] = {
        "dense": lambda: torch.mm(x_MK, w_KN),
        "int8mm_raw": lambda: torch.ops.aten._weight_int8pack_mm(x_MK, q_NK, raw_scale_N),
        "int8mm": lambda: expert_int8_mm(x_MK, q_NK, scale_N, CpuInt8Method.INT8MM),
        "dequant": lambda: expert_int8_mm(x_MK, q_NK, scale_N, CpuInt8Method.DEQUANT),
        "auto": lambda: expert_int8_mm(x_MK, q_NK, scale_N, CpuInt8Method.AUTO),
    }
    reference = torch.mm(x_MK.double(), w_KN.double())
    scale = float(reference.abs().max())
    for name, step in steps.items():
        error = float((step().double() - reference).abs().max())
        assert error <= 0.05 * scale, f"{name}: error {error} against output scale {scale}"
    # fp32 activations make the raw op ~1000x slower at 256 rows: fewer rounds there.
    slow = dtype == torch.float32 and rows * k * n > 2**24
    timed = {name: _discard(step) for name, step in steps.items()}
    times = interleaved_times(timed, repeats=3 if slow else repeats)
    return {"K": k, "N": n, "rows": rows} | {
        f"{name}_us": 1000.0 * median_ms(times[name]) for name in steps
    }


def layer_row(
    d_model: int, d_hidden: int, experts: int, rows: int, dtype: torch.dtype, repeats: int
) -> dict:
    """Median milliseconds of one expert-stack forward, every expert holding `rows` rows."""
    torch.manual_seed(0)
    grouped = GroupedExperts(experts, d_model, d_hidden).to(dtype).requires_grad_(False)
    quantized = {m.value: Int8Experts.from_float(grouped, cpu_method=m) for m in CpuInt8Method}
    x_RD = torch.randn(experts * rows, d_model).to(dtype)
    counts_E = torch.full((experts,), rows, dtype=torch.int64)
    modules: dict[str, nn.Module] = {"float": grouped, **quantized}
    steps = {name: _discard(partial(modules[name], x_RD, counts_E)) for name in LAYER_VARIANTS}
    with torch.no_grad():
        times = interleaved_times(steps, repeats)
    return {"D": d_model, "H": d_hidden, "E": experts, "rows_per_expert": rows} | {
        f"{name}_ms": median_ms(times[name]) for name in steps
    }


def format_table(rows: list[dict], keys: tuple[str, ...], unit: str) -> str:
    names = [k for k in rows[0] if k.endswith(unit)]
    header = [*keys, *(n.removesuffix(unit) for n in names)]
    lines = ["  ".join(f"{h:>10}" for h in header)]
    for row in rows:
        cells = [f"{row[k]:>10}" for k in keys] + [f"{row[n]:>10.1f}" for n in names]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="few shapes and rounds (smoke test)")
    parser.add_argument("--only", choices=("projections", "stacks"), help="run one part only")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.experts < 1:
        raise ValueError(
            f"--threads={args.threads}, --repeats={args.repeats}, --experts={args.experts}: "
            "each must be >= 1"
        )
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    repeats = 2 if args.quick else args.repeats
    row_counts = QUICK_ROWS if args.quick else ROWS
    projections = PROJECTIONS[:1] if args.quick else PROJECTIONS
    layers = LAYERS[:1] if args.quick else LAYERS

    projection_rows, layer_rows = [], []
    if args.only != "stacks":
        projection_rows = [
            projection_row(k, n, rows, dtype, repeats)
            for k, n in projections
            for rows in row_counts
        ]
        print(f"# one projection, {args.dtype} activations, {args.threads} threads, median us")
        print(format_table(projection_rows, ("K", "N", "rows"), "_us"))
    if args.only != "projections":
        layer_rows = [
            layer_row(d, h, args.experts, rows, dtype, repeats)
            for d, h in layers
            for rows in row_counts
        ]
        print(f"# expert stack forward, E={args.experts}, {args.dtype}, median ms")
        print(format_table(layer_rows, ("D", "H", "E", "rows_per_expert"), "_ms"))
    if args.json:
        meta = {
            "threads": args.threads,
            "repeats": repeats,
            "dtype": args.dtype,
            "torch": torch.__version__,
            "load_average_1min": os.getloadavg()[0],
        }
        document = {"meta": meta, "projections": projection_rows, "layers": layer_rows}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
