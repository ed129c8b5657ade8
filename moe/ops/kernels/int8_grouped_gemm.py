"""Triton grouped matmul with int8 weights: the CUDA path behind `moe::int8_grouped_mm`.

y_RN[rows of e] = (x_RK[rows of e] @ q_ENK[e]^T) * scale_EN[e]: per-output-channel
symmetric int8 weights (`moe.inference.quant`), float activations. Each weight tile is
loaded as int8 (a quarter of the fp32 bytes), converted to the activations' dtype in
registers (int8 values are exact in fp16, bf16 and tf32), multiplied with fp32
accumulation, and the per-channel scales are applied once to the accumulator: the weights
are never dequantized in memory.

Rows of `x_RK` are sorted by expert; `offsets_E` is the inclusive cumulative sum of the
per-expert row counts on the device (as in `moe.ops.kernels.grouped_gemm`, whose row-tile
lookup this kernel shares), so nothing syncs with the host. Inference only: no backward.

Shape legend: R routed rows, K input width, N output width, E experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.ops.kernels.tiles import (
    SUPPORTED_DTYPES,
    GemmBlocks,
    check_offsets,
    input_precision,
    locate_row_tile,
)


def default_int8_blocks(dtype: torch.dtype, rows_per_expert: float) -> GemmBlocks:
    """Tile sizes from host-known values only (no sync). Decode-sized groups (a few rows
    per expert) get the smallest row tile `tl.dot` takes, so that padding rows cost
    little; the weight tile is what the kernel mostly reads then. Untuned on hardware."""
    if rows_per_expert <= 16:
        block_m = 16
    elif rows_per_expert <= 64:
        block_m = 64
    else:
        block_m = 128
    block_k = 32 if dtype == torch.float32 else 64
    return GemmBlocks(block_m=block_m, block_n=128, block_k=block_k, num_warps=4, num_stages=3)


@triton.jit
def _int8_grouped_mm_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    y_ptr,
    offsets_ptr,
    num_experts,
    K,
    N,
    stride_xr,
    stride_xk,
    stride_qe,
    stride_qn,
    stride_qk,
    stride_se,
    stride_sn,
    stride_yr,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y = (x_e @ q[e]^T) * scale[e], over K in BLOCK_K steps.

    The grid is laid out as in `_grouped_mm_kernel` (row tiles x column tiles, column tile
    fastest, sized for the worst case; surplus programs exit).
    """
    pid = tl.program_id(0)
    num_col_tiles = tl.cdiv(N, BLOCK_N)
    tile = pid // num_col_tiles
    col_tile = pid % num_col_tiles
    expert, row_start, row_end = locate_row_tile(
        offsets_ptr, num_experts, tile, BLOCK_M, EXPERTS_POW2
    )
    if expert >= num_experts:
        return

    rows = row_start + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < row_end
    col_mask = cols < N
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xr + ks[None, :] * stride_xk
    # The [BLOCK_K, BLOCK_N] tile of q[e]^T, read from q's [N, K] layout.
    q_ptrs = (
        q_ptr
        + expert.to(tl.int64) * stride_qe
        + ks[:, None] * stride_qk
        + cols[None, :] * stride_qn
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_mask = (k_start + ks) < K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0)
        acc = tl.dot(x, q.to(x_ptr.dtype.element_ty), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K * stride_qk

    scale_ptrs = scale_ptr + expert.to(tl.int64) * stride_se + cols * stride_sn
    scale = tl.load(scale_ptrs, mask=col_mask, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yr + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def int8_grouped_mm(
    x_RK: torch.Tensor,
    q_ENK: torch.Tensor,
    scale_EN: torch.Tensor,
    offsets_E: torch.Tensor,
    blocks: GemmBlocks | None = None,
) -> torch.Tensor:
    """y_RN[rows of e] = (x_RK[rows of e] @ q_ENK[e]^T) * scale_EN[e] for every expert e.

    Args:
        x_RK: [R, K] float (fp32, fp16 or bf16) rows sorted by expert; any strides.
        q_ENK: [E, N, K] int8 weights ([out, in] per expert); any strides.
        scale_EN: [E, N] per-output-channel scales (any float dtype; used as fp32).
        offsets_E: [E] int32/int64 inclusive cumsum of the row counts, on x's device;
            offsets_E[-1] must be <= R (rows past it are left uninitialised in y).
        blocks: tile sizes; default from `default_int8_blocks`.

    Returns:
        y_RN: a new contiguous [R, N] tensor of x's dtype.
    """
    if x_RK.dim() != 2 or q_ENK.dim() != 3 or x_RK.shape[1] != q_ENK.shape[2]:
        raise ValueError(
            f"int8_grouped_mm: x_RK {tuple(x_RK.shape)} and q_ENK {tuple(q_ENK.shape)} "
            "must be [R, K] and [E, N, K] with the same K"
        )
    if x_RK.dtype not in SUPPORTED_DTYPES or q_ENK.dtype != torch.int8:
        raise ValueError(
            f"int8_grouped_mm: dtypes x={x_RK.dtype}, q={q_ENK.dtype}: expected x among "
            f"{SUPPORTED_DTYPES} and q torch.int8"
        )
    if scale_EN.shape != q_ENK.shape[:2] or not scale_EN.is_floating_point():
        raise ValueError(
            f"int8_grouped_mm: scale_EN has shape {tuple(scale_EN.shape)} and dtype "
            f"{scale_EN.dtype}: expected float {tuple(q_ENK.shape[:2])}"
        )
    num_rows, d_in = x_RK.shape
    num_experts, d_out, _ = q_ENK.shape
    if num_experts < 1:
        raise ValueError(f"int8_grouped_mm: q_ENK has {num_experts} experts: expected >= 1")
    check_offsets(offsets_E, num_experts, x_RK.device)
    y_RN = torch.empty((num_rows, d_out), dtype=x_RK.dtype, device=x_RK.device)
    if num_rows == 0 or d_out == 0:
        return y_RN
    if d_in == 0:
        return y_RN.zero_()
    if blocks is None:
        blocks = default_int8_blocks(x_RK.dtype, num_rows / num_experts)
    # Each expert adds at most one partial tile to the cdiv(R, BLOCK_M) full ones.
    max_row_tiles = triton.cdiv(num_rows, blocks.block_m) + num_experts
    grid = (max_row_tiles * triton.cdiv(d_out, blocks.block_n),)
    _int8_grouped_mm_kernel[grid](
        x_RK,
        q_ENK,
        scale_EN,
        y_RN,
        offsets_E,
        num_experts,
        d_in,
        d_out,
        x_RK.stride(0),
        x_RK.stride(1),
        q_ENK.stride(0),
        q_ENK.stride(1),
        q_ENK.stride(2),
        scale_EN.stride(0),
        scale_EN.stride(1),
        y_RN.stride(0),
        y_RN.stride(1),
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k,
        EXPERTS_POW2=triton.next_power_of_2(num_experts),
        INPUT_PRECISION=input_precision(x_RK.dtype),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return y_RN
