"""The folded expert ops (`moe.ops.fused`) in half precision on CPU: every expert's rows
padded to a common block height and multiplied by one `torch.bmm` per matmul and tier.

Why: the block workers' per-expert `torch.mm`s suit fp32, where a [256, 512] x [512, 64]
block runs at the large-matmul rate. In bf16 the same blocks lose most of what bf16
gains: oneDNN builds a kernel per shape (hence the bucketed row counts of
`moe.ops.row_buckets`, paid for with a D-wide zero-padded copy of most blocks), a
per-block call costs more than its FLOPs, and the fp32 sums are a D-wide conversion and
an `index_add_` per span. Here the E blocks of one matmul are one [E, M, D] x [E, D, H]
`bmm`, the gathers are one `index_select` into the padded layout, and every sum over a
token's rows is one `embedding_bag` (it sums bf16/fp16 rows in fp32 and rounds once,
like the span path's fp32 accumulators).

M sits near the mean load rather than at the largest expert: the rows beyond M of the
experts that have more go to a second, shorter tier of blocks (`padded_heights`), which
at top-8 of 128 experts of a random router cuts the padded rows per routed row from
1.25 to 1.10. The layout of a routing is built once and shared by the four ops of a
layer, forward and backward (`layout`).

Measured (`scripts/bench_folded_ops.py`: T=4096, D=512, top-8 of a random router, the
four ops forward and backward, 2 threads, heap reuse, AMD EPYC with avx512_bf16,
2026-12-05): bf16 E=128 H=64 about 70 ms here against 118-132 ms on the span path,
E=256 H=32 55-62 against 125-154, E=64 H=128 107-123 against 137-164; fp32 gains
nothing (138 against 140 ms at E=128, 208 against 205 at E=64), so fp32 keeps the span
path.

The padding costs FLOPs and memory in proportion to the imbalance, so the layout is used
only while the padded rows are at most `max_padded_ratio(H)` times the routed rows (a
load spread over many levels, which two tiers cannot fit, falls back to the span path).
Each op holds one transient [P, D] buffer at a time (a gather or a matmul's output);
nothing of [R, D] is kept for the backward, which re-gathers. A bf16 step's peak memory
is therefore about the unfolded layer's rather than the span path's (E=128: 181-203
against 140 MB, `bench_layer.py --fine-grained --dtype bf16`).

Shapes: T tokens, R routed rows (sorted by expert), D model width, H expert hidden
width, E experts, M rows of a first-tier block, P padded places (all tiers).
"""

from __future__ import annotations

import bisect

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
# build worth avoiding (a new M costs at most a few ms once), so the heights follow the
# rows closely.
PADDED_ROW_STEP = 16
# The rows beyond the first height go to a second, shorter block of only the experts that
# have them when that saves at least this fraction of the padded places (the second tier
# costs a small bmm per matmul and a gather of those experts' weights).
OVERFLOW_MIN_SAVING = 1 / 16


def rounded_rows(rows: int) -> int:
    """A block height for `rows`: exact up to `HALF_EXACT_ROWS`, above that up to a
    multiple of `PADDED_ROW_STEP` (a bounded set of bmm shapes)."""
    if rows <= HALF_EXACT_ROWS:
        return rows
    return -(-rows // PADDED_ROW_STEP) * PADDED_ROW_STEP


def padded_heights(counts: list[int]) -> tuple[int, int]:
    """(M, M2): every expert's block height, and the overflow tier's (0: none), the
    pair with the fewest padded places E * M + (experts over M) * M2, M a multiple of
    `PADDED_ROW_STEP`. One tier holds the largest expert whole; a second lets M sit
    nearer the mean (E=128 at top-8 of a random router: the largest expert 313 rows, the
    mean 256: 128 x 320 = 40,960 places in one tier, 128 x 272 + 32 x 41 = 36,128 in
    two). The experts over each M are counted by bisection of the sorted counts (0.1 ms
    at 65,536 tokens, top-8 of 128, against 9.6 ms counting them one by one)."""
    largest = max(counts, default=0)
    one_tier = (rounded_rows(largest), 0)
    best, best_places = one_tier, len(counts) * one_tier[0]
    if largest <= HALF_EXACT_ROWS:
        return best
    ascending = sorted(counts)
    for height in range(PADDED_ROW_STEP, one_tier[0], PADDED_ROW_STEP):
        over = len(ascending) - bisect.bisect_right(ascending, height)
        if not over:
            break
        places = len(counts) * height + over * rounded_rows(largest - height)
        if places < best_places:
            best, best_places = (height, rounded_rows(largest - height)), places
    if best[1] and best_places > (1 - OVERFLOW_MIN_SAVING) * len(counts) * one_tier[0]:
        return one_tier
    return best


def padded_places(counts: list[int]) -> int:
    """The padded layout's places (rows of every gathered block) for these counts."""
    height, overflow = padded_heights(counts)
    return len(counts) * height + sum(1 for count in counts if count > height) * overflow


def max_padded_ratio(hidden: int) -> float:
    """The padded rows per routed row up to which experts of this hidden width pad."""
    return next(ratio for width, ratio in PADDED_RATIO_BY_WIDTH if hidden >= width)


def applies(x: Tensor, counts_E: Tensor, num_rows: int, hidden: int) -> bool:
    """Whether the folded ops on these operands (experts `hidden` wide) take the padded
    layout: bf16 on CPU, some rows, padding within `max_padded_ratio`."""
    if x.device.type != "cpu" or x.dtype not in PADDED_DTYPES or num_rows == 0:
        return False
    return padded_places(counts_E.tolist()) <= max_padded_ratio(hidden) * num_rows


class PaddedBlocks:
    """Where each routed row sits in the padded layout, and each token's rows.

    The layout is P places in one or two tiers, each a stack of equal blocks: every
    expert's first M rows in an [E, M] block (places e * M + i), and where the largest
    experts have more, their rows beyond M in an [E2, M2] block of only those experts
    (places E * M + slot * M2 + i - M). Each matmul is one `bmm` per tier.

    `position_R[r]`: row r's place; `token_P[p]`: the token whose row fills place p. A
    padding place of expert e holds the token of e's first row: in a weight gradient
    (x^T dh over e's places, the padding's dh zero) the padding then adds exact zeros,
    or a NaN only where e's own rows already make the sum non-finite (an inf in x); no
    other token's row reaches e. Experts without rows get a zero gradient.
    (`bag_positions`, `bag_offsets`): every token's places, as `embedding_bag`'s input
    and offsets (tokens without rows get empty bags).
    """

    def __init__(self, counts_E: Tensor, token_index_R: Tensor, num_tokens: int):
        counts = counts_E.tolist()
        experts = len(counts)
        self.height, overflow = padded_heights(counts)
        num_rows = token_index_R.shape[0]
        counts_E = counts_E.to(torch.long)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        expert_R = torch.repeat_interleave(torch.arange(experts), counts_E, output_size=num_rows)
        row_in_block_R = torch.arange(num_rows) - starts_E[expert_R]
        first_token_E = (
            token_index_R[starts_E.clamp(max=num_rows - 1)]
            if num_rows
            else torch.zeros(experts, dtype=torch.long)
        )
        first_places = experts * self.height
        # (experts of the tier or None for all, blocks, height, first place, end place)
        self.tiers: list[tuple[Tensor | None, int, int, int, int]] = [
            (None, experts, self.height, 0, first_places)
        ]
        self.position_R = expert_R * self.height + row_in_block_R
        token_parts = [first_token_E.repeat_interleave(self.height)]
        over_E = (counts_E > self.height).nonzero().squeeze(1)
        if overflow and over_E.numel():
            slot_E = torch.zeros(experts, dtype=torch.long)
            slot_E[over_E] = torch.arange(over_E.numel())
            beyond_R = row_in_block_R >= self.height
            self.position_R = torch.where(
                beyond_R,
                first_places + slot_E[expert_R] * overflow + row_in_block_R - self.height,
                self.position_R,
            )
            end = first_places + over_E.numel() * overflow
            self.tiers.append((over_E, over_E.numel(), overflow, first_places, end))
            token_parts.append(first_token_E[over_E].repeat_interleave(overflow))
        self.token_P = torch.cat(token_parts)
        self.token_P[self.position_R] = token_index_R
        self.empty_E = (counts_E == 0).nonzero().squeeze(1)
        self.bag_positions = self.position_R[torch.argsort(token_index_R, stable=True)]
        rows_T = torch.bincount(token_index_R, minlength=num_tokens)
        self.bag_offsets = torch.cumsum(rows_T, 0) - rows_T

    @property
    def places(self) -> int:
        return self.tiers[-1][4]

    def gather(self, x_TD: Tensor) -> Tensor:
        """[P, D]: the token row of every place."""
        return x_TD.index_select(0, self.token_P)

    def pad(self, rows_RH: Tensor) -> Tensor:
        """[P, H]: routed rows at their places, zeros in the padding."""
        out_PH = rows_RH.new_zeros(self.places, rows_RH.shape[1])
        return out_PH.index_copy_(0, self.position_R, rows_RH)

    def unpad(self, rows_PH: Tensor) -> Tensor:
        """[R, H]: the routed rows of a padded product (its padding rows dropped)."""
        return rows_PH.index_select(0, self.position_R)

    def matmul(self, a_PX: Tensor, w_EXY: Tensor) -> Tensor:
        """[P, Y]: every place's row times its expert's matrix, one `bmm` per tier."""
        out_PY = a_PX.new_empty(self.places, w_EXY.shape[2])
        for experts, blocks, height, start, end in self.tiers:
            w_BXY = w_EXY if experts is None else _select_experts(w_EXY, experts)
            torch.bmm(
                a_PX[start:end].view(blocks, height, -1),
                w_BXY,
                out=out_PY[start:end].view(blocks, height, -1),
            )
        return out_PY

    def weight_grad(self, a_PX: Tensor, b_PY: Tensor) -> Tensor:
        """[E, X, Y]: sum over each expert's places of a^T b (zero for experts without
        rows, whose padding read another expert's token)."""
        dw_EXY = None
        for experts, blocks, height, start, end in self.tiers:
            a_BMX = a_PX[start:end].view(blocks, height, -1)
            dw_BXY = torch.bmm(a_BMX.transpose(1, 2), b_PY[start:end].view(blocks, height, -1))
            if experts is None:
                dw_EXY = dw_BXY
            else:
                assert dw_EXY is not None
                dw_EXY.index_add_(0, experts, dw_BXY)
        assert dw_EXY is not None
        return dw_EXY.index_fill_(0, self.empty_E, 0) if self.empty_E.numel() else dw_EXY

    def sum_per_token(self, rows_PD: Tensor) -> Tensor:
        """[T, D]: each token's rows summed (in fp32 for half inputs, rounded once)."""
        return F.embedding_bag(self.bag_positions, rows_PD, self.bag_offsets, mode="sum")


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
    with `like` the operand whose dtype and device decide), else None. Both answers are
    kept for the routing (`applies` is decided once too)."""
    if like.device.type != "cpu" or like.dtype not in PADDED_DTYPES:
        return None
    if token_index_R.is_inference():  # no version counter to check a cached layout by
        return _layout_if_applies(like, counts_E, token_index_R, num_tokens, hidden)
    key = (token_index_R._version, tuple(counts_E.tolist()), num_tokens, like.dtype, hidden)
    cached = _LAYOUTS.get(token_index_R)
    if cached is not None and cached[0] == key:
        return cached[1]
    blocks = _layout_if_applies(like, counts_E, token_index_R, num_tokens, hidden)
    _LAYOUTS[token_index_R] = (key, blocks)
    return blocks


def _layout_if_applies(
    like: Tensor, counts_E: Tensor, token_index_R: Tensor, num_tokens: int, hidden: int
) -> PaddedBlocks | None:
    if not applies(like, counts_E, token_index_R.shape[0], hidden):
        return None
    return PaddedBlocks(counts_E, token_index_R, num_tokens)


def _select_experts(w_EXY: Tensor, experts: Tensor) -> Tensor:
    """w_EXY[experts], copied in w's own memory order (a transposed weight stays a
    transposed view: copying it into [B, X, Y] order took 3x as long)."""
    if not w_EXY.is_contiguous() and w_EXY.transpose(1, 2).is_contiguous():
        return w_EXY.transpose(1, 2).index_select(0, experts).transpose(1, 2)
    return w_EXY.index_select(0, experts)


def gather_grouped_mm(blocks: PaddedBlocks, x_TD: Tensor, w_EDH: Tensor) -> Tensor:
    return blocks.unpad(blocks.matmul(blocks.gather(x_TD), w_EDH))


def gather_grouped_mm_backward(
    blocks: PaddedBlocks,
    dh_RH: Tensor,
    x_TD: Tensor,
    w_EDH: Tensor,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    dh_PH = blocks.pad(dh_RH)
    dx_TD = dw_EDH = x_TD.new_empty(0)
    # One [P, D] buffer at a time (the peak memory of a step).
    if input_grad:
        dx_TD = blocks.sum_per_token(blocks.matmul(dh_PH, w_EDH.transpose(1, 2)))
    if weight_grad:
        dw_EDH = blocks.weight_grad(blocks.gather(x_TD), dh_PH)
    return dx_TD, dw_EDH


def grouped_mm_combine(
    blocks: PaddedBlocks, h_RH: Tensor, w_EHD: Tensor, weight_R: Tensor
) -> Tensor:
    scaled_PH = blocks.pad(h_RH * weight_R.to(h_RH.dtype).unsqueeze(1))
    return blocks.sum_per_token(blocks.matmul(scaled_PH, w_EHD))


def grouped_mm_combine_backward(
    blocks: PaddedBlocks,
    dy_TD: Tensor,
    h_RH: Tensor,
    w_EHD: Tensor,
    weight_R: Tensor,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    weight_R1 = weight_R.to(h_RH.dtype).unsqueeze(1)
    dy_PD = blocks.gather(dy_TD.to(h_RH.dtype))
    g_RH = blocks.unpad(blocks.matmul(dy_PD, w_EHD.transpose(1, 2)))
    dw_EHD = h_RH.new_empty(0)
    if weight_grad:
        dw_EHD = blocks.weight_grad(blocks.pad(h_RH * weight_R1), dy_PD)
    dweight_R = (g_RH.to(weight_R.dtype) * h_RH.to(weight_R.dtype)).sum(1)
    return g_RH.mul_(weight_R1), dw_EHD, dweight_R
