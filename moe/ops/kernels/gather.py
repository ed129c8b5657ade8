"""Triton row gathers for the MoE permute and the weighted combine (unpermute).

Permute: `gather_rows(x_TD, index_R)` copies token rows into expert-sorted order.
Combine: `combine(y_RD, row_of_slot_TK, weights_TK)` sums, for each token, the expert
outputs of its kept slots. Both are gathers (each output element is written by one
program), so neither needs atomics and both are deterministic; `combine_backward` is a
gather for dweights plus a scatter to unique rows for dy_RD (still no atomics).

Shape legend: T tokens, D width, R routed rows, K slots per token.
A slot (t, k) is kept when `row_of_slot_TK[t, k] >= 0`; it then names its row of y_RD.

Plain functions on tensors with no autograd: the custom ops in `moe.ops` own it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_D = 1024
_ELEMENTS_PER_PROGRAM = 4096


def _row_blocks(width: int) -> tuple[int, int]:
    """(rows per program, columns per program): about 4096 elements per program."""
    block_d = min(triton.next_power_of_2(max(width, 1)), _MAX_BLOCK_D)
    return max(1, _ELEMENTS_PER_PROGRAM // block_d), block_d


@triton.jit
def _gather_rows_kernel(
    x_ptr,
    index_ptr,
    out_ptr,
    R,
    D,
    stride_xt,
    stride_xd,
    stride_or,
    stride_od,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[r, :] = x[index[r], :] for a [BLOCK_R, BLOCK_D] tile; grid (R tiles, D tiles)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < R
    mask = row_mask[:, None] & (cols < D)[None, :]
    src = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    values = tl.load(x_ptr + src[:, None] * stride_xt + cols[None, :] * stride_xd, mask=mask)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_or + cols[None, :] * stride_od
    tl.store(out_ptrs, values, mask=mask)


@triton.jit
def _combine_kernel(
    y_ptr,
    row_ptr,
    weight_ptr,
    out_ptr,
    T,
    D,
    K,
    stride_yr,
    stride_yd,
    stride_rt,
    stride_rk,
    stride_wt,
    stride_wk,
    stride_ot,
    stride_od,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t, :] = sum_k w[t, k] * y[row[t, k], :] over kept slots, fp32 sum.

    Grid (T tiles, D tiles); each program loops over the K slots of its tokens.
    Dropped slots are masked out of both loads, so their weights (even NaN) are never read.
    """
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < T
    col_mask = cols < D
    tokens64 = tokens.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(K):
        row = tl.load(row_ptr + tokens64 * stride_rt + k * stride_rk, mask=token_mask, other=-1)
        kept = row >= 0
        values = tl.load(
            y_ptr + row.to(tl.int64)[:, None] * stride_yr + cols[None, :] * stride_yd,
            mask=kept[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_WEIGHTS:
            weight = tl.load(
                weight_ptr + tokens64 * stride_wt + k * stride_wk, mask=kept, other=0.0
            ).to(tl.float32)
            values = values * weight[:, None]
        acc += values
    out_ptrs = out_ptr + tokens64[:, None] * stride_ot + cols[None, :] * stride_od
    tl.store(
        out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=token_mask[:, None] & col_mask[None, :]
    )


@triton.jit
def _combine_backward_kernel(
    dout_ptr,
    y_ptr,
    row_ptr,
    weight_ptr,
    dy_ptr,
    dweight_ptr,
    T,
    D,
    stride_dot,
    stride_dod,
    stride_yr,
    stride_yd,
    stride_rt,
    stride_rk,
    stride_wt,
    stride_wk,
    stride_dyr,
    stride_dyd,
    stride_dwt,
    stride_dwk,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """For slot k = program_id(1) of BLOCK_T tokens, loop over D in BLOCK_D steps:

    dy[row[t, k], :] = w[t, k] * dout[t, :]   (rows are unique per slot: plain stores)
    dweight[t, k] = <dout[t, :], y[row[t, k], :]>   (fp32 sum; 0 for dropped slots)
    """
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.program_id(1)
    token_mask = tokens < T
    tokens64 = tokens.to(tl.int64)
    row = tl.load(row_ptr + tokens64 * stride_rt + k * stride_rk, mask=token_mask, other=-1)
    kept = row >= 0
    row64 = row.to(tl.int64)
    weight = tl.load(weight_ptr + tokens64 * stride_wt + k * stride_wk, mask=kept, other=0.0)
    weight = weight.to(tl.float32)
    dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        cols = d_start + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        mask = kept[:, None] & col_mask[None, :]
        dout = tl.load(
            dout_ptr + tokens64[:, None] * stride_dot + cols[None, :] * stride_dod,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        values = tl.load(
            y_ptr + row64[:, None] * stride_yr + cols[None, :] * stride_yd, mask=mask, other=0.0
        ).to(tl.float32)
        dy_ptrs = dy_ptr + row64[:, None] * stride_dyr + cols[None, :] * stride_dyd
        tl.store(dy_ptrs, (dout * weight[:, None]).to(dy_ptr.dtype.element_ty), mask=mask)
        dot += tl.sum(dout * values, axis=1)
    dweight_ptrs = dweight_ptr + tokens64 * stride_dwt + k * stride_dwk
    tl.store(dweight_ptrs, dot.to(dweight_ptr.dtype.element_ty), mask=token_mask)


def _check_slots(row_of_slot_TK: torch.Tensor, weights_TK: torch.Tensor | None) -> None:
    if row_of_slot_TK.dim() != 2 or row_of_slot_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"row_of_slot_TK: shape {tuple(row_of_slot_TK.shape)}, dtype {row_of_slot_TK.dtype}: "
            "expected [T, K] int32/int64"
        )
    if weights_TK is not None and weights_TK.shape != row_of_slot_TK.shape:
        raise ValueError(
            f"weights_TK has shape {tuple(weights_TK.shape)}: expected "
            f"{tuple(row_of_slot_TK.shape)}, the shape of row_of_slot_TK"
        )


def gather_rows(x_TD: torch.Tensor, index_R: torch.Tensor) -> torch.Tensor:
    """x_RD[r] = x_TD[index_R[r]] (the permute). Any dtype and strides.

    `index_R` is int32/int64 with every entry in [0, T) (not checked on the device).
    Returns a new contiguous [R, D] tensor.
    """
    if x_TD.dim() != 2 or index_R.dim() != 1 or index_R.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"gather_rows: x_TD {tuple(x_TD.shape)}, index_R {tuple(index_R.shape)} "
            f"{index_R.dtype}: expected [T, D] and [R] int32/int64"
        )
    num_rows, width = index_R.shape[0], x_TD.shape[1]
    x_RD = torch.empty((num_rows, width), dtype=x_TD.dtype, device=x_TD.device)
    if num_rows == 0 or width == 0:
        return x_RD
    block_r, block_d = _row_blocks(width)
    grid = (triton.cdiv(num_rows, block_r), triton.cdiv(width, block_d))
    _gather_rows_kernel[grid](
        x_TD,
        index_R,
        x_RD,
        num_rows,
        width,
        x_TD.stride(0),
        x_TD.stride(1),
        x_RD.stride(0),
        x_RD.stride(1),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return x_RD


def gather_rows_backward(
    dx_RD: torch.Tensor, index_R: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """dx_TD[t] = sum of dx_RD[r] over rows r with index_R[r] == t (a scatter-add).

    Uses `index_add_` (atomics on CUDA, so the float summation order is not fixed).
    Where every row is a kept slot, `combine(dx_RD, row_of_slot_TK, None)` computes the
    same thing as a deterministic gather and is the preferred backward.
    """
    dx_TD = torch.zeros((num_tokens, dx_RD.shape[1]), dtype=dx_RD.dtype, device=dx_RD.device)
    return dx_TD.index_add_(0, index_R, dx_RD)


def combine(
    y_RD: torch.Tensor, row_of_slot_TK: torch.Tensor, weights_TK: torch.Tensor | None
) -> torch.Tensor:
    """y_TD[t] = sum over kept k of weights_TK[t, k] * y_RD[row_of_slot_TK[t, k]] (unpermute).

    `weights_TK=None` means unit weights (then this is the gather-based backward of
    `gather_rows`). Weights of any float dtype; sums in fp32; the result has y's dtype.
    Any strides.
    Returns a new contiguous [T, D] tensor; a token with no kept slot gets zeros.
    """
    _check_slots(row_of_slot_TK, weights_TK)
    if y_RD.dim() != 2:
        raise ValueError(f"combine: y_RD has shape {tuple(y_RD.shape)}: expected [R, D]")
    num_tokens, top_k = row_of_slot_TK.shape
    width = y_RD.shape[1]
    y_TD = torch.empty((num_tokens, width), dtype=y_RD.dtype, device=y_RD.device)
    if num_tokens == 0 or width == 0:
        return y_TD
    weights = row_of_slot_TK if weights_TK is None else weights_TK  # a never-read placeholder
    block_t, block_d = _row_blocks(width)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_d))
    _combine_kernel[grid](
        y_RD,
        row_of_slot_TK,
        weights,
        y_TD,
        num_tokens,
        width,
        top_k,
        y_RD.stride(0),
        y_RD.stride(1),
        row_of_slot_TK.stride(0),
        row_of_slot_TK.stride(1),
        weights.stride(0),
        weights.stride(1),
        y_TD.stride(0),
        y_TD.stride(1),
        HAS_WEIGHTS=weights_TK is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return y_TD


def combine_backward(
    dy_TD: torch.Tensor,
    y_RD: torch.Tensor,
    row_of_slot_TK: torch.Tensor,
    weights_TK: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `combine` with respect to y_RD and weights_TK.

    dy_RD[row[t, k]] = weights[t, k] * dy_TD[t] (rows no kept slot names stay zero);
    dweights_TK[t, k] = <dy_TD[t], y_RD[row[t, k]]>, 0 for dropped slots.
    Each row must be named by at most one slot (true of a permutation).
    Returns (dy_RD with y's dtype, dweights_TK with the weights' dtype).
    """
    _check_slots(row_of_slot_TK, weights_TK)
    num_tokens, top_k = row_of_slot_TK.shape
    if y_RD.dim() != 2 or dy_TD.shape != (num_tokens, y_RD.shape[1]):
        raise ValueError(
            f"combine_backward: dy_TD {tuple(dy_TD.shape)}, y_RD {tuple(y_RD.shape)}: "
            f"expected [T, D] and [R, D] with T={num_tokens}"
        )
    width = y_RD.shape[1]
    dy_RD = torch.zeros_like(y_RD, memory_format=torch.contiguous_format)
    dweights_TK = torch.zeros((num_tokens, top_k), dtype=weights_TK.dtype, device=weights_TK.device)
    if num_tokens == 0 or top_k == 0:
        return dy_RD, dweights_TK
    block_t, block_d = _row_blocks(width)
    grid = (triton.cdiv(num_tokens, block_t), top_k)
    _combine_backward_kernel[grid](
        dy_TD,
        y_RD,
        row_of_slot_TK,
        weights_TK,
        dy_RD,
        dweights_TK,
        num_tokens,
        width,
        dy_TD.stride(0),
        dy_TD.stride(1),
        y_RD.stride(0),
        y_RD.stride(1),
        row_of_slot_TK.stride(0),
        row_of_slot_TK.stride(1),
        weights_TK.stride(0),
        weights_TK.stride(1),
        dy_RD.stride(0),
        dy_RD.stride(1),
        dweights_TK.stride(0),
        dweights_TK.stride(1),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return dy_RD, dweights_TK
