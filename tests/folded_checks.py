"""Checks of the folded Triton kernels (`moe.ops.kernels.folded`, the row-index arguments
of `grouped_mm_wgrad`) and of their adapters for the folded ops (`moe.ops.cuda`), against
per-row loops in float64 that share no code with them. tests/test_triton_kernels.py runs
them on CPU tensors under the Triton interpreter (each in a fresh subprocess) and on CUDA.

Every case has experts with no rows, a token with no row, and a token with three rows of
one expert in one row tile (the scatter's atomics then add into one row from one program).

Shape legend: T tokens, R routed rows (sorted by expert), D input width, H output width,
E experts.
"""

from __future__ import annotations

from typing import Any

import torch

# Per-expert row counts: 16-row tiles see an expert over several tiles with a partial
# last one, and experts without rows first, inside and last.
FOLDED_COUNTS = ([5, 0, 37, 20], [0, 17, 0], [3, 4, 0, 0, 9])
NUM_TOKENS = 13


def gemm_dtypes(device: str) -> tuple[torch.dtype, ...]:
    """bf16 `tl.dot` is wrong under the interpreter (see tests/test_triton_kernels.py)."""
    half = (torch.float16,) if device == "cpu" else (torch.float16, torch.bfloat16)
    return (torch.float32, *half)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """got (any dtype) against the float64 loop: fp32 to 1e-4, half precision to 2e-2 of
    the largest entry (a sum near zero carries the roundings of its larger terms)."""
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    scale = max(float(want.detach().abs().max()), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(
        got.detach().cpu().double(), want.detach(), rtol=tolerance, atol=tolerance * scale, msg=what
    )


def experts_of_rows(counts: list[int]) -> list[int]:
    return [expert for expert, count in enumerate(counts) for _ in range(count)]


def token_index(counts: list[int], num_tokens: int) -> torch.Tensor:
    """[R] int64 token of each row: random, except that the last token gets no row and
    token 1 the first three rows of the first expert with three rows."""
    index_R = torch.randint(0, num_tokens - 1, (sum(counts),))
    start = 0
    for count in counts:
        if count >= 3:
            index_R[start : start + 3] = 1
            break
        start += count
    return index_R


# --- references: one row at a time, float64 ------------------------------------------


def loop_gather_mm(
    x_TD: torch.Tensor, w_EDH: torch.Tensor, index_R: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    h_RH = torch.zeros(len(index_R), w_EDH.shape[2], dtype=torch.float64)
    for row, (token, expert) in enumerate(zip(index_R.tolist(), experts_of_rows(counts))):
        h_RH[row] = x_TD[token].cpu().double() @ w_EDH[expert].cpu().double()
    return h_RH


def loop_mm_scatter(
    x_RD: torch.Tensor,
    w_EDH: torch.Tensor,
    index_R: torch.Tensor,
    counts: list[int],
    num_tokens: int,
    weight_R: torch.Tensor | None,
) -> torch.Tensor:
    y_TH = torch.zeros(num_tokens, w_EDH.shape[2], dtype=torch.float64)
    for row, (token, expert) in enumerate(zip(index_R.tolist(), experts_of_rows(counts))):
        weight = 1.0 if weight_R is None else float(weight_R[row])
        y_TH[token] += weight * (x_RD[row].cpu().double() @ w_EDH[expert].cpu().double())
    return y_TH


def loop_wgrad(
    x: torch.Tensor,
    dy: torch.Tensor,
    counts: list[int],
    x_index_R: torch.Tensor | None,
    dy_index_R: torch.Tensor | None,
    x_scale_R: torch.Tensor | None,
) -> torch.Tensor:
    dw_EDH = torch.zeros(len(counts), x.shape[1], dy.shape[1], dtype=torch.float64)
    for row, expert in enumerate(experts_of_rows(counts)):
        x_row = x[row if x_index_R is None else int(x_index_R[row])].cpu().double()
        if x_scale_R is not None:
            x_row = x_row * float(x_scale_R[row])
        dy_row = dy[row if dy_index_R is None else int(dy_index_R[row])].cpu().double()
        dw_EDH[expert] += torch.outer(x_row, dy_row)
    return dw_EDH


def loop_scale_dot(
    dy_TD: torch.Tensor,
    w_EDH: torch.Tensor,
    index_R: torch.Tensor,
    counts: list[int],
    weight_R: torch.Tensor,
    h_RH: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    dh_RH = torch.zeros(len(index_R), w_EDH.shape[2], dtype=torch.float64)
    dweight_R = torch.zeros(len(index_R), dtype=torch.float64)
    for row, (token, expert) in enumerate(zip(index_R.tolist(), experts_of_rows(counts))):
        g_H = dy_TD[token].cpu().double() @ w_EDH[expert].cpu().double()
        dh_RH[row] = float(weight_R[row]) * g_H
        dweight_R[row] = torch.dot(g_H, h_RH[row].cpu().double())
    return dh_RH, dweight_R


# --- the kernels -----------------------------------------------------------------------


def _case(device: str, case: int, counts: list[int]) -> dict[str, Any]:
    """Widths (with 16-wide tiles: 3, 1 and 3 column tiles, the last partial in two),
    a token index (int32 in odd cases) and offsets (int32 in even cases)."""
    d_in, d_out = ((24, 40), (32, 16), (16, 33))[case % 3]
    index_R = token_index(counts, NUM_TOKENS)
    offsets_E = torch.tensor(counts).cumsum(0).to(torch.int32 if case % 2 == 0 else torch.int64)
    index_dtype = torch.int32 if case % 2 else torch.int64
    return {
        "d_in": d_in,
        "d_out": d_out,
        "index_R": index_R,
        "device_index_R": index_R.to(device=device, dtype=index_dtype),
        "offsets_E": offsets_E.to(device),
    }


def _weights(
    device: str, dtype: torch.dtype, case: int, num_experts: int, d_in: int, d_out: int
) -> torch.Tensor:
    """[E, D, H] weights: contiguous in even cases, a transposed [E, H, D] (as the
    backward passes them) in odd ones."""
    if case % 2:
        return torch.randn(num_experts, d_out, d_in, device=device).to(dtype).transpose(1, 2)
    return torch.randn(num_experts, d_in, d_out, device=device).to(dtype)


def check_folded_gather_mm(device: str) -> None:
    from moe.ops.kernels import GemmBlocks, gather_grouped_mm

    for case, counts in enumerate(FOLDED_COUNTS):
        for dtype in gemm_dtypes(device):
            c = _case(device, case, counts)
            # A column slice: x with a row stride != D.
            x_TD = torch.randn(NUM_TOKENS, c["d_in"] + 3, device=device).to(dtype)[:, : c["d_in"]]
            w_EDH = _weights(device, dtype, case, len(counts), c["d_in"], c["d_out"])
            want = loop_gather_mm(x_TD, w_EDH, c["index_R"], counts)
            for blocks in (GemmBlocks(16, 16, 16), None):
                h_RH = gather_grouped_mm(x_TD, w_EDH, c["device_index_R"], c["offsets_E"], blocks)
                assert h_RH.dtype == dtype and h_RH.shape == (sum(counts), c["d_out"])
                assert_close(h_RH, want, dtype, f"h_RH {counts} {dtype} {blocks}")


def check_folded_scatter(device: str) -> None:
    from moe.ops.kernels import GemmBlocks, grouped_mm_scatter

    for case, counts in enumerate(FOLDED_COUNTS):
        for dtype in gemm_dtypes(device):
            c = _case(device, case, counts)
            x_RD = torch.randn(sum(counts), c["d_in"] + 3, device=device).to(dtype)[:, : c["d_in"]]
            weight_R = torch.rand(sum(counts), device=device) + 0.5
            w_EDH = _weights(device, dtype, case, len(counts), c["d_in"], c["d_out"])
            for weights, out_dtype in ((weight_R, None), (None, torch.float32)):
                want = loop_mm_scatter(x_RD, w_EDH, c["index_R"], counts, NUM_TOKENS, weights)
                for blocks in (GemmBlocks(16, 16, 16), None):
                    y_TH = grouped_mm_scatter(
                        x_RD, w_EDH, c["device_index_R"], c["offsets_E"], NUM_TOKENS,
                        weights, out_dtype, blocks,
                    )  # fmt: skip
                    assert y_TH.dtype == (out_dtype or dtype)
                    assert y_TH.shape == (NUM_TOKENS, c["d_out"])
                    assert not y_TH[-1].any(), "the last token has no row"
                    what = f"y_TH {counts} {dtype} weights={weights is not None} {blocks}"
                    assert_close(y_TH, want, dtype, what)


def check_folded_wgrad(device: str) -> None:
    from moe.ops.kernels import GemmBlocks, grouped_mm_wgrad

    for case, counts in enumerate(FOLDED_COUNTS):
        num_rows = sum(counts)
        for dtype in gemm_dtypes(device):
            c = _case(device, case, counts)
            x_TD = torch.randn(NUM_TOKENS, c["d_in"], device=device).to(dtype)
            x_RD = torch.randn(num_rows, c["d_in"], device=device).to(dtype)
            dy_RH = torch.randn(num_rows, c["d_out"] + 3, device=device).to(dtype)[:, : c["d_out"]]
            dy_TH = torch.randn(NUM_TOKENS, c["d_out"], device=device).to(dtype)
            scale_R = torch.rand(num_rows, device=device) + 0.5
            index_R = c["device_index_R"]
            # (x, dy, x index, dy index, x scale): the gather's dw, the combine's dw, both.
            variants = (
                (x_TD, dy_RH, index_R, None, None),
                (x_RD, dy_TH, None, index_R, scale_R),
                (x_TD, dy_TH, index_R, index_R, scale_R),
            )
            for x, dy, x_index_R, dy_index_R, x_scale_R in variants:
                want = loop_wgrad(x, dy, counts, x_index_R, dy_index_R, x_scale_R)
                for blocks, out_dtype in ((GemmBlocks(16, 16, 16), None), (None, torch.float32)):
                    dw_EDH = grouped_mm_wgrad(
                        x, dy, c["offsets_E"], len(counts), out_dtype, blocks,
                        x_index_R=x_index_R, dy_index_R=dy_index_R, x_scale_R=x_scale_R,
                    )  # fmt: skip
                    assert dw_EDH.dtype == (out_dtype or dtype)
                    assert dw_EDH.shape == (len(counts), c["d_in"], c["d_out"])
                    what = (
                        f"dw {counts} {dtype} x_index={x_index_R is not None} "
                        f"dy_index={dy_index_R is not None} scale={x_scale_R is not None}"
                    )
                    assert_close(dw_EDH, want, dtype, what)


def check_folded_scale_dot(device: str) -> None:
    from moe.ops.kernels import GemmBlocks, gather_grouped_mm_scale_dot

    for case, counts in enumerate(FOLDED_COUNTS):
        for dtype in gemm_dtypes(device):
            c = _case(device, case, counts)
            dy_TD = torch.randn(NUM_TOKENS, c["d_in"] + 3, device=device).to(dtype)[:, : c["d_in"]]
            weight_R = torch.rand(sum(counts), device=device) + 0.5
            h_RH = torch.randn(sum(counts), c["d_out"], device=device).to(dtype)
            w_EDH = _weights(device, dtype, case, len(counts), c["d_in"], c["d_out"])
            want_dh, want_dweight = loop_scale_dot(
                dy_TD, w_EDH, c["index_R"], counts, weight_R, h_RH
            )
            # 16 columns a tile: up to 3 column tiles, whose partial dots are summed.
            for blocks in (GemmBlocks(16, 16, 16), None):
                dh_RH, dweight_R = gather_grouped_mm_scale_dot(
                    dy_TD, w_EDH, c["device_index_R"], c["offsets_E"], weight_R, h_RH, blocks
                )
                assert dh_RH.dtype == dtype and dh_RH.shape == h_RH.shape
                assert dweight_R.dtype == weight_R.dtype
                assert dweight_R.shape == weight_R.shape
                assert_close(dh_RH, want_dh, dtype, f"dh {counts} {dtype} {blocks}")
                assert_close(dweight_R, want_dweight, dtype, f"dweight {counts} {dtype}")


# --- the adapters, through the ops and autograd ------------------------------------------


def _folded_layer(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    weight: torch.Tensor,
    index_R: torch.Tensor,
    counts_E: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y) of the folded expert pair, h kept for its gradient."""
    from moe.ops import fused

    h_RH = fused.gather_grouped_mm(x, w1, index_R, counts_E)
    h_RH.retain_grad()
    y_TD = fused.grouped_mm_combine(h_RH, w2, index_R, weight, counts_E, x.shape[0])
    return h_RH, y_TD


def _loop_layer(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    weight: torch.Tensor,
    index_R: torch.Tensor,
    counts: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in float64, one row at a time, through autograd."""
    routes = list(zip(index_R.tolist(), experts_of_rows(counts)))
    h_RH = torch.stack([x[token] @ w1[expert] for token, expert in routes])
    h_RH.retain_grad()
    y_TD = [torch.zeros(w2.shape[2], dtype=torch.float64) for _ in range(x.shape[0])]
    for row, (token, expert) in enumerate(routes):
        y_TD[token] = y_TD[token] + weight[row] * (h_RH[row] @ w2[expert])
    return h_RH, torch.stack(y_TD)


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_()


def check_folded_adapters(device: str) -> None:
    """The four folded ops through `moe.ops.cuda`'s adapters: forward, autograd (every
    gradient), the backward ops' flags, and float64 (the composed fallback)."""
    from moe.ops import cuda, fused

    if device == "cpu":  # a fresh interpreter process: the CUDA adapters serve CPU tensors
        fused.gather_grouped_mm.register_kernel("cpu")(cuda.gather_grouped_mm)
        fused.gather_grouped_mm_backward.register_kernel("cpu")(cuda.gather_grouped_mm_backward)
        fused.grouped_mm_combine.register_kernel("cpu")(cuda.grouped_mm_combine)
        fused.grouped_mm_combine_backward.register_kernel("cpu")(cuda.grouped_mm_combine_backward)
    counts, d_in, hidden = [5, 0, 37, 20], 24, 40
    index_R = token_index(counts, NUM_TOKENS)
    counts_E = torch.tensor(counts, device=device)
    for dtype in (*gemm_dtypes(device), torch.float64):
        inputs = [
            torch.randn(NUM_TOKENS, d_in),
            torch.randn(len(counts), d_in, hidden) * d_in**-0.5,
            torch.randn(len(counts), hidden, d_in) * hidden**-0.5,
        ]
        weight_R = torch.rand(sum(counts)) + 0.5
        dy_TD = torch.randn(NUM_TOKENS, d_in).to(dtype)
        got = [_leaf(t.to(device=device, dtype=dtype)) for t in inputs]
        got.append(_leaf(weight_R.to(device)))
        h_RH, y_TD = _folded_layer(*got, index_R.to(device), counts_E)
        y_TD.backward(dy_TD.to(device))
        want = [_leaf(t.to(dtype).double()) for t in inputs]
        want.append(_leaf(weight_R.double()))
        want_h, want_y = _loop_layer(*want, index_R, counts)
        want_y.backward(dy_TD.double())
        assert y_TD.dtype == dtype and y_TD.shape == (NUM_TOKENS, d_in)
        assert not y_TD[-1].any(), "the last token has no row"
        assert_close(y_TD, want_y, dtype, f"y {dtype}")
        assert_close(h_RH, want_h, dtype, f"h {dtype}")
        assert h_RH.grad is not None and want_h.grad is not None
        assert_close(h_RH.grad, want_h.grad, dtype, f"dh {dtype}")
        for name, one, other in zip(("x", "w1", "w2", "weight"), got, want):
            assert one.grad is not None and other.grad is not None
            assert one.grad.dtype == one.dtype, name
            assert_close(one.grad, other.grad, dtype, f"d{name} {dtype}")
        _check_backward_flags(got, h_RH.grad, dy_TD.to(device), index_R.to(device), counts_E)


def _check_backward_flags(
    leaves: list[torch.Tensor],
    dh_RH: torch.Tensor,
    dy_TD: torch.Tensor,
    index_R: torch.Tensor,
    counts_E: torch.Tensor,
) -> None:
    """The backward ops compute what their flags ask for and return empty [0] tensors
    for the rest; what they compute equals the gradients autograd got."""
    from moe.ops import fused

    x, w1, w2, weight = (t.detach() for t in leaves)
    dtype = x.dtype
    for input_grad, weight_grad in ((True, False), (False, True)):
        dx, dw1 = fused.gather_grouped_mm_backward(
            dh_RH, x, w1, index_R, counts_E, input_grad, weight_grad
        )
        asked, empty = (dx, dw1) if input_grad else (dw1, dx)
        assert empty.shape == (0,)
        expected = leaves[0].grad if input_grad else leaves[1].grad
        assert expected is not None
        torch.testing.assert_close(asked, expected, **_exact_enough(dtype))
    h_RH = fused.gather_grouped_mm(x, w1, index_R, counts_E)
    dh, dw2, dweight = fused.grouped_mm_combine_backward(
        dy_TD, h_RH, w2, index_R, weight, counts_E, False
    )
    assert dw2.shape == (0,)
    assert leaves[3].grad is not None
    torch.testing.assert_close(dh, dh_RH, **_exact_enough(dtype))
    torch.testing.assert_close(dweight, leaves[3].grad, **_exact_enough(dtype))


def _exact_enough(dtype: torch.dtype) -> dict[str, float]:
    """The same kernels on the same inputs; only the order of atomic fp32 additions may
    differ, and a half-precision result may then round the other way."""
    if dtype in (torch.float32, torch.float64):
        return {"rtol": 1e-5, "atol": 1e-5}
    return {"rtol": 1e-2, "atol": 1e-2}


CHECKS = {
    "folded_gather_mm": check_folded_gather_mm,
    "folded_scatter": check_folded_scatter,
    "folded_wgrad": check_folded_wgrad,
    "folded_scale_dot": check_folded_scale_dot,
    "folded_adapters": check_folded_adapters,
}
