"""Expert matmuls that fold the permute into themselves, registered with `torch.library`:

- `moe::gather_grouped_mm(x_TD, w_EDH, token_index_R, counts_E) -> h_RH`: row r of the
  output is x_TD[token_index_R[r]] @ w[e(r)] (rows sorted by expert, counts_E per
  expert): the row gather of the permute folded into the first expert matmul.
- `moe::grouped_mm_combine(h_RH, w_EHD, token_index_R, weight_R, counts_E, num_tokens)
  -> y_TD`: y_TD[t] = sum over the rows r of token t of weight_R[r] * h_RH[r] @ w[e(r)]:
  the weighted combine of the unpermute folded into the last expert matmul.

Why: with top-8 routing every token has eight routed rows, and the unfolded layer writes
and reads the [T*K, D] row matrix (the gathered input, the expert output, their
gradients) about ten times per step, at memory speed. Here each expert's rows are
gathered into a block that stays in cache, multiplied, and (for the combine and the input
gradient) added into a per-worker [T, D] accumulator (T*D, not T*K*D); the backward
re-gathers instead of keeping a [T*K, D] copy. The routing weights scale the H-wide
hidden rows, not the D-wide outputs, and their gradient is an H-wide dot product:
dweight[r] = <h[r], dy[t] @ w[e]^T>, a product the input gradient needs anyway.

CPU: the expert blocks go to the block workers of `moe.ops.cpu` (single-threaded
`torch.mm`s, one hand-off per call), sums accumulate in at least fp32 and are rounded
once. Half precision takes the padded layout of `moe.ops.padded_blocks` (one `bmm` per
matmul over equal blocks) where the load is balanced enough; otherwise its blocks are
multiplied at the bucketed row counts of `moe.ops.row_buckets`.

CUDA with Triton installed: `moe.ops.cuda` registers the kernels of
`moe.ops.kernels.folded` for the "cuda" dispatch key, which replaces the implementations
below for CUDA tensors. The row gather is folded into the GEMMs' operand loads, the
weighted combine and the gather's input gradient into a GEMM epilogue that adds into an
fp32 [T, D] sum with atomics (so those sums may differ in the last bits between runs),
dweight into the epilogue of the GEMM that computes dh; the weight gradients read their
rows through the index. Every other device (and float64 on CUDA): the same op composed
from the unfolded ops of `moe.ops` (gather, grouped matmul, scatter-add), so the layer
runs one code path everywhere.

Shapes: T tokens, R routed rows (sorted by expert), D model width, H expert hidden
width, E experts, M rows of one expert block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.ops import cpu, padded_blocks
from moe.ops.row_buckets import bucketed_rows, zero_padded


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _mm_into(a_MK: Tensor, b_KN: Tensor, out_MN: Tensor) -> None:
    """out = a @ b, a multiplied at its bucketed row count (`moe.ops.row_buckets`)."""
    rows = bucketed_rows(a_MK.shape[0], a_MK.dtype, a_MK.device)
    if rows == a_MK.shape[0]:
        torch.mm(a_MK, b_KN, out=out_MN)
    else:  # the padding rows' products are computed and dropped
        out_MN.copy_(torch.mm(zero_padded(a_MK, rows), b_KN)[: a_MK.shape[0]])


def _wgrad_into(x_MD: Tensor, dy_MH: Tensor, out_DH: Tensor) -> None:
    """out = x^T dy over the M rows (zero rows up to the bucketed count add exact zeros)."""
    rows = bucketed_rows(x_MD.shape[0], x_MD.dtype, x_MD.device)
    torch.mm(zero_padded(x_MD, rows).t(), zero_padded(dy_MH, rows), out=out_DH)


# Consecutive experts' rows are gathered (and added into the sums) as one span of at
# least this many rows: one gather and one scatter-add per span instead of per expert
# (at 256 experts of ~128 rows, half the ops a worker runs), while a span's gathered
# rows (256 x 512 fp32: 512 KiB) still fit in a core's L2 for the matmuls that read
# them. Spans of 256 rows were the fastest of 1, 256, 1024 and 4096 at E=128 and E=256
# (one thread, the four folded ops, a loaded host: 3-10% apart).
SPAN_ROWS = 256
# The spans go to the block workers from two spans on (with two or more intra-op
# threads), not from `cpu.POOL_MIN_BLOCKS`: a span's gathers and scatter-adds as
# multi-threaded ops, one after another, were the slow part. E=8, K=2, H=1024, T=4096,
# forward + backward, 2 threads: 1467 ms on the workers, 2961 ms one span after another
# (the unfolded layer 1965 ms, the dense floor 1102 ms; load 3.3-3.8, 2026-12-05).
POOL_MIN_SPANS = 2


class _Spans:
    """The non-empty expert blocks grouped into spans of consecutive rows: `items` are
    (span, start row, stop row) for the block runner (balanced by rows), `blocks[span]`
    the (expert, start, stop) of each expert in it; `experts` those with rows."""

    def __init__(self, counts_E: Tensor, num_rows: int) -> None:
        self.blocks: list[list[cpu.Block]] = []
        for block in cpu._layout(counts_E, num_rows).blocks:
            if self.blocks and self.blocks[-1][-1][2] - self.blocks[-1][0][1] < SPAN_ROWS:
                self.blocks[-1].append(block)
            else:
                self.blocks.append([block])
        self.items = [(i, span[0][1], span[-1][2]) for i, span in enumerate(self.blocks)]
        self.experts = {expert for span in self.blocks for expert, _, _ in span}

    def zero_idle(self, dw_EXY: Tensor) -> None:
        """Zero the gradient of experts without rows (the others are written whole)."""
        for expert in range(dw_EXY.shape[0]):
            if expert not in self.experts:
                dw_EXY[expert].zero_()


class _Accumulators:
    """One [T, D] sum per block worker (workers never add into the same tensor), summed
    when the workers are done."""

    def __init__(self, num_tokens: int, width: int, like: Tensor) -> None:
        self._shape = (num_tokens, width)
        self._dtype = _accumulator_dtype(like.dtype)
        self._device = like.device
        self._sums: dict[int, Tensor] = {}

    def add(self, worker: int, index_M: Tensor, rows_MD: Tensor) -> None:
        total = self._sums.get(worker)
        if total is None:
            total = torch.zeros(self._shape, dtype=self._dtype, device=self._device)
            self._sums[worker] = total
        total.index_add_(0, index_M, rows_MD.to(self._dtype))

    def result(self, dtype: torch.dtype) -> Tensor:
        sums = [self._sums[worker] for worker in sorted(self._sums)]
        if not sums:
            return torch.zeros(self._shape, dtype=dtype, device=self._device)
        total = sums[0]
        for other in sums[1:]:
            total += other
        return total.to(dtype)


# --- every other device: the unfolded ops, composed ---------------------------------


def composed_gather_grouped_mm(
    x_TD: Tensor, w_EDH: Tensor, token_index_R: Tensor, counts_E: Tensor
) -> Tensor:
    """`gather_grouped_mm` as gather, then grouped matmul."""
    return cpu.grouped_mm(cpu.gather_rows(x_TD, token_index_R), w_EDH, counts_E)


def composed_gather_grouped_mm_backward(
    dh_RH: Tensor,
    x_TD: Tensor,
    w_EDH: Tensor,
    token_index_R: Tensor,
    counts_E: Tensor,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """`gather_grouped_mm_backward` from the unfolded ops."""
    dx_TD = dw_EDH = x_TD.new_empty(0)
    if input_grad:
        dx_RD = cpu.grouped_mm(dh_RH, w_EDH.transpose(1, 2), counts_E)
        dx_TD = cpu.scatter_add_rows(dx_RD, token_index_R, x_TD.shape[0])
    if weight_grad:
        dw_EDH = cpu.grouped_mm_wgrad(cpu.gather_rows(x_TD, token_index_R), dh_RH, counts_E)
    return dx_TD, dw_EDH


def composed_grouped_mm_combine(
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    num_tokens: int,
) -> Tensor:
    """`grouped_mm_combine` as scaling, grouped matmul, then scatter-add."""
    scaled_RH = h_RH * weight_R.to(h_RH.dtype).unsqueeze(1)
    y_RD = cpu.grouped_mm(scaled_RH, w_EHD, counts_E)
    return cpu.scatter_add_rows(y_RD, token_index_R, num_tokens)


def composed_grouped_mm_combine_backward(
    dy_TD: Tensor,
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """`grouped_mm_combine_backward` from the unfolded ops."""
    weight_R1 = weight_R.to(h_RH.dtype).unsqueeze(1)
    dy_RD = cpu.gather_rows(dy_TD.to(h_RH.dtype), token_index_R)
    g_RH = cpu.grouped_mm(dy_RD, w_EHD.transpose(1, 2), counts_E)
    dweight_R = (g_RH.to(weight_R.dtype) * h_RH.to(weight_R.dtype)).sum(1)
    dw_EHD = h_RH.new_empty(0)
    if weight_grad:
        dw_EHD = cpu.grouped_mm_wgrad(h_RH * weight_R1, dy_RD, counts_E)
    return g_RH * weight_R1, dw_EHD, dweight_R


# --- gather_grouped_mm -------------------------------------------------------------


@torch.library.custom_op("moe::gather_grouped_mm", mutates_args=())
def gather_grouped_mm(
    x_TD: Tensor, w_EDH: Tensor, token_index_R: Tensor, counts_E: Tensor
) -> Tensor:
    """h_RH[r] = x_TD[token_index_R[r]] @ w_EDH[expert of r] (rows sorted by expert)."""
    # The default implementation: a kernel registered for "cuda" (`moe.ops.cuda`, where
    # Triton is installed) takes CUDA tensors instead, so the composed form below serves
    # the other devices, and CUDA without Triton. Likewise in the three ops below.
    if x_TD.device.type != "cpu":
        return composed_gather_grouped_mm(x_TD, w_EDH, token_index_R, counts_E)
    num_rows = token_index_R.shape[0]
    blocks = padded_blocks.layout(x_TD, counts_E, token_index_R, x_TD.shape[0], w_EDH.shape[2])
    if blocks is not None:
        return padded_blocks.gather_grouped_mm(blocks, x_TD, w_EDH)
    h_RH = x_TD.new_empty(num_rows, w_EDH.shape[2])
    spans = _Spans(counts_E, num_rows)

    def work(_worker: int, item: cpu.Block) -> None:
        span, first, last = item
        x_SD = x_TD.index_select(0, token_index_R[first:last])
        for expert, start, stop in spans.blocks[span]:
            _mm_into(x_SD[start - first : stop - first], w_EDH[expert], h_RH[start:stop])

    cpu._block_runner.run_indexed(spans.items, work, x_TD.device, POOL_MIN_SPANS)
    return h_RH


@gather_grouped_mm.register_fake
def _(x_TD: Tensor, w_EDH: Tensor, token_index_R: Tensor, counts_E: Tensor) -> Tensor:
    return x_TD.new_empty(token_index_R.shape[0], w_EDH.shape[2])


@torch.library.custom_op("moe::gather_grouped_mm_backward", mutates_args=())
def gather_grouped_mm_backward(
    dh_RH: Tensor,
    x_TD: Tensor,
    w_EDH: Tensor,
    token_index_R: Tensor,
    counts_E: Tensor,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(dx_TD, dw_EDH) of `gather_grouped_mm`; each an empty [0] tensor unless asked for
    (`input_grad`, `weight_grad`). dx_TD[t] = sum over t's rows of dh[r] @ w[e]^T;
    dw[e] = x_TD[rows of e]^T dh[rows of e] (zero for experts without rows)."""
    num_tokens, num_rows = x_TD.shape[0], token_index_R.shape[0]
    if x_TD.device.type != "cpu":
        return composed_gather_grouped_mm_backward(
            dh_RH, x_TD, w_EDH, token_index_R, counts_E, input_grad, weight_grad
        )
    blocks = padded_blocks.layout(x_TD, counts_E, token_index_R, num_tokens, w_EDH.shape[2])
    if blocks is not None:
        return padded_blocks.gather_grouped_mm_backward(
            blocks, dh_RH, x_TD, w_EDH, input_grad, weight_grad
        )
    spans = _Spans(counts_E, num_rows)
    sums = _Accumulators(num_tokens, x_TD.shape[1], x_TD)
    dw_EDH = x_TD.new_empty(0)
    if weight_grad:
        dw_EDH = w_EDH.new_empty(w_EDH.shape)
        spans.zero_idle(dw_EDH)

    def work(worker: int, item: cpu.Block) -> None:
        span, first, last = item
        index_S = token_index_R[first:last]
        x_SD = x_TD.index_select(0, index_S) if weight_grad else None
        dx_SD = dh_RH.new_empty(last - first, w_EDH.shape[1]) if input_grad else None
        for expert, start, stop in spans.blocks[span]:
            rows = slice(start - first, stop - first)
            if x_SD is not None:
                _wgrad_into(x_SD[rows], dh_RH[start:stop], dw_EDH[expert])
            if dx_SD is not None:
                _mm_into(dh_RH[start:stop], w_EDH[expert].t(), dx_SD[rows])
        if dx_SD is not None:
            sums.add(worker, index_S, dx_SD)

    cpu._block_runner.run_indexed(spans.items, work, x_TD.device, POOL_MIN_SPANS)
    dx_TD = sums.result(x_TD.dtype) if input_grad else x_TD.new_empty(0)
    return dx_TD, dw_EDH


@gather_grouped_mm_backward.register_fake
def _(
    dh_RH: Tensor,
    x_TD: Tensor,
    w_EDH: Tensor,
    token_index_R: Tensor,
    counts_E: Tensor,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    dx_TD = x_TD.new_empty(x_TD.shape) if input_grad else x_TD.new_empty(0)
    dw_EDH = w_EDH.new_empty(w_EDH.shape) if weight_grad else x_TD.new_empty(0)
    return dx_TD, dw_EDH


def _gather_mm_setup(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor
) -> None:
    x_TD, w_EDH, token_index_R, counts_E = inputs
    ctx.save_for_backward(x_TD, w_EDH, token_index_R, counts_E)


def _gather_mm_backward(
    ctx: torch.autograd.function.FunctionCtx, dh_RH: Tensor
) -> tuple[Tensor | None, Tensor | None, None, None]:
    x_TD, w_EDH, token_index_R, counts_E = ctx.saved_tensors  # type: ignore[attr-defined]
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    dx_TD, dw_EDH = gather_grouped_mm_backward(
        dh_RH.contiguous(), x_TD, w_EDH, token_index_R, counts_E, needs[0], needs[1]
    )
    return (dx_TD if needs[0] else None), (dw_EDH if needs[1] else None), None, None


gather_grouped_mm.register_autograd(_gather_mm_backward, setup_context=_gather_mm_setup)


# --- grouped_mm_combine ------------------------------------------------------------


@torch.library.custom_op("moe::grouped_mm_combine", mutates_args=())
def grouped_mm_combine(
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    num_tokens: int,
) -> Tensor:
    """y_TD[t] = sum over rows r with token_index_R[r] = t of weight_R[r] * h_RH[r] @
    w_EHD[expert of r]; summed in at least fp32, returned in h_RH's dtype."""
    if h_RH.device.type != "cpu":
        return composed_grouped_mm_combine(
            h_RH, w_EHD, token_index_R, weight_R, counts_E, num_tokens
        )
    blocks = padded_blocks.layout(h_RH, counts_E, token_index_R, num_tokens, w_EHD.shape[1])
    if blocks is not None:
        return padded_blocks.grouped_mm_combine(blocks, h_RH, w_EHD, weight_R)
    scaled_RH = h_RH * weight_R.to(h_RH.dtype).unsqueeze(1)
    spans = _Spans(counts_E, token_index_R.shape[0])
    sums = _Accumulators(num_tokens, w_EHD.shape[2], h_RH)

    def work(worker: int, item: cpu.Block) -> None:
        span, first, last = item
        y_SD = h_RH.new_empty(last - first, w_EHD.shape[2])
        for expert, start, stop in spans.blocks[span]:
            _mm_into(scaled_RH[start:stop], w_EHD[expert], y_SD[start - first : stop - first])
        sums.add(worker, token_index_R[first:last], y_SD)

    cpu._block_runner.run_indexed(spans.items, work, h_RH.device, POOL_MIN_SPANS)
    return sums.result(h_RH.dtype)


@grouped_mm_combine.register_fake
def _(
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    num_tokens: int,
) -> Tensor:
    return h_RH.new_empty(num_tokens, w_EHD.shape[2])


@torch.library.custom_op("moe::grouped_mm_combine_backward", mutates_args=())
def grouped_mm_combine_backward(
    dy_TD: Tensor,
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dh_RH, dw_EHD, dweight_R) of `grouped_mm_combine` (dw_EHD an empty [0] tensor
    unless `weight_grad`). With g[r] = dy_TD[t(r)] @ w[e]^T: dh[r] = weight[r] * g[r],
    dweight[r] = <h[r], g[r]>, dw[e] = (weight * h)[rows of e]^T dy_TD[tokens of e]."""
    if h_RH.device.type != "cpu":
        return composed_grouped_mm_combine_backward(
            dy_TD, h_RH, w_EHD, token_index_R, weight_R, counts_E, weight_grad
        )
    blocks = padded_blocks.layout(h_RH, counts_E, token_index_R, dy_TD.shape[0], w_EHD.shape[1])
    if blocks is not None:
        return padded_blocks.grouped_mm_combine_backward(
            blocks, dy_TD, h_RH, w_EHD, weight_R, weight_grad
        )
    dy_TD = dy_TD.to(h_RH.dtype)
    weight_R1 = weight_R.to(h_RH.dtype).unsqueeze(1)
    spans = _Spans(counts_E, token_index_R.shape[0])
    g_RH = h_RH.new_empty(h_RH.shape)
    dw_EHD = h_RH.new_empty(0)
    scaled_RH = h_RH
    if weight_grad:
        dw_EHD = w_EHD.new_empty(w_EHD.shape)
        spans.zero_idle(dw_EHD)
        scaled_RH = h_RH * weight_R1  # H-wide, once for all rows

    def work(_worker: int, item: cpu.Block) -> None:
        span, first, last = item
        dy_SD = dy_TD.index_select(0, token_index_R[first:last])
        for expert, start, stop in spans.blocks[span]:
            dy_MD = dy_SD[start - first : stop - first]
            _mm_into(dy_MD, w_EHD[expert].t(), g_RH[start:stop])
            if weight_grad:
                _wgrad_into(scaled_RH[start:stop], dy_MD, dw_EHD[expert])

    cpu._block_runner.run_indexed(spans.items, work, h_RH.device, POOL_MIN_SPANS)
    # H-wide passes over all rows: cheaper per call than per block.
    dweight_R = (g_RH.to(weight_R.dtype) * h_RH.to(weight_R.dtype)).sum(1)
    return g_RH.mul_(weight_R1), dw_EHD, dweight_R


@grouped_mm_combine_backward.register_fake
def _(
    dy_TD: Tensor,
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dw_EHD = w_EHD.new_empty(w_EHD.shape) if weight_grad else h_RH.new_empty(0)
    return h_RH.new_empty(h_RH.shape), dw_EHD, weight_R.new_empty(weight_R.shape)


def _combine_mm_setup(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor
) -> None:
    h_RH, w_EHD, token_index_R, weight_R, counts_E, _num_tokens = inputs
    ctx.save_for_backward(h_RH, w_EHD, token_index_R, weight_R, counts_E)


def _combine_mm_backward(
    ctx: torch.autograd.function.FunctionCtx, dy_TD: Tensor
) -> tuple[Tensor | None, Tensor | None, None, Tensor | None, None, None]:
    h_RH, w_EHD, token_index_R, weight_R, counts_E = ctx.saved_tensors  # type: ignore[attr-defined]
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    dh_RH, dw_EHD, dweight_R = grouped_mm_combine_backward(
        dy_TD.contiguous(), h_RH, w_EHD, token_index_R, weight_R, counts_E, needs[1]
    )
    return (
        dh_RH if needs[0] else None,
        dw_EHD if needs[1] else None,
        None,
        dweight_R if needs[3] else None,
        None,
        None,
    )


grouped_mm_combine.register_autograd(_combine_mm_backward, setup_context=_combine_mm_setup)
