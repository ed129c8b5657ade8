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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class GemmBlocks:
    """Tile sizes and launch options of one GEMM launch (all block sizes powers of 2, >= 16)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"GemmBlocks.{name}={value}: expected a power of 2 >= 16")


def default_blocks(dtype: torch.dtype, rows_per_expert: float) -> GemmBlocks:
    """Tile sizes for a GPU launch, chosen from host-known values only (no sync).

    `rows_per_expert` is the mean count R / E; small groups get a shorter row tile so
    that the padding of each expert's last tile wastes less work.
    """
    block_m = 64 if rows_per_expert <= 64 else 128
    block_k = 32 if dtype == torch.float32 else 64
    return GemmBlocks(block_m=block_m, block_n=128, block_k=block_k, num_warps=8, num_stages=3)


@triton.jit
def _locate_row_tile(
    offsets_ptr,
    num_experts,
    tile,
    BLOCK_M: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
):
    """Map a global row-tile index to (expert, first row of the tile, end row of the expert).

    Each expert's rows are cut into ceil(count / BLOCK_M) tiles, numbered expert after
    expert. The whole offsets vector is loaded (E is small) and the expert found by a
    cumulative sum, so no tile map has to be built on the host. A tile index past the
    last tile returns expert == num_experts.
    """
    experts = tl.arange(0, EXPERTS_POW2)
    in_range = experts < num_experts
    row_end_E = tl.load(offsets_ptr + experts, mask=in_range, other=0).to(tl.int32)
    row_start_E = tl.load(offsets_ptr + experts - 1, mask=in_range & (experts > 0), other=0)
    row_start_E = row_start_E.to(tl.int32)
    tiles_E = tl.where(in_range, tl.cdiv(row_end_E - row_start_E, BLOCK_M), 0)
    tile_end_E = tl.cumsum(tiles_E, axis=0)
    # The expert of `tile` is the number of experts whose tiles all come before it.
    expert = tl.sum((tile_end_E <= tile).to(tl.int32), axis=0)
    is_expert = experts == expert
    first_tile = tl.sum(tl.where(is_expert, tile_end_E - tiles_E, 0), axis=0)
    expert_row_start = tl.sum(tl.where(is_expert, row_start_E, 0), axis=0)
    expert_row_end = tl.sum(tl.where(is_expert, row_end_E, 0), axis=0)
    tile_row_start = expert_row_start + (tile - first_tile) * BLOCK_M
    return expert, tile_row_start, expert_row_end


@triton.jit
def _grouped_mm_kernel(
    x_ptr,
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
    INPUT_PRECISION: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y = x_e @ w[e], looping over D in BLOCK_K steps.

    The 1-D grid enumerates (row tile, column tile) with the column tile fastest, so
    programs running together share the x tile and the expert's weights in L2. The grid
    is sized for the worst case (cdiv(R, BLOCK_M) + E row tiles); surplus programs exit.
    """
    pid = tl.program_id(0)
    num_col_tiles = tl.cdiv(H, BLOCK_N)
    tile = pid // num_col_tiles
    col_tile = pid % num_col_tiles
    expert, row_start, row_end = _locate_row_tile(
        offsets_ptr, num_experts, tile, BLOCK_M, EXPERTS_POW2
    )
    if expert >= num_experts:
        return

    rows = row_start + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < row_end
    col_mask = cols < H
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xr + ks[None, :] * stride_xd
    w_ptrs = (
        w_ptr
        + expert.to(tl.int64) * stride_we
        + ks[:, None] * stride_wd
        + cols[None, :] * stride_wh
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, D, BLOCK_K):
        k_mask = (k_start + ks) < D
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd

    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yr + cols[None, :] * stride_yh
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _source_rows(index_ptr, rows, mask, INDEXED: tl.constexpr):
    """The int64 rows of the source tensor that `rows` read: index[rows] when INDEXED
    (a gather folded into the load), else `rows` themselves."""
    if INDEXED:
        source = tl.load(index_ptr + rows, mask=mask, other=0).to(tl.int64)
    else:
        source = rows.to(tl.int64)
    return source


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
        x_rows = _source_rows(x_index_ptr, rows, r_mask, X_INDEXED)
        dy_rows = _source_rows(dy_index_ptr, rows, r_mask, DY_INDEXED)
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


def _input_precision(dtype: torch.dtype) -> str:
    """Follow torch's fp32 matmul setting so that the kernel matches `torch.mm` on CUDA."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # Triton's default; for fp16/bf16 operands it changes nothing.


def _check_offsets(offsets_E: torch.Tensor, num_experts: int, device: torch.device) -> None:
    if offsets_E.dim() != 1 or offsets_E.shape[0] != num_experts:
        raise ValueError(
            f"offsets_E has shape {tuple(offsets_E.shape)}: expected ({num_experts},), "
            "the inclusive cumulative sum of the per-expert row counts"
        )
    if offsets_E.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets_E has dtype {offsets_E.dtype}: expected torch.int32 or int64")
    if offsets_E.device != device:
        raise ValueError(f"offsets_E is on {offsets_E.device}: expected {device}, like x_RD")


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
    if x_RD.dtype not in _SUPPORTED_DTYPES or w_EDH.dtype != x_RD.dtype:
        raise ValueError(
            f"grouped_mm: dtypes x={x_RD.dtype}, w={w_EDH.dtype}: expected one shared dtype "
            f"among {_SUPPORTED_DTYPES}"
        )
    num_rows, d_in = x_RD.shape
    num_experts, _, d_out = w_EDH.shape
    if num_experts < 1:
        raise ValueError(f"grouped_mm: w_EDH has {num_experts} experts: expected >= 1")
    _check_offsets(offsets_E, num_experts, x_RD.device)
    y_RH = torch.empty((num_rows, d_out), dtype=x_RD.dtype, device=x_RD.device)
    if num_rows == 0 or d_out == 0:
        return y_RH
    if d_in == 0:
        return y_RH.zero_()
    if blocks is None:
        blocks = default_blocks(x_RD.dtype, num_rows / num_experts)
    # Each expert adds at most one partial tile to the cdiv(R, BLOCK_M) full ones.
    max_row_tiles = triton.cdiv(num_rows, blocks.block_m) + num_experts
    grid = (max_row_tiles * triton.cdiv(d_out, blocks.block_n),)
    _grouped_mm_kernel[grid](
        x_RD,
        w_EDH,
        y_RH,
        offsets_E,
        num_experts,
        d_in,
        d_out,
        x_RD.stride(0),
        x_RD.stride(1),
        w_EDH.stride(0),
        w_EDH.stride(1),
        w_EDH.stride(2),
        y_RH.stride(0),
        y_RH.stride(1),
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k,
        EXPERTS_POW2=triton.next_power_of_2(num_experts),
        INPUT_PRECISION=_input_precision(x_RD.dtype),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return y_RH


def _check_rows(
    name: str, rows_R: torch.Tensor | None, num_rows: int, integer: bool
) -> torch.Tensor | None:
    """An optional per-row [R] tensor (row indices if `integer`, else row scales), made
    contiguous (the kernels read it at unit stride)."""
    if rows_R is None:
        return None
    dtype_ok = rows_R.dtype in (torch.int32, torch.int64) if integer else rows_R.is_floating_point()
    if rows_R.dim() != 1 or rows_R.shape[0] != num_rows or not dtype_ok:
        kind = "int32/int64" if integer else "float"
        raise ValueError(
            f"{name}: shape {tuple(rows_R.shape)}, dtype {rows_R.dtype}: "
            f"expected ({num_rows},) {kind}"
        )
    return rows_R.contiguous()


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
    if x_RD.dtype not in _SUPPORTED_DTYPES or dy_RH.dtype != x_RD.dtype:
        raise ValueError(
            f"grouped_mm_wgrad: dtypes x={x_RD.dtype}, dy={dy_RH.dtype}: expected one shared "
            f"dtype among {_SUPPORTED_DTYPES}"
        )
    if num_experts < 1:
        raise ValueError(f"grouped_mm_wgrad: num_experts={num_experts}: expected >= 1")
    _check_offsets(offsets_E, num_experts, x_RD.device)
    x_index_R = _check_rows("x_index_R", x_index_R, num_rows, integer=True)
    dy_index_R = _check_rows("dy_index_R", dy_index_R, num_rows, integer=True)
    x_scale_R = _check_rows("x_scale_R", x_scale_R, num_rows, integer=False)
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
        INPUT_PRECISION=_input_precision(x_RD.dtype),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return dw_EDH
