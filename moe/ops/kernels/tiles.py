"""What the Triton expert GEMMs share: tile sizes (`GemmBlocks`, `default_blocks`), the
map from a program to its row tile of one expert (`locate_row_tile`, `program_tile`),
the tile product with an optional gather in the A operand's load (`tile_product`,
`source_rows`), the worst-case launch grid (`launch`), the precision rule and the
argument checks.

Rows are sorted by expert; `offsets_E` is the device tensor of inclusive row offsets
(expert e owns rows [offsets_E[e - 1], offsets_E[e])), read on the device: nothing here
syncs with the host. Products accumulate in fp32.

Shape legend: R routed rows, D input width (the reduction), H output width, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
def locate_row_tile(
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
def source_rows(index_ptr, rows, mask, INDEXED: tl.constexpr):
    """The int64 rows of the source tensor that `rows` read: index[rows] when INDEXED
    (a gather folded into the load), else `rows` themselves."""
    if INDEXED:
        source = tl.load(index_ptr + rows, mask=mask, other=0).to(tl.int64)
    else:
        source = rows.to(tl.int64)
    return source


@triton.jit
def program_tile(
    offsets_ptr,
    num_experts,
    H,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
):
    """(expert, rows, row mask, column tile) of this program's [BLOCK_M, BLOCK_N] output
    tile. The 1-D grid enumerates (row tile, column tile) with the column tile fastest,
    so programs running together share the A tile and the expert's weights in L2; the
    grid is sized for the worst case (`launch`) and expert == num_experts for the
    surplus programs."""
    pid = tl.program_id(0)
    num_col_tiles = tl.cdiv(H, BLOCK_N)
    col_tile = pid % num_col_tiles
    expert, row_start, row_end = locate_row_tile(
        offsets_ptr, num_experts, pid // num_col_tiles, BLOCK_M, EXPERTS_POW2
    )
    rows = row_start + tl.arange(0, BLOCK_M)
    return expert, rows, rows < row_end, col_tile


@triton.jit
def tile_product(
    a_ptr,
    a_index_ptr,
    w_ptr,
    expert,
    rows,
    row_mask,
    cols,
    col_mask,
    D,
    stride_ar,
    stride_ad,
    stride_we,
    stride_wd,
    stride_wh,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATHER_A: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The fp32 [BLOCK_M, BLOCK_N] tile a[rows] @ w[expert][:, cols], looping over D in
    BLOCK_K steps; with GATHER_A, row r of a is a[a_index[r]] (the gather in the load)."""
    a_rows = source_rows(a_index_ptr, rows, row_mask, GATHER_A)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_ar + ks[None, :] * stride_ad
    w_ptrs = (
        w_ptr
        + expert.to(tl.int64) * stride_we
        + ks[:, None] * stride_wd
        + cols[None, :] * stride_wh
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, D, BLOCK_K):
        k_mask = (k_start + ks) < D
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ad
        w_ptrs += BLOCK_K * stride_wd
    return acc


def input_precision(dtype: torch.dtype) -> str:
    """Follow torch's fp32 matmul setting so that the kernel matches `torch.mm` on CUDA."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # Triton's default; for fp16/bf16 operands it changes nothing.


def check_offsets(offsets_E: torch.Tensor, num_experts: int, device: torch.device) -> None:
    if offsets_E.dim() != 1 or offsets_E.shape[0] != num_experts:
        raise ValueError(
            f"offsets_E has shape {tuple(offsets_E.shape)}: expected ({num_experts},), "
            "the inclusive cumulative sum of the per-expert row counts"
        )
    if offsets_E.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets_E has dtype {offsets_E.dtype}: expected torch.int32 or int64")
    if offsets_E.device != device:
        raise ValueError(f"offsets_E is on {offsets_E.device}: expected {device}, like x_RD")


def launch(
    kernel: Any,
    args: tuple[Any, ...],
    dtype: torch.dtype,
    num_rows: int,
    w_EDH: torch.Tensor,
    blocks: GemmBlocks,
    **constants: Any,
) -> None:
    """Launch a row-tile kernel over the worst-case grid: each expert adds at most one
    partial tile to the cdiv(R, BLOCK_M) full ones; surplus programs exit."""
    num_experts, d_out = w_EDH.shape[0], w_EDH.shape[2]
    max_row_tiles = triton.cdiv(num_rows, blocks.block_m) + num_experts
    grid = (max_row_tiles * triton.cdiv(d_out, blocks.block_n),)
    kernel[grid](
        *args,
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k,
        EXPERTS_POW2=triton.next_power_of_2(num_experts),
        INPUT_PRECISION=input_precision(dtype),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        **constants,
    )


def check_rows(
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
