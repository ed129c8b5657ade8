"""Int8 weight-only experts: per-output-channel symmetric int8 weights, float activations.

Quantization (docs/METHODS.md, "Int8 weight-only quantization"): for a weight w_KN (K inputs,
N outputs) each output channel n gets scale_N[n] = max_k |w[k, n]| / 127 (fp32) and
q_NK[n, k] = round(w[k, n] / scale[n]) in [-127, 127], stored [out, in] as
`torch.ops.aten._weight_int8pack_mm` wants. The fast paths compute y = x @ w as
(x @ q^T) * scale: the scale multiplies the output, not a dequantized weight.

`Int8Experts` stores every projection stacked over its experts (`w1_q_EHD` [E, H, D] int8,
`w1_scale_EH` [E, H] fp32, `w2_q_EDH`, `w2_scale_ED`, and `w3_*` for SwiGLU) as buffers,
so that checkpoints save one file per expert. It is for inference: no gradients.

The matmul is the custom op `moe::int8_grouped_mm` of `moe.ops.int8` (its CPU
methods, their measured thresholds and the shapes each kernel is trusted with are
documented there).

Shapes: R routed rows, D model width, H expert hidden width, E experts (local), K input
width and N output width of one projection, M rows of one expert.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe.experts import (
    Activation,
    Experts,
    GroupedExperts,
    apply_activation,
    check_expert_ids,
    parse_activation,
)
from moe.ops.int8 import CpuInt8Method, int8_grouped_mm, parse_cpu_method

QMAX = 127


def quantize_weight(w_KN: Tensor) -> tuple[Tensor, Tensor]:
    """w_KN [..., K, N] float -> (q_NK [..., N, K] int8, scale_N [..., N] fp32).

    Per output channel n: scale = max_k |w[k, n]| / 127 and q = round(w / scale), so
    |w - q * scale| <= scale / 2. An all-zero channel gets scale 0 and q 0.
    """
    if w_KN.dim() < 2 or not w_KN.is_floating_point():
        raise ValueError(
            f"quantize_weight: w has shape {tuple(w_KN.shape)} and dtype {w_KN.dtype}; "
            "expected a float tensor [..., K, N]"
        )
    w_NK = w_KN.detach().transpose(-1, -2).to(torch.float32)
    scale_N = w_NK.abs().amax(dim=-1) / QMAX
    divisor_N = torch.where(scale_N > 0, scale_N, torch.ones_like(scale_N))
    q_NK = torch.round(w_NK / divisor_N.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q_NK.contiguous(), scale_N.contiguous()


def dequantize(q_NK: Tensor, scale_N: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(q_NK [..., N, K] int8, scale_N [..., N]) -> w_KN [..., K, N] of `dtype`."""
    if q_NK.dtype != torch.int8 or q_NK.dim() < 2 or scale_N.shape != q_NK.shape[:-1]:
        raise ValueError(
            f"dequantize: q {tuple(q_NK.shape)} {q_NK.dtype}, scale {tuple(scale_N.shape)}; "
            "expected int8 [..., N, K] and scales [..., N]"
        )
    w_NK = q_NK.to(torch.float32) * scale_N.to(torch.float32).unsqueeze(-1)
    return w_NK.transpose(-1, -2).to(dtype)


class Int8Experts(Experts):
    """E expert MLPs with int8 weights: y = act(x w1) w2, or (silu(x w1) * x w3) w2.

    Built empty (zero weights, to be filled by `load_checkpoint` from an int8 checkpoint)
    with the shape arguments of `GroupedExperts`, or from one with `from_float`.
    `cpu_method` picks the CPU matmul ("auto", "int8mm", "dequant"; module docstring).
    """

    quantization = "int8"

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: Activation | str = Activation.GELU,
        expert_ids: Sequence[int] | None = None,
        *,
        cpu_method: CpuInt8Method | str = CpuInt8Method.AUTO,
    ) -> None:
        super().__init__()
        if num_experts < 1 or d_model < 1 or d_hidden < 1:
            raise ValueError(
                f"Int8Experts needs num_experts, d_model, d_hidden >= 1; got "
                f"{num_experts}, {d_model}, {d_hidden}"
            )
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.expert_ids = check_expert_ids(expert_ids, num_experts)
        self.activation = parse_activation(activation)
        self.cpu_method = parse_cpu_method(cpu_method)
        E, D, H = num_experts, d_model, d_hidden
        self.w1_q_EHD: Tensor
        self.w1_scale_EH: Tensor
        self.w2_q_EDH: Tensor
        self.w2_scale_ED: Tensor
        self.w3_q_EHD: Tensor | None
        self.w3_scale_EH: Tensor | None
        self.register_buffer("w1_q_EHD", torch.zeros(E, H, D, dtype=torch.int8))
        self.register_buffer("w1_scale_EH", torch.zeros(E, H))
        self.register_buffer("w2_q_EDH", torch.zeros(E, D, H, dtype=torch.int8))
        self.register_buffer("w2_scale_ED", torch.zeros(E, D))
        swiglu = self.activation == Activation.SWIGLU
        self.register_buffer("w3_q_EHD", torch.zeros(E, H, D, dtype=torch.int8) if swiglu else None)
        self.register_buffer("w3_scale_EH", torch.zeros(E, H) if swiglu else None)

    @classmethod
    def from_float(
        cls, grouped: GroupedExperts, *, cpu_method: CpuInt8Method | str = CpuInt8Method.AUTO
    ) -> Int8Experts:
        """The int8 copy of `grouped` (same experts, ids, activation and device)."""
        if not isinstance(grouped, GroupedExperts):
            raise ValueError(
                f"Int8Experts.from_float takes a GroupedExperts; got {type(grouped).__name__}"
            )
        module = cls(
            grouped.num_experts,
            grouped.d_model,
            grouped.d_hidden,
            grouped.activation,
            grouped.expert_ids,
            cpu_method=cpu_method,
        ).to(grouped.w1_EDH.device)
        with torch.no_grad():
            pairs = [
                (grouped.w1_EDH, module.w1_q_EHD, module.w1_scale_EH),
                (grouped.w2_EHD, module.w2_q_EDH, module.w2_scale_ED),
            ]
            if grouped.w3_EDH is not None:
                assert module.w3_q_EHD is not None and module.w3_scale_EH is not None
                pairs.append((grouped.w3_EDH, module.w3_q_EHD, module.w3_scale_EH))
            for weight, q_ENK, scale_EN in pairs:
                q, scale = quantize_weight(weight)
                q_ENK.copy_(q)
                scale_EN.copy_(scale)
        return module

    def forward(self, x_RD: Tensor, counts_E: Tensor, filled_E: Tensor | None = None) -> Tensor:
        """x_RD: [R, D] float rows sorted by local expert; counts_E: [E] int64 rows per
        local expert. Returns y_RD in x's dtype. Padding rows (`filled_E`, see
        `Experts.forward`) are multiplied like the others."""
        if x_RD.dim() != 2 or x_RD.shape[1] != self.d_model or not x_RD.is_floating_point():
            raise ValueError(
                f"Int8Experts input has shape {tuple(x_RD.shape)} and dtype {x_RD.dtype}; "
                f"expected a float tensor [rows, {self.d_model}]"
            )
        if counts_E.shape != (self.num_experts,):
            raise ValueError(
                f"counts_E has shape {tuple(counts_E.shape)}; expected ({self.num_experts},)"
            )
        method = self.cpu_method.value
        h_RH = int8_grouped_mm(x_RD, self.w1_q_EHD, self.w1_scale_EH, counts_E, method)
        gate_RH = None
        if self.w3_q_EHD is not None and self.w3_scale_EH is not None:
            gate_RH = int8_grouped_mm(x_RD, self.w3_q_EHD, self.w3_scale_EH, counts_E, method)
        h_RH = apply_activation(h_RH, gate_RH, self.activation)
        return int8_grouped_mm(h_RH, self.w2_q_EDH, self.w2_scale_ED, counts_E, method)

    def expert_forward(self, x_ND: Tensor, expert: int) -> Tensor:
        """Local expert `expert` on any rows: dequantize its weights, then float matmuls."""
        h = x_ND @ dequantize(self.w1_q_EHD[expert], self.w1_scale_EH[expert], x_ND.dtype)
        gate = None
        if self.w3_q_EHD is not None and self.w3_scale_EH is not None:
            gate = x_ND @ dequantize(self.w3_q_EHD[expert], self.w3_scale_EH[expert], x_ND.dtype)
        h = apply_activation(h, gate, self.activation)
        return h @ dequantize(self.w2_q_EDH[expert], self.w2_scale_ED[expert], x_ND.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation.value}, expert_ids={list(self.expert_ids)}, "
            f"cpu_method={self.cpu_method.value}"
        )


def quantize_experts(model: nn.Module, *, cpu_method: CpuInt8Method | str = "auto") -> int:
    """Replace, in place, every `GroupedExperts` held as `.experts` of a module (the MoE
    layers) by its `Int8Experts`. Returns how many were replaced."""
    holders = [
        (module, experts)
        for module in model.modules()
        if isinstance(experts := getattr(module, "experts", None), GroupedExperts)
    ]
    for module, experts in holders:
        module.experts = Int8Experts.from_float(experts, cpu_method=cpu_method)
    return len(holders)
