"""CUDA implementations of the `moe::` custom ops: the Triton kernels of `moe.ops.kernels`.

`register()` attaches them to the ops of `moe.ops`, the folded ops of `moe.ops.fused`
included, for the "cuda" dispatch key; it is called on import of `moe.ops` when Triton is
installed. Float64 (which the Triton GEMMs do not take) falls back to the plain-torch path
(for the folded ops: their form composed from the unfolded ops). The adapters are plain
functions so that tests can run them on CPU tensors under `TRITON_INTERPRET=1`.

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


# --- the folded ops of moe.ops.fused: the permute inside the GEMMs (kernels.folded) ---


def _offsets(counts_E: Tensor, device: torch.device) -> Tensor:
    return counts_E.to(device).cumsum(0)


def gather_grouped_mm(
    x_TD: Tensor, w_EDH: Tensor, token_index_R: Tensor, counts_E: Tensor
) -> Tensor:
    from moe.ops import fused, kernels

    if x_TD.dtype not in TRITON_DTYPES:
        return fused.composed_gather_grouped_mm(x_TD, w_EDH, token_index_R, counts_E)
    return kernels.gather_grouped_mm(x_TD, w_EDH, token_index_R, _offsets(counts_E, x_TD.device))


def gather_grouped_mm_backward(
    dh_RH: Tensor,
    x_TD: Tensor,
    w_EDH: Tensor,
    token_index_R: Tensor,
    counts_E: Tensor,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """dx_TD by the scatter epilogue (fp32 atomics: the last bits may differ between
    runs), dw_EDH with x's rows gathered in the wgrad kernel's loads."""
    from moe.ops import fused, kernels

    if x_TD.dtype not in TRITON_DTYPES:
        return fused.composed_gather_grouped_mm_backward(
            dh_RH, x_TD, w_EDH, token_index_R, counts_E, input_grad, weight_grad
        )
    offsets_E = _offsets(counts_E, x_TD.device)
    dx_TD = dw_EDH = x_TD.new_empty(0)
    if input_grad:
        dx_TD = kernels.grouped_mm_scatter(
            dh_RH, w_EDH.transpose(1, 2), token_index_R, offsets_E, x_TD.shape[0], None, x_TD.dtype
        )
    if weight_grad:
        dw_EDH = kernels.grouped_mm_wgrad(
            x_TD, dh_RH, offsets_E, w_EDH.shape[0], w_EDH.dtype, x_index_R=token_index_R
        )
    return dx_TD, dw_EDH


def grouped_mm_combine(
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    num_tokens: int,
) -> Tensor:
    """The weights scale the products in fp32, which are added into the tokens' rows by
    fp32 atomics (the last bits may differ between runs), rounded once to h's dtype."""
    from moe.ops import fused, kernels

    if h_RH.dtype not in TRITON_DTYPES:
        return fused.composed_grouped_mm_combine(
            h_RH, w_EHD, token_index_R, weight_R, counts_E, num_tokens
        )
    offsets_E = _offsets(counts_E, h_RH.device)
    return kernels.grouped_mm_scatter(
        h_RH, w_EHD, token_index_R, offsets_E, num_tokens, weight_R, h_RH.dtype
    )


def grouped_mm_combine_backward(
    dy_TD: Tensor,
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dh_RH and dweight_R from one GEMM whose epilogue scales and dots g = dy[t] @ w^T
    (dy's rows gathered in the load); dw_EHD with dy's rows gathered and h's scaled in
    the wgrad kernel's loads."""
    from moe.ops import fused, kernels

    if h_RH.dtype not in TRITON_DTYPES:
        return fused.composed_grouped_mm_combine_backward(
            dy_TD, h_RH, w_EHD, token_index_R, weight_R, counts_E, weight_grad
        )
    dy_TD = dy_TD.to(h_RH.dtype)
    offsets_E = _offsets(counts_E, h_RH.device)
    dh_RH, dweight_R = kernels.gather_grouped_mm_scale_dot(
        dy_TD, w_EHD.transpose(1, 2), token_index_R, offsets_E, weight_R, h_RH
    )
    dw_EHD = h_RH.new_empty(0)
    if weight_grad:
        dw_EHD = kernels.grouped_mm_wgrad(
            h_RH,
            dy_TD,
            offsets_E,
            w_EHD.shape[0],
            w_EHD.dtype,
            dy_index_R=token_index_R,
            x_scale_R=weight_R,
        )
    return dh_RH, dw_EHD, dweight_R


def register() -> None:
    """Attach the adapters above to the `moe::` ops for CUDA tensors. A kernel registered
    for "cuda" replaces an op's default implementation for CUDA tensors, so the folded
    ops' composed fallback serves only the devices without one."""
    from moe.ops import cpu as ops
    from moe.ops import fused

    ops.grouped_mm.register_kernel("cuda")(grouped_mm)
    ops.grouped_mm_wgrad.register_kernel("cuda")(grouped_mm_wgrad)
    ops.gather_rows.register_kernel("cuda")(gather_rows)
    ops.scatter_add_rows.register_kernel("cuda")(scatter_add_rows)
    ops.combine.register_kernel("cuda")(combine)
    ops.combine_backward.register_kernel("cuda")(combine_backward)
    fused.gather_grouped_mm.register_kernel("cuda")(gather_grouped_mm)
    fused.gather_grouped_mm_backward.register_kernel("cuda")(gather_grouped_mm_backward)
    fused.grouped_mm_combine.register_kernel("cuda")(grouped_mm_combine)
    fused.grouped_mm_combine_backward.register_kernel("cuda")(grouped_mm_combine_backward)
