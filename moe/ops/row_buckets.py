"""Row counts of the half-precision CPU matmuls in `moe.ops.cpu`: a bounded set of shapes.

torch's bf16/fp16 CPU matmul (oneDNN) builds and caches a kernel for every new shape:
about 0.7 ms at [1000, 128] x [128, 128] on 1 thread, where the bf16 product itself
takes 0.2 ms (fp32's library call has no such cost). A dropless MoE layer gives every
expert a new row count every step, so every grouped matmul would pay a kernel build per
expert. A half-precision block of more than `HALF_EXACT_ROWS` rows is therefore
multiplied zero-padded to one of 8 sizes per power of two (at most 1/8 more rows): the
padding rows' products are computed and dropped, and in a weight gradient (a sum over
rows) they add exact zeros. Smaller blocks are at most `HALF_EXACT_ROWS` shapes already.
On one thread, the demo layer's expert matmuls (E=8, D=H=128, 8192 routed rows, forward
and backward, the row counts redrawn every step): bf16 1.52x faster than fp32 with the
padding, 1.17x without (docs/BENCHMARKS.md).

Shapes: M rows of one block, D its width.
"""

from __future__ import annotations

import torch
from torch import Tensor

HALF_EXACT_ROWS = 64


def bucketed_rows(rows: int, dtype: torch.dtype, device: torch.device) -> int:
    """The row count a block of `rows` is multiplied at (itself for fp32 and off CPU)."""
    if dtype not in (torch.bfloat16, torch.float16) or device.type != "cpu":
        return rows
    if rows <= HALF_EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)  # 8 sizes per power of two
    return -(-rows // step) * step


def zero_padded(rows_MD: Tensor, total: int) -> Tensor:
    """rows_MD followed by zero rows up to `total` rows (rows_MD itself when it has them)."""
    if total == rows_MD.shape[0]:
        return rows_MD
    padded = rows_MD.new_zeros(total, rows_MD.shape[1])
    padded[: rows_MD.shape[0]] = rows_MD
    return padded
