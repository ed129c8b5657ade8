"""Expert matmuls that fold the permute into themselves, registered with `torch.library`:

- `moe::gather_grouped_mm(x_TD, w_EDH, token_index_R, counts_E) -> h_RH`: row r of the
  output is x_TD[token_index_R[r]] @ w[e(r)] (rows sorted by expert, counts_E per
  expert): the row gather of the permute folded into the first expert matmul.
- `moe::grouped_mm_combine(h_RH, w_EHD, token_index_R, weight_R, counts_E, num_tokens)
  -> y_TD`: y_TD[t] = sum over the rows r of token t of weight_R[r] * h_RH[r] @ w[e(r)]:
  the weighted combine of the unpermute folded into the last expert matmul.

Why: with top-8 routing every token has eight routed rows, and the unfolded layer writes
and reads the [T*K, D] row matrix (the gathered input, the expert output, their
gradients) about ten times per step, at memory speed. Here each expert's rows are
gathered into a block that stays in cache, multiplied, and (for the combine and the input
gradient) added into a per-worker [T, D] accumulator (T*D, not T*K*D); the backward
re-gathers instead of keeping a [T*K, D] copy. The routing weights scale the H-wide
hidden rows, not the D-wide outputs, and their gradient is an H-wide dot product:
dweight[r] = <h[r], dy[t] @ w[e]^T>, a product the input gradient needs anyway.

Where each implementation lives (this module registers the ops, their fake and autograd
rules, and holds the composed form):

- CPU: `moe.ops.padded_blocks` in bf16 where the load is balanced enough (the padded
  layout: one `bmm` per matmul over equal blocks, `padded_blocks.layout`);
  otherwise `moe.ops.spans`, the block workers of `moe.ops.cpu` (single-threaded
  `torch.mm`s over spans of consecutive experts' rows, one hand-off per call; sums
  accumulate in at least fp32 and are rounded once; half precision blocks multiplied at
  the bucketed row counts of `moe.ops.row_buckets`).
- CUDA with Triton installed: `moe.ops.cuda` registers the kernels of
  `moe.ops.kernels.folded` for the "cuda" dispatch key, which replaces the
  implementations here for CUDA tensors. The row gather is folded into the GEMMs'
  operand loads, the weighted combine and the gather's input gradient into a GEMM
  epilogue that adds into an fp32 [T, D] sum with atomics (so those sums may differ in
  the last bits between runs), dweight into the epilogue of the GEMM that computes dh;
  the weight gradients read their rows through the index.
- Every other device (and float64 on CUDA): the same op composed from the unfolded ops
  of `moe.ops` (gather, grouped matmul, scatter-add) below, so the layer runs one code
  path everywhere.

Shapes: T tokens, R routed rows (sorted by expert), D model width, H expert hidden
width, E experts, M rows of one expert block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.ops import cpu, padded_blocks, spans

# --- every other device: the unfolded ops, composed ---------------------------------


def composed_gather_grouped_mm(
    x_TD: Tensor, w_EDH: Tensor, token_index_R: Tensor, counts_E: Tensor
) -> Tensor:
    """`gather_grouped_mm` as gather, then grouped matmul."""
    return cpu.grouped_mm(cpu.gather_rows(x_TD, token_index_R), w_EDH, counts_E)


def composed_gather_grouped_mm_backward(
    dh_RH: Tensor,
    x_TD: Tensor,
    w_EDH: Tensor,
    token_index_R: Tensor,
    counts_E: Tensor,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """`gather_grouped_mm_backward` from the unfolded ops."""
    dx_TD = dw_EDH = x_TD.new_empty(0)
    if input_grad:
        dx_RD = cpu.grouped_mm(dh_RH, w_EDH.transpose(1, 2), counts_E)
        dx_TD = cpu.scatter_add_rows(dx_RD, token_index_R, x_TD.shape[0])
    if weight_grad:
        dw_EDH = cpu.grouped_mm_wgrad(cpu.gather_rows(x_TD, token_index_R), dh_RH, counts_E)
    return dx_TD, dw_EDH


def composed_grouped_mm_combine(
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    num_tokens: int,
) -> Tensor:
    """`grouped_mm_combine` as scaling, grouped matmul, then scatter-add."""
    scaled_RH = h_RH * weight_R.to(h_RH.dtype).unsqueeze(1)
    y_RD = cpu.grouped_mm(scaled_RH, w_EHD, counts_E)
    return cpu.scatter_add_rows(y_RD, token_index_R, num_tokens)


def composed_grouped_mm_combine_backward(
    dy_TD: Tensor,
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """`grouped_mm_combine_backward` from the unfolded ops."""
    weight_R1 = weight_R.to(h_RH.dtype).unsqueeze(1)
    dy_RD = cpu.gather_rows(dy_TD.to(h_RH.dtype), token_index_R)
    g_RH = cpu.grouped_mm(dy_RD, w_EHD.transpose(1, 2), counts_E)
    dweight_R = (g_RH.to(weight_R.dtype) * h_RH.to(weight_R.dtype)).sum(1)
    dw_EHD = h_RH.new_empty(0)
    if weight_grad:
        dw_EHD = cpu.grouped_mm_wgrad(h_RH * weight_R1, dy_RD, counts_E)
    return g_RH * weight_R1, dw_EHD, dweight_R


# --- gather_grouped_mm -------------------------------------------------------------


@torch.library.custom_op("moe::gather_grouped_mm", mutates_args=())
def gather_grouped_mm(
    x_TD: Tensor, w_EDH: Tensor, token_index_R: Tensor, counts_E: Tensor
) -> Tensor:
    """h_RH[r] = x_TD[token_index_R[r]] @ w_EDH[expert of r] (rows sorted by expert)."""
    # The default implementation: a kernel registered for "cuda" (`moe.ops.cuda`, where
    # Triton is installed) takes CUDA tensors instead, so the composed form below serves
    # the other devices, and CUDA without Triton. Likewise in the three ops below.
    if x_TD.device.type != "cpu":
        return composed_gather_grouped_mm(x_TD, w_EDH, token_index_R, counts_E)
    blocks = padded_blocks.layout(x_TD, counts_E, token_index_R, x_TD.shape[0], w_EDH.shape[2])
    if blocks is not None:
        return padded_blocks.gather_grouped_mm(blocks, x_TD, w_EDH)
    return spans.gather_grouped_mm(x_TD, w_EDH, token_index_R, counts_E)


@gather_grouped_mm.register_fake
def _(x_TD: Tensor, w_EDH: Tensor, token_index_R: Tensor, counts_E: Tensor) -> Tensor:
    return x_TD.new_empty(token_index_R.shape[0], w_EDH.shape[2])


@torch.library.custom_op("moe::gather_grouped_mm_backward", mutates_args=())
def gather_grouped_mm_backward(
    dh_RH: Tensor,
    x_TD: Tensor,
    w_EDH: Tensor,
    token_index_R: Tensor,
    counts_E: Tensor,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(dx_TD, dw_EDH) of `gather_grouped_mm`; each an empty [0] tensor unless asked for
    (`input_grad`, `weight_grad`). dx_TD[t] = sum over t's rows of dh[r] @ w[e]^T;
    dw[e] = x_TD[rows of e]^T dh[rows of e] (zero for experts without rows)."""
    if x_TD.device.type != "cpu":
        return composed_gather_grouped_mm_backward(
            dh_RH, x_TD, w_EDH, token_index_R, counts_E, input_grad, weight_grad
        )
    blocks = padded_blocks.layout(x_TD, counts_E, token_index_R, x_TD.shape[0], w_EDH.shape[2])
    if blocks is not None:
        return padded_blocks.gather_grouped_mm_backward(
            blocks, dh_RH, x_TD, w_EDH, input_grad, weight_grad
        )
    return spans.gather_grouped_mm_backward(
        dh_RH, x_TD, w_EDH, token_index_R, counts_E, input_grad, weight_grad
    )


@gather_grouped_mm_backward.register_fake
def _(
    dh_RH: Tensor,
    x_TD: Tensor,
    w_EDH: Tensor,
    token_index_R: Tensor,
    counts_E: Tensor,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    dx_TD = x_TD.new_empty(x_TD.shape) if input_grad else x_TD.new_empty(0)
    dw_EDH = w_EDH.new_empty(w_EDH.shape) if weight_grad else x_TD.new_empty(0)
    return dx_TD, dw_EDH


def _gather_mm_setup(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor
) -> None:
    x_TD, w_EDH, token_index_R, counts_E = inputs
    ctx.save_for_backward(x_TD, w_EDH, token_index_R, counts_E)


def _gather_mm_backward(
    ctx: torch.autograd.function.FunctionCtx, dh_RH: Tensor
) -> tuple[Tensor | None, Tensor | None, None, None]:
    x_TD, w_EDH, token_index_R, counts_E = ctx.saved_tensors  # type: ignore[attr-defined]
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    dx_TD, dw_EDH = gather_grouped_mm_backward(
        dh_RH.contiguous(), x_TD, w_EDH, token_index_R, counts_E, needs[0], needs[1]
    )
    return (dx_TD if needs[0] else None), (dw_EDH if needs[1] else None), None, None


gather_grouped_mm.register_autograd(_gather_mm_backward, setup_context=_gather_mm_setup)


# --- grouped_mm_combine ------------------------------------------------------------


@torch.library.custom_op("moe::grouped_mm_combine", mutates_args=())
def grouped_mm_combine(
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    num_tokens: int,
) -> Tensor:
    """y_TD[t] = sum over rows r with token_index_R[r] = t of weight_R[r] * h_RH[r] @
    w_EHD[expert of r]; summed in at least fp32, returned in h_RH's dtype."""
    if h_RH.device.type != "cpu":
        return composed_grouped_mm_combine(
            h_RH, w_EHD, token_index_R, weight_R, counts_E, num_tokens
        )
    blocks = padded_blocks.layout(h_RH, counts_E, token_index_R, num_tokens, w_EHD.shape[1])
    if blocks is not None:
        return padded_blocks.grouped_mm_combine(blocks, h_RH, w_EHD, weight_R)
    return spans.grouped_mm_combine(h_RH, w_EHD, token_index_R, weight_R, counts_E, num_tokens)


@grouped_mm_combine.register_fake
def _(
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    num_tokens: int,
) -> Tensor:
    return h_RH.new_empty(num_tokens, w_EHD.shape[2])


@torch.library.custom_op("moe::grouped_mm_combine_backward", mutates_args=())
def grouped_mm_combine_backward(
    dy_TD: Tensor,
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dh_RH, dw_EHD, dweight_R) of `grouped_mm_combine` (dw_EHD an empty [0] tensor
    unless `weight_grad`). With g[r] = dy_TD[t(r)] @ w[e]^T: dh[r] = weight[r] * g[r],
    dweight[r] = <h[r], g[r]>, dw[e] = (weight * h)[rows of e]^T dy_TD[tokens of e]."""
    if h_RH.device.type != "cpu":
        return composed_grouped_mm_combine_backward(
            dy_TD, h_RH, w_EHD, token_index_R, weight_R, counts_E, weight_grad
        )
    blocks = padded_blocks.layout(h_RH, counts_E, token_index_R, dy_TD.shape[0], w_EHD.shape[1])
    if blocks is not None:
        return padded_blocks.grouped_mm_combine_backward(
            blocks, dy_TD, h_RH, w_EHD, weight_R, weight_grad
        )
    return spans.grouped_mm_combine_backward(
        dy_TD, h_RH, w_EHD, token_index_R, weight_R, counts_E, weight_grad
    )


@grouped_mm_combine_backward.register_fake
def _(
    dy_TD: Tensor,
    h_RH: Tensor,
    w_EHD: Tensor,
    token_index_R: Tensor,
    weight_R: Tensor,
    counts_E: Tensor,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dw_EHD = w_EHD.new_empty(w_EHD.shape) if weight_grad else h_RH.new_empty(0)
    return h_RH.new_empty(h_RH.shape), dw_EHD, weight_R.new_empty(weight_R.shape)


def _combine_mm_setup(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor
) -> None:
    h_RH, w_EHD, token_index_R, weight_R, counts_E, _num_tokens = inputs
    ctx.save_for_backward(h_RH, w_EHD, token_index_R, weight_R, counts_E)


def _combine_mm_backward(
    ctx: torch.autograd.function.FunctionCtx, dy_TD: Tensor
) -> tuple[Tensor | None, Tensor | None, None, Tensor | None, None, None]:
    h_RH, w_EHD, token_index_R, weight_R, counts_E = ctx.saved_tensors  # type: ignore[attr-defined]
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    dh_RH, dw_EHD, dweight_R = grouped_mm_combine_backward(
        dy_TD.contiguous(), h_RH, w_EHD, token_index_R, weight_R, counts_E, needs[1]
    )
    return (
        dh_RH if needs[0] else None,
        dw_EHD if needs[1] else None,
        None,
        dweight_R if needs[3] else None,
        None,
        None,
    )


grouped_mm_combine.register_autograd(_combine_mm_backward, setup_context=_combine_mm_setup)
