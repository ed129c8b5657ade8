"""The four folded expert ops of `moe.ops.fused` (gather + first matmul, last matmul +
combine, and their backwards) on CPU, two ways, interleaved, median of rounds:

- spans:  the block workers over spans of expert blocks (`moe.ops.fused`)
- padded: every block padded to one height, one `bmm` per matmul, sums by
          `embedding_bag` (`moe.ops.padded_blocks`; what half precision takes where
          the load is balanced enough)
- dense:  the same FLOPs as two dense matmuls of width K*H and their backward (the floor)

    OMP_NUM_THREADS=2 python scripts/bench_folded_ops.py [--dtype bf16] [--json PATH]
    OMP_NUM_THREADS=2 python scripts/bench_folded_ops.py --shared-expert [--dtype bf16]

`--shared-expert` asks instead whether a shared expert (Qwen2-MoE, DeepSeek: a dense MLP
every token passes, beside the routed experts) is cheaper inside the routed pass: split
into S/H extra experts of the routed width that every token is routed to (SGLang's
"shared experts fusion"), or as its own dense MLP added after. E=64, H=128, top-8, a
shared expert of width S=512, GELU; training (forward and backward, T=4096) and an
eager decode-sized forward (T=8 and 32 tokens, no grad).

Shapes: T=4096 tokens, D=512, top-8 of E experts of width H (the fine-grained configs of
`bench_layer.py --fine-grained`); the routing is a random router's top-8 (seed 0). Each
variant's outputs are checked against the other's before timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
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
        # A fresh routing per call, one for the forward ops and one for the backward
        # ones, as a step has them: the padded layout is built twice, as in a step.
        fwd_R, bwd_R = token_index_R.clone(), token_index_R.clone()
        return [
            fused.gather_grouped_mm(x, w1, fwd_R, counts_E),
            *fused.gather_grouped_mm_backward(dh, x, w1, bwd_R, counts_E, True, True),
            fused.grouped_mm_combine(h, w2, fwd_R, weight, counts_E, T),
            *fused.grouped_mm_combine_backward(dy, h, w2, bwd_R, weight, counts_E, True),
        ]

    places = padded_blocks.padded_places(counts_E.tolist())
    return run, places


@contextlib.contextmanager
def _padded_layout(taken: bool) -> Iterator[None]:
    """Every folded op on CPU takes the padded layout (`taken`) or the spans, whatever
    its dtype and load (`padded_blocks.applies`, which `moe.ops.fused` consults, replaced
    for the duration)."""
    applies = padded_blocks.applies
    padded_blocks.applies = lambda x, counts_E, num_rows, hidden: taken and num_rows > 0  # type: ignore[assignment]
    try:
        yield
    finally:
        padded_blocks.applies = applies  # type: ignore[assignment]


def _dense(H: int, dtype: torch.dtype) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(1)
    x, dy = (torch.randn(T, D, generator=gen).to(dtype) for _ in range(2))
    w1, w2 = torch.randn(D, K * H).to(dtype), torch.randn(K * H, D).to(dtype)
    h, dh = (torch.randn(T, K * H, generator=gen).to(dtype) for _ in range(2))

    def run() -> None:  # forward, input and weight gradient of both matmuls
        x @ w1, h @ w2, dh @ w1.t(), x.t() @ dh, dy @ w2.t(), h.t() @ dy

    return run


def _shared_expert_variants(
    T: int, dtype: torch.dtype, backward: bool
) -> dict[str, Callable[[], None]]:
    """The routed experts plus a shared expert: `separate` (a dense MLP added after the
    folded ops) and `together` (S/H extra experts in the folded ops, weight 1)."""
    E, H, S = 64, 128, 512
    extra = S // H
    gen = torch.Generator().manual_seed(0)
    top_TK = torch.randn(T, E, generator=gen).topk(K, dim=1).indices

    def routes(experts_TX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        expert_R = experts_TX.flatten()
        order = expert_R.argsort(stable=True)
        token_R = torch.arange(T).repeat_interleave(experts_TX.shape[1])
        return token_R[order], torch.bincount(expert_R, minlength=E + extra)

    index_routed, counts_routed = routes(top_TK)
    shared_TX = (E + torch.arange(extra)).expand(T, extra)
    index_all, counts_all = routes(torch.cat([top_TK, shared_TX], 1))
    counts_routed = counts_routed[:E]
    x = torch.randn(T, D, generator=gen).to(dtype).requires_grad_(backward)
    w1 = (torch.randn(E + extra, D, H, generator=gen) * D**-0.5).to(dtype).requires_grad_(backward)
    w2 = (torch.randn(E + extra, H, D, generator=gen) * H**-0.5).to(dtype).requires_grad_(backward)
    # The same shared expert as one dense MLP: its S hidden units are the extra experts'.
    ws1 = w1[E:].detach().permute(1, 0, 2).reshape(D, S).clone().requires_grad_(backward)
    ws2 = w2[E:].detach().reshape(S, D).clone().requires_grad_(backward)
    weight_routed = torch.rand(T * K, generator=gen)
    # Rows sorted by expert: the routed rows first, then the shared experts' (weight 1).
    weight_all = torch.cat([weight_routed, torch.ones(T * extra)])
    dy = torch.randn(T, D, generator=gen).to(dtype)
    gelu = torch.nn.functional.gelu

    def finish(y: torch.Tensor) -> None:
        if backward:
            y.backward(dy)

    def separate() -> None:
        with torch.set_grad_enabled(backward):
            h = gelu(fused.gather_grouped_mm(x, w1[:E], index_routed, counts_routed))
            y = fused.grouped_mm_combine(h, w2[:E], index_routed, weight_routed, counts_routed, T)
            finish(y + gelu(x @ ws1) @ ws2)

    def together() -> None:
        with torch.set_grad_enabled(backward):
            h = gelu(fused.gather_grouped_mm(x, w1, index_all, counts_all))
            finish(fused.grouped_mm_combine(h, w2, index_all, weight_all, counts_all, T))

    return {"separate": separate, "together": together}


def shared_expert(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    rows = []
    for T_, backward, repeats in ((4096, True, 1), (8, False, 50), (32, False, 50)):
        variants = _shared_expert_variants(T_, dtype, backward)

        def repeated(f: Callable[[], None], n: int = repeats) -> Callable[[], None]:
            def run() -> None:
                for _ in range(n):
                    f()

            return run

        steps = {name: repeated(f) for name, f in variants.items()}
        times = interleaved_times(steps, args.rounds, warmup=2)
        row: dict = {"T": T_, "backward": backward}
        row |= {f"{name}_ms": median_ms(seconds) / repeats for name, seconds in times.items()}
        rows.append(row)
        print(
            f"T={T_:<5} {'fwd+bwd' if backward else 'forward'}: shared expert separate "
            f"{row['separate_ms']:8.3f} ms, inside the routed pass {row['together_ms']:8.3f} ms "
            f"(together / separate {row['together_ms'] / row['separate_ms']:.2f})"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", metavar="PATH", help="write the medians here")
    parser.add_argument(
        "--shared-expert", action="store_true",
        help="time a shared expert inside the routed pass against a separate dense MLP",
    )  # fmt: skip
    args = parser.parse_args()
    heap_reused = reuse_heap()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    meta = {
        "dtype": args.dtype, "threads": torch.get_num_threads(), "rounds": args.rounds,
        "heap_reuse": heap_reused, "load_average": os.getloadavg()[0],
    }  # fmt: skip
    if args.shared_expert:
        shared_rows = shared_expert(args, dtype)
        if args.json:
            results = {"meta": meta, "shared_expert": shared_rows}
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return
    rows: list[dict] = []
    for E, H in CONFIGS:
        run, places = _ops(E, H, dtype)

        def spans(run: Callable[[], list[torch.Tensor]] = run) -> list[torch.Tensor]:
            with _padded_layout(False):
                return run()

        def padded(run: Callable[[], list[torch.Tensor]] = run) -> list[torch.Tensor]:
            with _padded_layout(True):
                return run()

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
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
