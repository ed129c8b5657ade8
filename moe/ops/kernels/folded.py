"""Triton expert GEMMs with the MoE permute folded in: the CUDA kernels of the folded ops
of `moe.ops.fused` (registered for CUDA tensors by `moe.ops.cuda`).

- `gather_grouped_mm(x_TD, w_EDH, token_index_R, offsets_E) -> h_RH`: row r of the A
  operand is x_TD[token_index_R[r]], loaded through the index inside the kernel; no
  [R, D] gathered copy is built.
- `grouped_mm_scatter(x_RD, w_EDH, token_index_R, offsets_E, num_tokens, weight_R)
  -> y_TH`: an epilogue that multiplies output row r by weight_R[r] and adds it into row
  token_index_R[r] of an fp32 [T, H] accumulator: the combine of the unpermute (and the
  input gradient of the gather) folded into the GEMM.
- `gather_grouped_mm_scale_dot(dy_TD, w_EDH, token_index_R, offsets_E, weight_R, h_RH)
  -> (dh_RH, dweight_R)`: the backward of the combine; g[r] = dy_TD[token_index_R[r]] @
  w[e] is scaled and dotted with h[r] in the epilogue and never stored.
- Weight gradients with gathered or scaled rows: the `x_index_R`, `dy_index_R` and
  `x_scale_R` arguments of `moe.ops.kernels.grouped_gemm.grouped_mm_wgrad`.

Rows are sorted by expert and `offsets_E` is the device tensor of inclusive row offsets,
as in `moe.ops.kernels.grouped_gemm`, whose row-tile map, tile sizes and precision rule
these kernels share; nothing syncs with the host. Products accumulate in fp32.

Determinism: `grouped_mm_scatter` adds with fp32 `tl.atomic_add` from every program whose
tile holds a row of the token, in an order that is not fixed, so on a GPU its results may
differ in the last bits between runs. The other kernels write each output element once
(the dot products' per-column-tile partial sums are added by one `torch.sum`).

Shape legend: T tokens, R routed rows (sorted by expert), D input width (the reduction),
H output width, E experts, C column tiles of H.

Plain functions on tensors with no autograd: the custom ops in `moe.ops.fused` own it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.ops.kernels.grouped_gemm import _grouped_mm_kernel
from moe.ops.kernels.tiles import (
    SUPPORTED_DTYPES,
    GemmBlocks,
    check_offsets,
    check_rows,
    default_blocks,
    launch,
    program_tile,
    tile_product,
)


@triton.jit
def _grouped_mm_scatter_kernel(
    x_ptr,
    w_ptr,
    index_ptr,
    weight_ptr,
    out_ptr,
    offsets_ptr,
    num_experts,
    D,
    H,
    stride_xr,
    stride_xd,
    stride_we,
    stride_wd,
    stride_wh,
    stride_ot,
    stride_oh,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One tile of out[index[r]] += weight[r] * (x[r] @ w[e]), fp32 atomics into out."""
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
        BLOCK_M, BLOCK_N, BLOCK_K, False, INPUT_PRECISION,
    )  # fmt: skip
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
    tokens = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + cols[None, :] * stride_oh
    # Relaxed: nothing reads the sums before the kernel ends.
    tl.atomic_add(out_ptrs, acc, mask=row_mask[:, None] & col_mask[None, :], sem="relaxed")


@triton.jit
def _gather_grouped_mm_scale_dot_kernel(
    dy_ptr,
    index_ptr,
    w_ptr,
    weight_ptr,
    h_ptr,
    dh_ptr,
    dot_ptr,
    offsets_ptr,
    num_experts,
    D,
    H,
    stride_dyt,
    stride_dyd,
    stride_we,
    stride_wd,
    stride_wh,
    stride_hr,
    stride_hh,
    stride_dhr,
    stride_dhh,
    stride_dotr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One tile of g = dy[index[r]] @ w[e]: dh[r] = weight[r] * g[r] for the tile's
    columns, and dot[r, column tile] = the tile's part of <g[r], h[r]>."""
    expert, rows, row_mask, col_tile = program_tile(
        offsets_ptr, num_experts, H, BLOCK_M, BLOCK_N, EXPERTS_POW2
    )
    if expert >= num_experts:
        return
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    g = tile_product(
        dy_ptr, index_ptr, w_ptr, expert, rows, row_mask, cols, col_mask, D,
        stride_dyt, stride_dyd, stride_we, stride_wd, stride_wh,
        BLOCK_M, BLOCK_N, BLOCK_K, True, INPUT_PRECISION,
    )  # fmt: skip
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    h = tl.load(
        h_ptr + rows64[:, None] * stride_hr + cols[None, :] * stride_hh, mask=mask, other=0.0
    ).to(tl.float32)
    weight = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    dh_ptrs = dh_ptr + rows64[:, None] * stride_dhr + cols[None, :] * stride_dhh
    tl.store(dh_ptrs, (g * weight[:, None]).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dot_ptr + rows64 * stride_dotr + col_tile, tl.sum(g * h, axis=1), mask=row_mask)


def _check_operands(
    name: str, a_XD: torch.Tensor, w_EDH: torch.Tensor, offsets_E: torch.Tensor
) -> None:
    if a_XD.dim() != 2 or w_EDH.dim() != 3 or a_XD.shape[1] != w_EDH.shape[1]:
        raise ValueError(
            f"{name}: operands {tuple(a_XD.shape)} and w_EDH {tuple(w_EDH.shape)} must be "
            "[rows, D] and [E, D, H] with the same D"
        )
    if a_XD.dtype not in SUPPORTED_DTYPES or w_EDH.dtype != a_XD.dtype:
        raise ValueError(
            f"{name}: dtypes {a_XD.dtype} and w={w_EDH.dtype}: expected one shared dtype "
            f"among {SUPPORTED_DTYPES}"
        )
    if w_EDH.shape[0] < 1:
        raise ValueError(f"{name}: w_EDH has {w_EDH.shape[0]} experts: expected >= 1")
    check_offsets(offsets_E, w_EDH.shape[0], a_XD.device)


def _sizes(w_EDH: torch.Tensor) -> tuple[int, int, int]:
    """(num_experts, D, H): the kernels' size arguments."""
    return w_EDH.shape[0], w_EDH.shape[1], w_EDH.shape[2]


def gather_grouped_mm(
    x_TD: torch.Tensor,
    w_EDH: torch.Tensor,
    token_index_R: torch.Tensor,
    offsets_E: torch.Tensor,
    blocks: GemmBlocks | None = None,
) -> torch.Tensor:
    """h_RH[r] = x_TD[token_index_R[r]] @ w_EDH[e] for the rows r of each expert e.

    Args:
        x_TD: [T, D], any strides.
        w_EDH: [E, D, H], x's dtype, any strides (a `w_EHD.transpose(1, 2)` view works).
        token_index_R: [R] int32/int64 token of each row, in [0, T) (not checked on the
            device).
        offsets_E: [E] int32/int64 inclusive cumsum of the row counts, on x's device;
            offsets_E[-1] must be <= R (rows past it are left uninitialised).
        blocks: tile sizes; default from `default_blocks`.

    Returns:
        h_RH: a new contiguous [R, H] tensor of x's dtype.
    """
    _check_operands("gather_grouped_mm", x_TD, w_EDH, offsets_E)
    num_rows = token_index_R.shape[0]
    index_R = check_rows("token_index_R", token_index_R, num_rows, integer=True)
    h_RH = torch.empty((num_rows, w_EDH.shape[2]), dtype=x_TD.dtype, device=x_TD.device)
    if num_rows == 0 or w_EDH.shape[2] == 0:
        return h_RH
    blocks = blocks or default_blocks(x_TD.dtype, num_rows / w_EDH.shape[0])
    pointers = (x_TD, index_R, w_EDH, h_RH, offsets_E)
    strides = (*x_TD.stride(), *w_EDH.stride(), *h_RH.stride())
    args = (*pointers, *_sizes(w_EDH), *strides)
    launch(_grouped_mm_kernel, args, x_TD.dtype, num_rows, w_EDH, blocks, GATHER_A=True)
    return h_RH


def grouped_mm_scatter(
    x_RD: torch.Tensor,
    w_EDH: torch.Tensor,
    token_index_R: torch.Tensor,
    offsets_E: torch.Tensor,
    num_tokens: int,
    weight_R: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    blocks: GemmBlocks | None = None,
) -> torch.Tensor:
    """y_TH[t] = sum over the rows r with token_index_R[r] == t of weight_R[r] * x_RD[r] @
    w_EDH[e(r)] (unit weights when `weight_R` is None); zeros for tokens without rows.

    Each product row is scaled in fp32 and added with `tl.atomic_add` into an fp32
    [T, H] accumulator, which is rounded to `out_dtype` (default: x's dtype) once at the
    end. The order of the additions is not fixed: on a GPU, results may differ in the
    last bits between runs.

    Args:
        x_RD: [R, D] rows sorted by expert, any strides.
        w_EDH: [E, D, H], x's dtype, any strides.
        token_index_R: [R] int32/int64 token of each row, in [0, num_tokens).
        offsets_E: [E] int32/int64 inclusive cumsum of the row counts (rows past
            offsets_E[-1] add nothing).
        weight_R: optional [R] float weights of the rows.

    Returns:
        y_TH: a new contiguous [num_tokens, H] tensor.
    """
    _check_operands("grouped_mm_scatter", x_RD, w_EDH, offsets_E)
    num_rows = x_RD.shape[0]
    index_R = check_rows("token_index_R", token_index_R, num_rows, integer=True)
    weight_R = check_rows("weight_R", weight_R, num_rows, integer=False)
    sums_TH = torch.zeros((num_tokens, w_EDH.shape[2]), dtype=torch.float32, device=x_RD.device)
    if num_rows > 0 and w_EDH.shape[2] > 0:
        blocks = blocks or default_blocks(x_RD.dtype, num_rows / w_EDH.shape[0])
        weights = index_R if weight_R is None else weight_R  # a never-read placeholder
        pointers = (x_RD, w_EDH, index_R, weights, sums_TH, offsets_E)
        strides = (*x_RD.stride(), *w_EDH.stride(), *sums_TH.stride())
        launch(
            _grouped_mm_scatter_kernel,
            (*pointers, *_sizes(w_EDH), *strides),
            x_RD.dtype,
            num_rows,
            w_EDH,
            blocks,
            HAS_WEIGHT=weight_R is not None,
        )
    return sums_TH.to(out_dtype or x_RD.dtype)


def gather_grouped_mm_scale_dot(
    dy_TD: torch.Tensor,
    w_EDH: torch.Tensor,
    token_index_R: torch.Tensor,
    offsets_E: torch.Tensor,
    weight_R: torch.Tensor,
    h_RH: torch.Tensor,
    blocks: GemmBlocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """With g[r] = dy_TD[token_index_R[r]] @ w_EDH[e(r)] (fp32, never stored):
    dh_RH[r] = weight_R[r] * g[r] and dweight_R[r] = <g[r], h_RH[r]> (summed in fp32).

    The backward of `grouped_mm_scatter` with weights, given its input h_RH: dy's rows
    gathered in the load, w_EDH the transpose of the forward's weights.

    Args:
        dy_TD: [T, D], any strides. w_EDH: [E, D, H], dy's dtype, any strides.
        token_index_R, offsets_E: as in `gather_grouped_mm` (rows past offsets_E[-1]:
            dh uninitialised, dweight 0).
        weight_R: [R] float weights. h_RH: [R, H] float, any strides.

    Returns:
        dh_RH: a new contiguous [R, H] tensor of h's dtype; dweight_R: [R] of weight's
        dtype.
    """
    _check_operands("gather_grouped_mm_scale_dot", dy_TD, w_EDH, offsets_E)
    num_rows, d_out = token_index_R.shape[0], w_EDH.shape[2]
    index_R = check_rows("token_index_R", token_index_R, num_rows, integer=True)
    weights_R = check_rows("weight_R", weight_R, num_rows, integer=False)
    if h_RH.shape != (num_rows, d_out) or not h_RH.is_floating_point():
        raise ValueError(
            f"gather_grouped_mm_scale_dot: h_RH {tuple(h_RH.shape)} {h_RH.dtype}: "
            f"expected float ({num_rows}, {d_out})"
        )
    dh_RH = torch.empty((num_rows, d_out), dtype=h_RH.dtype, device=h_RH.device)
    blocks = blocks or default_blocks(dy_TD.dtype, num_rows / w_EDH.shape[0])
    dot_RC = torch.zeros(
        (num_rows, triton.cdiv(d_out, blocks.block_n)), dtype=torch.float32, device=dy_TD.device
    )
    if num_rows > 0 and d_out > 0:
        pointers = (dy_TD, index_R, w_EDH, weights_R, h_RH, dh_RH, dot_RC, offsets_E)
        strides = (*dy_TD.stride(), *w_EDH.stride(), *h_RH.stride(), *dh_RH.stride())
        launch(
            _gather_grouped_mm_scale_dot_kernel,
            (*pointers, *_sizes(w_EDH), *strides, dot_RC.stride(0)),
            dy_TD.dtype,
            num_rows,
            w_EDH,
            blocks,
        )
    return dh_RH, dot_RC.sum(1).to(weight_R.dtype)
