"""Triton grouped matmul for experts: the CUDA fast path behind `moe::grouped_mm(_wgrad)`.

Rows of `x_RD` are sorted by expert. `offsets_E` is the inclusive cumulative sum of the
per-expert row counts (a device tensor, int32 or int64): expert e owns the rows
`[offsets_E[e - 1], offsets_E[e])`, expert 0 from row 0. Nothing here syncs
with the host: the kernels read `offsets_E` on the device.

Shape legend: R routed rows, D input width, H output width, E experts.

These are plain functions on tensors, with no autograd: the custom ops in `moe.ops`
own the backward. Accumulation is always fp32; inputs may be fp32, fp16 or bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.ops.kernels.tiles import (
    SUPPORTED_DTYPES,
    GemmBlocks,
    check_offsets,
    check_rows,
    default_blocks,
    input_precision,
    launch,
    program_tile,
    source_rows,
    tile_product,
)


@triton.jit
def _grouped_mm_kernel(
    x_ptr,
    index_ptr,
    w_ptr,
    y_ptr,
    offsets_ptr,
    num_experts,
    D,
    H,
    stride_xr,
    stride_xd,
    stride_we,
    stride_wd,
    stride_wh,
    stride_yr,
    stride_yh,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    GATHER_A: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y[r] = x[r] @ w[e] for the rows r of expert e, or
    with GATHER_A y[r] = x[index[r]] @ w[e] (the permute's gather folded into the load:
    `moe.ops.kernels.folded.gather_grouped_mm`)."""
    expert, rows, row_mask, col_tile = program_tile(
        offsets_ptr, num_experts, H, BLOCK_M, BLOCK_N, EXPERTS_POW2
    )
    if expert >= num_experts:
        return
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    acc = tile_product(
        x_ptr, index_ptr, w_ptr, expert, rows, row_mask, cols, col_mask, D,
        stride_xr, stride_xd, stride_we, stride_wd, stride_wh,
        BLOCK_M, BLOCK_N, BLOCK_K, GATHER_A, INPUT_PRECISION,
    )  # fmt: skip
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yr + cols[None, :] * stride_yh
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grouped_mm_wgrad_kernel(
    x_ptr,
    dy_ptr,
    dw_ptr,
    offsets_ptr,
    x_index_ptr,
    dy_index_ptr,
    x_scale_ptr,
    D,
    H,
    stride_xr,
    stride_xd,
    stride_dyr,
    stride_dyh,
    stride_dwe,
    stride_dwd,
    stride_dwh,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    X_INDEXED: tl.constexpr,
    DY_INDEXED: tl.constexpr,
    X_SCALED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One [BLOCK_D, BLOCK_H] tile of dw[e] = x_e^T @ dy_e, reducing over e's rows.

    Row r of x_e is x[x_index[r]] when X_INDEXED (else x[r]), scaled by x_scale[r] when
    X_SCALED (in fp32, then rounded to x's dtype for the dot); row r of dy_e is
    dy[dy_index[r]] when DY_INDEXED. Grid: (D tiles x H tiles, E). Each program walks its
    expert's rows in BLOCK_R steps; an expert with no rows runs no step and writes zeros.
    """
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_h_tiles = tl.cdiv(H, BLOCK_H)
    d_tile = pid // num_h_tiles
    h_tile = pid % num_h_tiles
    row_start = tl.load(offsets_ptr + tl.maximum(expert - 1, 0)).to(tl.int32)
    row_start = tl.where(expert > 0, row_start, 0)
    row_end = tl.load(offsets_ptr + expert).to(tl.int32)

    ds = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    hs = h_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    d_mask = ds < D
    h_mask = hs < H
    acc = tl.zeros((BLOCK_D, BLOCK_H), dtype=tl.float32)
    for r_start in range(row_start, row_end, BLOCK_R):
        rows = r_start + tl.arange(0, BLOCK_R)
        r_mask = rows < row_end
        x_rows = source_rows(x_index_ptr, rows, r_mask, X_INDEXED)
        dy_rows = source_rows(dy_index_ptr, rows, r_mask, DY_INDEXED)
        x_t = tl.load(
            x_ptr + x_rows[None, :] * stride_xr + ds[:, None] * stride_xd,
            mask=d_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        if X_SCALED:
            scale = tl.load(x_scale_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)
            x_t = (x_t.to(tl.float32) * scale[None, :]).to(x_ptr.dtype.element_ty)
        dy = tl.load(
            dy_ptr + dy_rows[:, None] * stride_dyr + hs[None, :] * stride_dyh,
            mask=r_mask[:, None] & h_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(x_t, dy, acc, input_precision=INPUT_PRECISION)

    dw_ptrs = (
        dw_ptr
        + expert.to(tl.int64) * stride_dwe
        + ds[:, None] * stride_dwd
        + hs[None, :] * stride_dwh
    )
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=d_mask[:, None] & h_mask[None, :])


def grouped_mm(
    x_RD: torch.Tensor,
    w_EDH: torch.Tensor,
    offsets_E: torch.Tensor,
    blocks: GemmBlocks | None = None,
) -> torch.Tensor:
    """y_RH[rows of e] = x_RD[rows of e] @ w_EDH[e] for every expert e.

    Args:
        x_RD: [R, D] rows sorted by expert; any strides.
        w_EDH: [E, D, H], any strides (a `w_EHD.transpose(1, 2)` view works as is).
        offsets_E: [E] int32/int64 inclusive cumsum of the row counts, on x's device;
            offsets_E[-1] must be <= R (rows past it are left uninitialised in y).
        blocks: tile sizes; default from `default_blocks`.

    Returns:
        y_RH: a new contiguous [R, H] tensor of x's dtype.
    """
    if x_RD.dim() != 2 or w_EDH.dim() != 3 or x_RD.shape[1] != w_EDH.shape[1]:
        raise ValueError(
            f"grouped_mm: x_RD {tuple(x_RD.shape)} and w_EDH {tuple(w_EDH.shape)} "
            "must be [R, D] and [E, D, H] with the same D"
        )
    if x_RD.dtype not in SUPPORTED_DTYPES or w_EDH.dtype != x_RD.dtype:
        raise ValueError(
            f"grouped_mm: dtypes x={x_RD.dtype}, w={w_EDH.dtype}: expected one shared dtype "
            f"among {SUPPORTED_DTYPES}"
        )
    num_rows, d_in = x_RD.shape
    num_experts, _, d_out = w_EDH.shape
    if num_experts < 1:
        raise ValueError(f"grouped_mm: w_EDH has {num_experts} experts: expected >= 1")
    check_offsets(offsets_E, num_experts, x_RD.device)
    y_RH = torch.empty((num_rows, d_out), dtype=x_RD.dtype, device=x_RD.device)
    if num_rows == 0 or d_out == 0:
        return y_RH
    if d_in == 0:
        return y_RH.zero_()
    if blocks is None:
        blocks = default_blocks(x_RD.dtype, num_rows / num_experts)
    args = (x_RD, offsets_E, w_EDH, y_RH, offsets_E, num_experts, d_in, d_out)
    strides = (*x_RD.stride(), *w_EDH.stride(), *y_RH.stride())
    # index_ptr unused without GATHER_A: offsets_E stands in for it.
    launch(_grouped_mm_kernel, (*args, *strides), x_RD.dtype, num_rows, w_EDH, blocks,
            GATHER_A=False)  # fmt: skip
    return y_RH


def grouped_mm_wgrad(
    x_RD: torch.Tensor,
    dy_RH: torch.Tensor,
    offsets_E: torch.Tensor,
    num_experts: int,
    out_dtype: torch.dtype | None = None,
    blocks: GemmBlocks | None = None,
    *,
    x_index_R: torch.Tensor | None = None,
    dy_index_R: torch.Tensor | None = None,
    x_scale_R: torch.Tensor | None = None,
) -> torch.Tensor:
    """dw_EDH[e] = x_RD[rows of e]^T @ dy_RH[rows of e]; zeros for experts with no rows.

    Gathered rows are read through their index in the kernel, never copied: with
    `x_index_R` row r of x is x_RD[x_index_R[r]] (x_RD may then hold any number of rows,
    e.g. one per token; the index is not range-checked on the device), likewise
    `dy_index_R`. With `x_scale_R` ([R] float) row r of x is scaled by it (in fp32,
    rounded to x's dtype for the product).

    Args:
        x_RD: [R, D], dy_RH: [R, H], same dtype, any strides.
        offsets_E: [num_experts] int32/int64 inclusive cumsum of the row counts.
        out_dtype: dtype of dw (default: x's dtype); the sum is fp32 in any case.
        blocks: tile sizes (block_m tiles D, block_n tiles H, block_k steps over rows).

    Returns:
        dw_EDH: a new contiguous [E, D, H] tensor, one full-size gradient.
    """
    num_rows = x_RD.shape[0] if x_index_R is None else x_index_R.shape[0]
    dy_rows = dy_RH.shape[0] if dy_index_R is None else dy_index_R.shape[0]
    if x_RD.dim() != 2 or dy_RH.dim() != 2 or num_rows != dy_rows:
        raise ValueError(
            f"grouped_mm_wgrad: x_RD {tuple(x_RD.shape)} and dy_RH {tuple(dy_RH.shape)} "
            "must be [R, D] and [R, H] with the same R (R of an index where one is given)"
        )
    if x_RD.dtype not in SUPPORTED_DTYPES or dy_RH.dtype != x_RD.dtype:
        raise ValueError(
            f"grouped_mm_wgrad: dtypes x={x_RD.dtype}, dy={dy_RH.dtype}: expected one shared "
            f"dtype among {SUPPORTED_DTYPES}"
        )
    if num_experts < 1:
        raise ValueError(f"grouped_mm_wgrad: num_experts={num_experts}: expected >= 1")
    check_offsets(offsets_E, num_experts, x_RD.device)
    x_index_R = check_rows("x_index_R", x_index_R, num_rows, integer=True)
    dy_index_R = check_rows("dy_index_R", dy_index_R, num_rows, integer=True)
    x_scale_R = check_rows("x_scale_R", x_scale_R, num_rows, integer=False)
    d_in, d_out = x_RD.shape[1], dy_RH.shape[1]
    dw_EDH = torch.empty(
        (num_experts, d_in, d_out), dtype=out_dtype or x_RD.dtype, device=x_RD.device
    )
    if d_in == 0 or d_out == 0:
        return dw_EDH
    if blocks is None:
        # Square output tiles; the row loop is the reduction.
        base = default_blocks(x_RD.dtype, num_rows / num_experts)
        blocks = GemmBlocks(128, 128, base.block_k, base.num_warps, base.num_stages)
    grid = (triton.cdiv(d_in, blocks.block_m) * triton.cdiv(d_out, blocks.block_n), num_experts)
    _grouped_mm_wgrad_kernel[grid](
        x_RD,
        dy_RH,
        dw_EDH,
        offsets_E,
        offsets_E if x_index_R is None else x_index_R,  # placeholders are never read
        offsets_E if dy_index_R is None else dy_index_R,
        offsets_E if x_scale_R is None else x_scale_R,
        d_in,
        d_out,
        x_RD.stride(0),
        x_RD.stride(1),
        dy_RH.stride(0),
        dy_RH.stride(1),
        dw_EDH.stride(0),
        dw_EDH.stride(1),
        dw_EDH.stride(2),
        BLOCK_D=blocks.block_m,
        BLOCK_H=blocks.block_n,
        BLOCK_R=blocks.block_k,
        X_INDEXED=x_index_R is not None,
        DY_INDEXED=dy_index_R is not None,
        X_SCALED=x_scale_R is not None,
        INPUT_PRECISION=input_precision(x_RD.dtype),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return dw_EDH
