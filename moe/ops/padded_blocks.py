"""The folded expert ops (`moe.ops.fused`) in half precision on CPU: every expert's rows
padded to one block height and multiplied by one `torch.bmm` per matmul.

Why: the block workers' per-expert `torch.mm`s suit fp32, where a [256, 512] x [512, 64]
block runs at the large-matmul rate. In bf16 the same blocks lose most of what bf16
gains: oneDNN builds a kernel per shape (hence the bucketed row counts of
`moe.ops.row_buckets`, paid for with a D-wide zero-padded copy of most blocks), a
per-block call costs more than its FLOPs, and the fp32 sums are a D-wide conversion and
an `index_add_` per span. Here the E blocks of one matmul are one [E, M, D] x [E, D, H]
`bmm` (M: the largest expert's rows, rounded up), the gathers are one `index_select` into
the padded layout, and every sum over a token's rows is one `embedding_bag` (it sums
bf16/fp16 rows in fp32 and rounds once, like the span path's fp32 accumulators).

Measured (`scripts/bench_folded_ops.py`: T=4096, D=512, top-8 of a random router, the
four ops forward and backward, 2 threads, heap reuse, AMD EPYC with avx512_bf16,
2026-12-05): bf16 E=128 H=64 73 ms here against 118 ms on the span path, E=256 H=32 61
against 125, E=64 H=128 107 against 137; fp32 gains nothing (138 against 140 ms at
E=128, 208 against 205 at E=64), so fp32 keeps the span path.

The padding costs FLOPs and memory in proportion to the imbalance, so the layout is used
only while the padded rows are at most `max_padded_ratio(H)` times the routed rows (a
collapsed router, one expert taking most rows, falls back to the span path). Each op
holds one transient [E*M, D] buffer at a time (a gather or a matmul's output); nothing of
[R, D] is kept for the backward, which re-gathers. A bf16 step's peak memory is
therefore about the unfolded layer's rather than the span path's (E=128: 199 against
140 MB, `bench_layer.py --fine-grained --dtype bf16`).

Shapes: T tokens, R routed rows (sorted by expert), D model width, H expert hidden
width, E experts, M rows of a padded block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from moe.ops.row_buckets import HALF_EXACT_ROWS

# Padded rows (E * M) over routed rows (R) up to which the padded layout is used, by the
# experts' hidden width: the narrower the experts, the more the padded bmm gains over the
# per-block matmuls, so the more padding pays. Measured break-evens (bf16, T=4096,
# D=512, top-8, a random router skewed towards four experts; the padded ops' time grows
# about in proportion to the ratio): H=128 about 1.4, H=64 about 2.1, H=32 about 2.8;
# a balanced load gives 1.1-1.5 (the largest expert ~1.1-1.4x the mean, bucketed).
PADDED_RATIO_BY_WIDTH = ((128, 1.25), (64, 1.75), (0, 2.25))  # (hidden width at least, bound)
PADDED_DTYPES = (torch.bfloat16,)  # measured in bf16 only; fp16 keeps the spans
# Blocks of more rows are padded to a multiple of this: `bmm` has no per-shape kernel
# build worth avoiding (a new M costs at most a few ms once), so the height follows the
# largest expert closely: E=128, largest 302 rows, 304 here against 320 at row_buckets'
# 8 sizes per power of two, 4.5% of the bf16 bmms' time (46.3 against 48.5 ms a step).
PADDED_ROW_STEP = 16


def padded_height(counts: list[int]) -> int:
    """M: the largest block's rows, up to a multiple of `PADDED_ROW_STEP` above
    `HALF_EXACT_ROWS` (a bounded set of bmm shapes)."""
    largest = max(counts, default=0)
    if largest <= HALF_EXACT_ROWS:
        return largest
    return -(-largest // PADDED_ROW_STEP) * PADDED_ROW_STEP


def max_padded_ratio(hidden: int) -> float:
    """The padded rows per routed row up to which experts of this hidden width pad."""
    return next(ratio for width, ratio in PADDED_RATIO_BY_WIDTH if hidden >= width)


def applies(x: Tensor, counts_E: Tensor, num_rows: int, hidden: int) -> bool:
    """Whether the folded ops on these operands (experts `hidden` wide) take the padded
    layout: bf16 on CPU, some rows, padding within `max_padded_ratio`."""
    if x.device.type != "cpu" or x.dtype not in PADDED_DTYPES or num_rows == 0:
        return False
    counts = counts_E.tolist()
    return len(counts) * padded_height(counts) <= max_padded_ratio(hidden) * num_rows


class PaddedBlocks:
    """Where each routed row sits in the [E, M] padded layout, and each token's rows.

    `position_R[r]`: row r's place in the flattened layout; `token_P[p]`: the token whose
    row fills place p. A padding place of expert e holds the token of e's first row: in
    a weight gradient (x^T dh over e's places, the padding's dh zero) the padding then
    adds exact zeros, or a NaN only where e's own rows already make the sum non-finite
    (an inf in x); no other token's row reaches e. Experts without rows have their
    gradient zeroed (`zero_empty`). (`bag_positions`, `bag_offsets`): every token's
    places, as `embedding_bag`'s input and offsets (tokens without rows get empty bags).
    """

    def __init__(self, counts_E: Tensor, token_index_R: Tensor, num_tokens: int):
        counts = counts_E.tolist()
        self.experts = len(counts)
        self.height = padded_height(counts)
        num_rows = token_index_R.shape[0]
        counts_E = counts_E.to(torch.long)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        expert_R = torch.repeat_interleave(
            torch.arange(self.experts), counts_E, output_size=num_rows
        )
        row_in_block_R = torch.arange(num_rows) - starts_E[expert_R]
        self.position_R = expert_R * self.height + row_in_block_R
        first_token_E = (
            token_index_R[starts_E.clamp(max=num_rows - 1)]
            if num_rows
            else torch.zeros(self.experts, dtype=torch.long)
        )
        self.token_P = first_token_E.repeat_interleave(self.height)
        self.token_P[self.position_R] = token_index_R
        self.empty_E = (counts_E == 0).nonzero().squeeze(1)
        self.bag_positions = self.position_R[torch.argsort(token_index_R, stable=True)]
        rows_T = torch.bincount(token_index_R, minlength=num_tokens)
        self.bag_offsets = torch.cumsum(rows_T, 0) - rows_T

    def gather(self, x_TD: Tensor) -> Tensor:
        """[E, M, D]: the token rows of every place."""
        return x_TD.index_select(0, self.token_P).view(self.experts, self.height, x_TD.shape[1])

    def zero_empty(self, dw_EXY: Tensor) -> Tensor:
        """dw_EXY with the blocks of experts without rows zeroed (their padding-only
        product read another expert's token)."""
        return dw_EXY.index_fill_(0, self.empty_E, 0) if self.empty_E.numel() else dw_EXY

    def pad(self, rows_RH: Tensor) -> Tensor:
        """[E, M, H]: routed rows at their places, zeros in the padding."""
        out_PH = rows_RH.new_zeros(self.experts * self.height, rows_RH.shape[1])
        out_PH.index_copy_(0, self.position_R, rows_RH)
        return out_PH.view(self.experts, self.height, rows_RH.shape[1])

    def unpad(self, blocks_EMH: Tensor) -> Tensor:
        """[R, H]: the routed rows of a padded product (its padding rows dropped)."""
        return blocks_EMH.reshape(-1, blocks_EMH.shape[2]).index_select(0, self.position_R)

    def sum_per_token(self, blocks_EMD: Tensor) -> Tensor:
        """[T, D]: each token's rows summed (in fp32 for half inputs, rounded once)."""
        return F.embedding_bag(
            self.bag_positions,
            blocks_EMD.reshape(-1, blocks_EMD.shape[2]),
            self.bag_offsets,
            mode="sum",
        )


# The layout of each routing, kept while its token_index_R lives: the four folded ops of
# a layer (the forward two, then the backward two through their saved tensors) get the
# same token_index_R object, so a step builds the layout once instead of four times
# (1.35 ms each at T=4096, top-8 of 128; about 1 MB a layer held until its backward).
# Keyed by the tensor's identity, checked against its version counter (an in-place
# change rebuilds), the counts and T.
_LAYOUTS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def layout(
    like: Tensor, counts_E: Tensor, token_index_R: Tensor, num_tokens: int, hidden: int
) -> PaddedBlocks | None:
    """The padded layout of these routed rows where the folded ops take it (`applies`,
    with `like` the operand whose dtype and device decide), else None."""
    if not applies(like, counts_E, token_index_R.shape[0], hidden):
        return None
    if token_index_R.is_inference():  # no version counter to check a cached layout by
        return PaddedBlocks(counts_E, token_index_R, num_tokens)
    key = (token_index_R._version, tuple(counts_E.tolist()), num_tokens)
    cached = _LAYOUTS.get(token_index_R)
    if cached is not None and cached[0] == key:
        return cached[1]
    blocks = PaddedBlocks(counts_E, token_index_R, num_tokens)
    _LAYOUTS[token_index_R] = (key, blocks)
    return blocks


def gather_grouped_mm(blocks: PaddedBlocks, x_TD: Tensor, w_EDH: Tensor) -> Tensor:
    return blocks.unpad(torch.bmm(blocks.gather(x_TD), w_EDH))


def gather_grouped_mm_backward(
    blocks: PaddedBlocks,
    dh_RH: Tensor,
    x_TD: Tensor,
    w_EDH: Tensor,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    dh_EMH = blocks.pad(dh_RH)
    dx_TD = dw_EDH = x_TD.new_empty(0)
    # One [E, M, D] buffer at a time (the peak memory of a step).
    if input_grad:
        dx_TD = blocks.sum_per_token(torch.bmm(dh_EMH, w_EDH.transpose(1, 2)))
    if weight_grad:
        dw_EDH = blocks.zero_empty(torch.bmm(blocks.gather(x_TD).transpose(1, 2), dh_EMH))
    return dx_TD, dw_EDH


def grouped_mm_combine(
    blocks: PaddedBlocks, h_RH: Tensor, w_EHD: Tensor, weight_R: Tensor
) -> Tensor:
    scaled_EMH = blocks.pad(h_RH * weight_R.to(h_RH.dtype).unsqueeze(1))
    return blocks.sum_per_token(torch.bmm(scaled_EMH, w_EHD))


def grouped_mm_combine_backward(
    blocks: PaddedBlocks,
    dy_TD: Tensor,
    h_RH: Tensor,
    w_EHD: Tensor,
    weight_R: Tensor,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    weight_R1 = weight_R.to(h_RH.dtype).unsqueeze(1)
    dy_EMD = blocks.gather(dy_TD.to(h_RH.dtype))
    g_RH = blocks.unpad(torch.bmm(dy_EMD, w_EHD.transpose(1, 2)))
    dw_EHD = h_RH.new_empty(0)
    if weight_grad:
        scaled_EMH = blocks.pad(h_RH * weight_R1)
        dw_EHD = blocks.zero_empty(torch.bmm(scaled_EMH.transpose(1, 2), dy_EMD))
    dweight_R = (g_RH.to(weight_R.dtype) * h_RH.to(weight_R.dtype)).sum(1)
    return g_RH.mul_(weight_R1), dw_EHD, dweight_R
