"""The folded expert ops (`moe.ops.fused`) on CPU, on the block workers of `moe.ops.cpu`:
each expert's rows gathered into a block that stays in cache and multiplied by a
single-threaded `torch.mm` (one hand-off to the workers per call), the sums over a
token's rows (the combine, the gather's input gradient) added into one [T, D]
accumulator per block worker, in at least fp32 and rounded once. This is the path of
fp32 and fp16, and of bf16 where `moe.ops.padded_blocks` does not take the load; half
precision blocks are multiplied at the bucketed row counts of `moe.ops.row_buckets`.

Why spans: consecutive experts' rows are gathered (and added into the sums) as one span
of at least `SPAN_ROWS` rows: one gather and one scatter-add per span instead of per
expert (at 256 experts of ~128 rows, half the ops a worker runs), while a span's
gathered rows (256 x 512 fp32: 512 KiB) still fit in a core's L2 for the matmuls that
read them. Spans of 256 rows were the fastest of 1, 256, 1024 and 4096 at E=128 and
E=256 (one thread, the four folded ops, a loaded host: 3-10% apart).

The spans go to the block workers from two spans on (`POOL_MIN_SPANS`, with two or more
intra-op threads), not from `cpu.POOL_MIN_BLOCKS`: a span's gathers and scatter-adds as
multi-threaded ops, one after another, were the slow part. E=8, K=2, H=1024, T=4096,
forward + backward, 2 threads: 1467 ms on the workers, 2961 ms one span after another
(the unfolded layer 1965 ms, the dense floor 1102 ms; load 3.3-3.8, 2026-12-05).

Shapes: T tokens, R routed rows (sorted by expert), D model width, H expert hidden
width, E experts, M rows of one expert block, S rows of one span.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.ops import cpu
from moe.ops.row_buckets import bucketed_rows, zero_padded

SPAN_ROWS = 256  # rows per span, at least (see above); read at call time
POOL_MIN_SPANS = 2  # spans from which the block workers take them (see above)


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


class Spans:
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


class Accumulators:
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


def gather_grouped_mm(
    x_TD: Tensor, w_EDH: Tensor, token_index_R: Tensor, counts_E: Tensor
) -> Tensor:
    """`moe::gather_grouped_mm` on the spans."""
    num_rows = token_index_R.shape[0]
    h_RH = x_TD.new_empty(num_rows, w_EDH.shape[2])
    spans = Spans(counts_E, num_rows)

    def work(_worker: int, item: cpu.Block) -> None:
        span, first, last = item
        x_SD = x_TD.index_select(0, token_index_R[first:last])
        for expert, start, stop in spans.blocks[span]:
            _mm_into(x_SD[start - first : stop - first], w_EDH[expert], h_RH[start:stop])

    cpu._block_runner.run_indexed(spans.items, work, x_TD.device, POOL_MIN_SPANS)
    return h_RH


def gather_grouped_mm_backward(
    dh_RH: Tensor,
    x_TD: Tensor,
    w_EDH: Tensor,
    token_index_R: Tensor,
    counts_E: Tensor,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """`moe::gather_grouped_mm_backward` on the spans."""
    num_tokens, num_rows = x_TD.shape[0], token_index_R.shape[0]
    spans = Spans(counts_E, num_rows)
    sums = Accumulators(num_tokens, x_TD.shape[1], x_TD)
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


def grouped_mm_combine(
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    num_tokens: int,
) -> Tensor:
    """`moe::grouped_mm_combine` on the spans."""
    scaled_RH = h_RH * weight_R.to(h_RH.dtype).unsqueeze(1)
    spans = Spans(counts_E, token_index_R.shape[0])
    sums = Accumulators(num_tokens, w_EHD.shape[2], h_RH)

    def work(worker: int, item: cpu.Block) -> None:
        span, first, last = item
        y_SD = h_RH.new_empty(last - first, w_EHD.shape[2])
        for expert, start, stop in spans.blocks[span]:
            _mm_into(scaled_RH[start:stop], w_EHD[expert], y_SD[start - first : stop - first])
        sums.add(worker, token_index_R[first:last], y_SD)

    cpu._block_runner.run_indexed(spans.items, work, h_RH.device, POOL_MIN_SPANS)
    return sums.result(h_RH.dtype)


def grouped_mm_combine_backward(
    dy_TD: Tensor,
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """`moe::grouped_mm_combine_backward` on the spans."""
    dy_TD = dy_TD.to(h_RH.dtype)
    weight_R1 = weight_R.to(h_RH.dtype).unsqueeze(1)
    spans = Spans(counts_E, token_index_R.shape[0])
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
