"""Experts: E two-layer MLPs stored as stacked weights, computed over rows sorted by
expert. Experts know nothing of routing or communication.

Shapes: R routed rows, D model width, H expert hidden width, E experts (local to this
process; `expert_offset` is the global id of local expert 0).
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor, nn

from moe.ops import grouped_mm


class Activation(str, Enum):
    GELU = "gelu"
    RELU = "relu"
    SWIGLU = "swiglu"


def parse_activation(value: object) -> Activation:
    try:
        return Activation(value)
    except ValueError:
        accepted = ", ".join(a.value for a in Activation)
        raise ValueError(f"activation={value!r} is not one of: {accepted}") from None


class GroupedExperts(nn.Module):
    """E expert MLPs: y = act(x w1) w2, or (silu(x w1) * x w3) w2 for SwiGLU.

    Initialisation: the up-projections with std D^-1/2; the down-projection with std
    `down_std` (default H^-1/2, as a dense FFN of width H; sigma-MoE passes (E*H)^-1/2).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: Activation | str = Activation.GELU,
        expert_offset: int = 0,
        down_std: float | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1 or d_model < 1 or d_hidden < 1:
            raise ValueError(
                f"GroupedExperts needs num_experts, d_model, d_hidden >= 1; got "
                f"{num_experts}, {d_model}, {d_hidden}"
            )
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.expert_offset = expert_offset
        self.activation = parse_activation(activation)
        self.down_std = down_std if down_std is not None else d_hidden**-0.5
        self.w1_EDH = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.w2_EHD = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.w3_EDH: nn.Parameter | None = None
        if self.activation == Activation.SWIGLU:
            self.w3_EDH = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1_EDH, std=self.d_model**-0.5)
        if self.w3_EDH is not None:
            nn.init.normal_(self.w3_EDH, std=self.d_model**-0.5)
        nn.init.normal_(self.w2_EHD, std=self.down_std)

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """x_RD: rows sorted by local expert; counts_E: int64 rows per local expert."""
        h_RH = grouped_mm(x_RD, self.w1_EDH, counts_E)
        if self.w3_EDH is not None:
            h_RH = nn.functional.silu(h_RH) * grouped_mm(x_RD, self.w3_EDH, counts_E)
        elif self.activation == Activation.GELU:
            h_RH = nn.functional.gelu(h_RH)
        else:
            h_RH = nn.functional.relu(h_RH)
        return grouped_mm(h_RH, self.w2_EHD, counts_E)

    def expert_forward(self, x_ND: Tensor, expert: int) -> Tensor:
        """One local expert on any rows (plain torch; the reference and small-batch path)."""
        h = x_ND @ self.w1_EDH[expert]
        if self.w3_EDH is not None:
            h = nn.functional.silu(h) * (x_ND @ self.w3_EDH[expert])
        elif self.activation == Activation.GELU:
            h = nn.functional.gelu(h)
        else:
            h = nn.functional.relu(h)
        return h @ self.w2_EHD[expert]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation.value}, expert_offset={self.expert_offset}"
        )


def sigma_moe_down_std(num_experts: int, d_hidden: int) -> float:
    """Down-projection std of sigma-MoE: as a dense FFN of width E*H."""
    return 1.0 / math.sqrt(num_experts * d_hidden)


class DenseMLP(nn.Module):
    """A dense two-layer MLP with the experts' activations (the PR-MoE residual branch and
    the dense FFN of the transformer). Initialised like one expert."""

    def __init__(
        self, d_model: int, d_hidden: int, activation: Activation | str = Activation.GELU
    ) -> None:
        super().__init__()
        self.activation = parse_activation(activation)
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.gate = (
            nn.Linear(d_model, d_hidden, bias=False)
            if self.activation == Activation.SWIGLU
            else None
        )
        self.down = nn.Linear(d_hidden, d_model, bias=False)
        nn.init.normal_(self.up.weight, std=d_model**-0.5)
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=d_model**-0.5)
        nn.init.normal_(self.down.weight, std=d_hidden**-0.5)

    def forward(self, x_TD: Tensor) -> Tensor:
        h = self.up(x_TD)
        if self.gate is not None:
            h = nn.functional.silu(h) * self.gate(x_TD)
        elif self.activation == Activation.GELU:
            h = nn.functional.gelu(h)
        else:
            h = nn.functional.relu(h)
        return self.down(h)
