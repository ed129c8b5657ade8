"""The four folded expert ops of `moe.ops.fused` (gather + first matmul, last matmul +
combine, and their backwards) on CPU, two ways, interleaved, median of rounds:

- spans:  the block workers over spans of expert blocks (`moe.ops.fused`)
- padded: every block padded to one height, one `bmm` per matmul, sums by
          `embedding_bag` (`moe.ops.padded_blocks`; what half precision takes where
          the load is balanced enough)
- dense:  the same FLOPs as two dense matmuls of width K*H and their backward (the floor)

    OMP_NUM_THREADS=2 python scripts/bench_folded_ops.py [--dtype bf16] [--json PATH]

Shapes: T=4096 tokens, D=512, top-8 of E experts of width H (the fine-grained configs of
`bench_layer.py --fine-grained`); the routing is a random router's top-8 (seed 0). Each
variant's outputs are checked against the other's before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_utils import interleaved_times, median_ms

from launch.training.allocator import reuse_heap
from moe.ops import fused, padded_blocks

CONFIGS = ((64, 128), (128, 64), (256, 32))  # (E, H)
T, D, K = 4096, 512, 8


def _ops(E: int, H: int, dtype: torch.dtype) -> tuple[Callable[[], list[torch.Tensor]], int]:
    """One call of all four ops on fixed random operands, and the rows' padded places."""
    gen = torch.Generator().manual_seed(0)
    top = torch.randn(T, E, generator=gen).topk(K, dim=1).indices.flatten()
    order = top.argsort(stable=True)
    token_index_R, counts_E = order // K, torch.bincount(top, minlength=E)
    x, dy = (torch.randn(T, D, generator=gen).to(dtype) for _ in range(2))
    w1 = (torch.randn(E, D, H, generator=gen) * D**-0.5).to(dtype)
    w2 = (torch.randn(E, H, D, generator=gen) * H**-0.5).to(dtype)
    h, dh = (torch.randn(T * K, H, generator=gen).to(dtype) for _ in range(2))
    weight = torch.rand(T * K, generator=gen)

    def run() -> list[torch.Tensor]:
        return [
            fused.gather_grouped_mm(x, w1, token_index_R, counts_E),
            *fused.gather_grouped_mm_backward(dh, x, w1, token_index_R, counts_E, True, True),
            fused.grouped_mm_combine(h, w2, token_index_R, weight, counts_E, T),
            *fused.grouped_mm_combine_backward(dy, h, w2, token_index_R, weight, counts_E, True),
        ]

    places = E * padded_blocks.padded_height(counts_E.tolist(), dtype)
    return run, places


def _dense(H: int, dtype: torch.dtype) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(1)
    x, dy = (torch.randn(T, D, generator=gen).to(dtype) for _ in range(2))
    w1, w2 = torch.randn(D, K * H).to(dtype), torch.randn(K * H, D).to(dtype)
    h, dh = (torch.randn(T, K * H, generator=gen).to(dtype) for _ in range(2))

    def run() -> None:  # forward, input and weight gradient of both matmuls
        x @ w1, h @ w2, dh @ w1.t(), x.t() @ dh, dy @ w2.t(), h.t() @ dy

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", metavar="PATH", help="write the medians here")
    args = parser.parse_args()
    heap_reused = reuse_heap()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ratio = padded_blocks.MAX_PADDED_RATIO
    rows: list[dict] = []
    for E, H in CONFIGS:
        run, places = _ops(E, H, dtype)

        def spans(run: Callable[[], list[torch.Tensor]] = run) -> list[torch.Tensor]:
            padded_blocks.MAX_PADDED_RATIO = 0.0  # every call takes the span path
            try:
                return run()
            finally:
                padded_blocks.MAX_PADDED_RATIO = ratio

        def padded(run: Callable[[], list[torch.Tensor]] = run) -> list[torch.Tensor]:
            padded_blocks.MAX_PADDED_RATIO = float("inf")
            try:
                return run()
            finally:
                padded_blocks.MAX_PADDED_RATIO = ratio

        for one, other in zip(spans(), padded(), strict=True):
            scale = float(one.float().abs().max())
            assert float((one.float() - other.float()).abs().max()) <= 2e-2 * scale
        steps: dict[str, Callable[[], object]] = {
            "spans": spans, "padded": padded, "dense": _dense(H, dtype),
        }  # fmt: skip
        times = interleaved_times(steps, args.rounds)  # type: ignore[arg-type]
        row = {"E": E, "H": H, "K": K, "T": T, "D": D, "padded_places_per_row": places / (T * K)}
        row |= {f"{name}_ms": median_ms(seconds) for name, seconds in times.items()}
        rows.append(row)
        print(
            f"E={E:<4} H={H:<4} spans {row['spans_ms']:7.1f} ms  padded {row['padded_ms']:7.1f} ms"
            f"  dense {row['dense_ms']:6.1f} ms  spans/padded {row['spans_ms'] / row['padded_ms']:.2f}"
            f"  padded/dense {row['padded_ms'] / row['dense_ms']:.2f}"
            f"  (padded places per row {row['padded_places_per_row']:.3f})"
        )
    if args.json:
        meta = {
            "dtype": args.dtype, "threads": torch.get_num_threads(), "rounds": args.rounds,
            "heap_reuse": heap_reused, "load_average": os.getloadavg()[0],
        }  # fmt: skip
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
