"""Regrouping of row chunks: the local shuffles around an all-to-all.

A buffer of rows is often a grid of chunks: `counts_AB[a, b]` rows for every (a, b),
laid out a-major (all chunks of a = 0 first). Expert parallelism and the hierarchical
all-to-all both need the same buffer b-major. `transpose_chunks_index` gives the row
index that does it in one gather (vectorised, no host loop over chunks), and
`transpose_chunks` applies it (or, for few chunks, slices and concatenates). The inverse of a transpose with `counts_AB` is a
transpose with `counts_AB.T`.

Legend: A, B the two chunk axes; R rows (R = counts_AB.sum()); D the row width.
"""

from __future__ import annotations

import torch


def transpose_chunks_index(counts_AB: torch.Tensor, total_rows: int | None = None) -> torch.Tensor:
    """Row index `idx_R` such that `x_RD[idx_R]` is `x_RD` regrouped from a-major to b-major.

    counts_AB: int64 [A, B], rows per chunk of the a-major input.
    total_rows: counts_AB.sum() when the caller knows it (saves a device-to-host sync).
    """
    if counts_AB.dim() != 2:
        raise ValueError(f"counts_AB must be 2-D [A, B], got shape {tuple(counts_AB.shape)}")
    counts_AB = counts_AB.to(torch.int64)
    if total_rows is None:
        total_rows = int(counts_AB.sum())
    elif counts_AB.device.type == "cpu" and int(counts_AB.sum()) != total_rows:
        raise ValueError(f"counts_AB sums to {int(counts_AB.sum())}, expected {total_rows} rows")
    start_AB = (torch.cumsum(counts_AB.reshape(-1), 0) - counts_AB.reshape(-1)).view_as(counts_AB)
    counts_BA = counts_AB.t().reshape(-1)
    start_BA = start_AB.t().reshape(-1)
    out_start_BA = torch.cumsum(counts_BA, 0) - counts_BA
    # Row i of the output lies in chunk c; its source is start[c] + (i - out_start[c]).
    shift = torch.repeat_interleave(start_BA - out_start_BA, counts_BA, output_size=total_rows)
    return torch.arange(total_rows, device=counts_AB.device) + shift


def transpose_chunks(
    x_RD: torch.Tensor,
    counts_AB: torch.Tensor,
    total_rows: int | None = None,
    *,
    max_cat_chunks: int = 1024,
) -> torch.Tensor:
    """`x_RD` regrouped from a-major to b-major chunks (differentiable).

    Up to `max_cat_chunks` chunks it slices and concatenates (contiguous copies: fast on
    CPU, one kernel on CUDA); beyond that it gathers rows with `transpose_chunks_index`
    (no per-chunk host work). Both move the same rows, bit for bit.
    """
    if total_rows is None:
        total_rows = x_RD.shape[0]
    if x_RD.shape[0] != total_rows:
        raise ValueError(f"x_RD has {x_RD.shape[0]} rows but total_rows={total_rows}")
    if counts_AB.numel() <= max_cat_chunks and counts_AB.device.type == "cpu":
        if int(counts_AB.sum()) != total_rows:
            raise ValueError(f"counts_AB sums to {int(counts_AB.sum())}, expected {total_rows}")
        a_size, b_size = counts_AB.shape
        pieces = torch.split(x_RD, counts_AB.reshape(-1).tolist())
        return torch.cat([pieces[a * b_size + b] for b in range(b_size) for a in range(a_size)])
    index = transpose_chunks_index(counts_AB.to(x_RD.device), total_rows)
    return x_RD.index_select(0, index)
