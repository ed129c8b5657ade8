"""CUDA implementations of the `moe::` custom ops: the Triton kernels of `moe.ops.kernels`.

`register()` attaches them to the ops of `moe.ops` for the "cuda" dispatch key; it is
called on import of `moe.ops` when Triton is installed. Float64 (which the Triton GEMMs
do not take) falls back to the plain-torch path. The adapters are plain functions so that
tests can run them on CPU tensors under `TRITON_INTERPRET=1`.

Shapes: T tokens, K slots per token, R routed rows, D input width, H output width,
E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def padding_rows(counts_E: Tensor, filled_E: Tensor, num_rows: int) -> Tensor:
    """[R] bool: the rows past filled_E[e] in block e (on the device, no host sync)."""
    device = filled_E.device
    counts_E = counts_E.to(device)
    expert_R = torch.repeat_interleave(
        torch.arange(counts_E.shape[0], device=device), counts_E, output_size=num_rows
    )
    start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_R = torch.arange(num_rows, device=device) - start_E[expert_R]
    return rank_R >= filled_E[expert_R]


def grouped_mm(
    x_RD: Tensor, w_EDH: Tensor, counts_E: Tensor, filled_E: Tensor | None = None
) -> Tensor:
    """The kernel multiplies padding rows too (a GPU gains little from skipping them);
    their outputs are then zeroed, as the op promises."""
    from moe.ops import cpu as ops
    from moe.ops import kernels

    if x_RD.dtype not in TRITON_DTYPES:
        return ops.grouped_mm_torch(x_RD, w_EDH, counts_E, filled_E)
    y_RH = kernels.grouped_mm(x_RD, w_EDH, counts_E.to(x_RD.device).cumsum(0))
    if filled_E is not None:
        y_RH.masked_fill_(padding_rows(counts_E, filled_E, x_RD.shape[0]).unsqueeze(1), 0)
    return y_RH


def grouped_mm_wgrad(
    x_RD: Tensor, dy_RH: Tensor, counts_E: Tensor, filled_E: Tensor | None = None
) -> Tensor:
    from moe.ops import cpu as ops
    from moe.ops import kernels

    if x_RD.dtype not in TRITON_DTYPES:
        return ops.grouped_mm_wgrad_torch(x_RD, dy_RH, counts_E, filled_E)
    if filled_E is not None:  # padding rows add nothing
        dy_RH = dy_RH.masked_fill(padding_rows(counts_E, filled_E, x_RD.shape[0]).unsqueeze(1), 0)
    offsets_E = counts_E.to(x_RD.device).cumsum(0)
    return kernels.grouped_mm_wgrad(x_RD, dy_RH, offsets_E, counts_E.shape[0])


def gather_rows(x_TD: Tensor, index_R: Tensor) -> Tensor:
    from moe.ops import kernels

    return kernels.gather_rows(x_TD, index_R)


def scatter_add_rows(dy_RD: Tensor, index_R: Tensor, num_rows: int) -> Tensor:
    from moe.ops import kernels

    return kernels.gather_rows_backward(dy_RD, index_R, num_rows)


def combine(y_RD: Tensor, row_of_slot_TK: Tensor, weights_TK: Tensor) -> Tensor:
    from moe.ops import kernels

    return kernels.combine(y_RD, row_of_slot_TK, weights_TK)


def combine_backward(
    dy_TD: Tensor, y_RD: Tensor, row_of_slot_TK: Tensor, weights_TK: Tensor
) -> tuple[Tensor, Tensor]:
    from moe.ops import kernels

    dy_RD, dweights_TK = kernels.combine_backward(dy_TD, y_RD, row_of_slot_TK, weights_TK)
    return dy_RD, dweights_TK


def register() -> None:
    """Attach the adapters above to the `moe::` ops for CUDA tensors."""
    from moe.ops import cpu as ops

    ops.grouped_mm.register_kernel("cuda")(grouped_mm)
    ops.grouped_mm_wgrad.register_kernel("cuda")(grouped_mm_wgrad)
    ops.gather_rows.register_kernel("cuda")(gather_rows)
    ops.scatter_add_rows.register_kernel("cuda")(scatter_add_rows)
    ops.combine.register_kernel("cuda")(combine)
    ops.combine_backward.register_kernel("cuda")(combine_backward)
