"""Experts: E two-layer MLPs stored as stacked weights, computed over rows sorted by
expert. Experts know nothing of routing or communication.

`Experts` is the interface every expert stack satisfies (`GroupedExperts` here, the int8
`moe.inference.quant.Int8Experts`): `forward(x_RD, counts_E)`, the global ids of the
experts it holds, and every tensor of its state stacked over those experts (leading
dimension), so that checkpoints save and load one expert per file whatever the class.
`expert_modules` / `expert_parameter_ids` are the one way to ask which modules and
parameters are experts (optimizer groups, gradient reduction, checkpoints, counts).

A *replicated* stack (`replicated = True`) is the expert code used as a dense layer: the
`ExpertFFN` of a dense model (the distillation student) runs one expert over every token
on every rank. Checkpoints still save it as an expert stack (one file per expert, the
same layout as one expert of an MoE layer), but it is not sharded over the EP group, so
for the optimizer and the gradient reduction its parameters are dense:
`expert_parameter_ids` leaves it out.

Shapes: R routed rows, D model width, H expert hidden width, E experts (local to this
process; `expert_ids[e]` is the global id of local expert e).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe.config import Activation
from moe.ops import gather_grouped_mm, grouped_mm, grouped_mm_combine
from routing.config import parse_enum


def parse_activation(value: object) -> Activation:
    return parse_enum(Activation, value, "activation")


def apply_activation(h: Tensor, gate: Tensor | None, activation: Activation) -> Tensor:
    """The hidden activation of every MLP here: silu(h) * gate for SwiGLU (gate = x w3),
    gelu(h) or relu(h) otherwise."""
    if activation == Activation.SWIGLU:
        assert gate is not None, "SwiGLU needs the gate projection"
        return nn.functional.silu(h) * gate
    if activation == Activation.GELU:
        return nn.functional.gelu(h)
    return nn.functional.relu(h)


def check_expert_ids(expert_ids: Sequence[int] | None, num_experts: int) -> tuple[int, ...]:
    """The ids as a tuple (0..E-1 when None), or a ValueError unless distinct ascending >= 0."""
    ids = tuple(range(num_experts)) if expert_ids is None else tuple(int(i) for i in expert_ids)
    if len(ids) != num_experts or any(i < 0 for i in ids) or list(ids) != sorted(set(ids)):
        raise ValueError(
            f"expert_ids={list(ids)} is invalid for {num_experts} local experts; accepted: "
            f"{num_experts} distinct global ids >= 0 in ascending order"
        )
    return ids


class Experts(nn.Module, metaclass=abc.ABCMeta):
    """The interface of an expert stack (see the module docstring).

    Subclasses set `num_experts` (local), `d_model`, `d_hidden`, `activation` and
    `expert_ids` (ascending global ids, one per local expert), keep every state tensor
    stacked over the local experts, and implement `forward` and `expert_forward`.
    `quantization` names the storage ("none" or "int8"); checkpoints record it.
    """

    num_experts: int
    d_model: int
    d_hidden: int
    activation: Activation
    expert_ids: tuple[int, ...]
    quantization: str = "none"
    # True: the same experts on every rank (a dense layer built from expert code), so
    # their gradients are reduced like dense ones (see the module docstring).
    replicated: bool = False
    # True: `forward_tokens` computes on the token rows, the permute folded in.
    folds_permute: bool = False

    @abc.abstractmethod
    def forward(self, x_RD: Tensor, counts_E: Tensor, filled_E: Tensor | None = None) -> Tensor:
        """x_RD: rows sorted by local expert; counts_E: int64 rows per local expert;
        filled_E (a capacity-padded layout): the first filled_E[e] rows of expert e hold
        slots, the rest are padding that the caller never reads (an implementation may
        skip them)."""

    @abc.abstractmethod
    def expert_forward(self, x_ND: Tensor, expert: int) -> Tensor:
        """Local expert `expert` on any rows (plain torch: the reference path)."""

    def forward_tokens(
        self, x_TD: Tensor, token_index_R: Tensor, weight_R: Tensor, counts_E: Tensor
    ) -> Tensor:
        """y_TD[t] = sum over rows r of token t of weight_R[r] * expert(r)(x_TD[t]), rows
        sorted by local expert (counts_E per expert): permute, `forward` and the weighted
        combine in one. This default does the three in turn (a gathered copy of the rows,
        `forward`, an index_add of the weighted outputs); stacks with `folds_permute`
        override it with matmuls that read and write the token rows directly."""
        y_RD = self.forward(x_TD.index_select(0, token_index_R), counts_E)
        weighted_RD = y_RD * weight_R.to(y_RD.dtype).unsqueeze(1)
        y_TD = y_RD.new_zeros(x_TD.shape[0], y_RD.shape[1])
        return y_TD.index_add_(0, token_index_R, weighted_RD)

    def forward_every(self, x_TD: Tensor) -> Tensor:
        """Every local expert on every row: y_ETD[e] = expert e (x_TD). The MoE layer's
        padded layout (`moe.layer.ExpertLayout.PADDED`). This default runs `forward` over
        the rows repeated once per expert (E blocks of T rows); a stack that can do it
        as one batched product overrides it."""
        num_rows = x_TD.shape[0]
        counts_E = torch.full((self.num_experts,), num_rows, dtype=torch.int64, device=x_TD.device)
        y_RD = self.forward(x_TD.repeat(self.num_experts, 1), counts_E)
        return y_RD.view(self.num_experts, num_rows, -1)

    def expert_state(self, local: int) -> dict[str, Tensor]:
        """Local expert `local`'s tensors, each sliced to [1, ...] (one checkpoint file)."""
        return {k: t[local : local + 1] for k, t in self.state_dict().items()}


def expert_modules(model: nn.Module) -> list[tuple[str, Experts]]:
    """(qualified name, module) of every expert stack in `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Experts)]


def expert_parameter_ids(model: nn.Module) -> set[int]:
    """`id()` of every parameter of a sharded expert stack of `model` (replicated stacks,
    the `ExpertFFN`s of a dense model, hold dense parameters)."""
    return {id(p) for _, m in expert_modules(model) if not m.replicated for p in m.parameters()}


class GroupedExperts(Experts):
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
        expert_ids: Sequence[int] | None = None,
        down_std: float | None = None,
        replicated: bool = False,
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
        self.expert_ids = check_expert_ids(expert_ids, num_experts)
        self.replicated = replicated
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

    def forward(self, x_RD: Tensor, counts_E: Tensor, filled_E: Tensor | None = None) -> Tensor:
        """See `Experts.forward`; padding rows are skipped, and their outputs are zero."""
        h_RH = grouped_mm(x_RD, self.w1_EDH, counts_E, filled_E)
        gate_RH = None
        if self.w3_EDH is not None:
            gate_RH = grouped_mm(x_RD, self.w3_EDH, counts_E, filled_E)
        h_RH = apply_activation(h_RH, gate_RH, self.activation)
        return grouped_mm(h_RH, self.w2_EHD, counts_E, filled_E)

    folds_permute = True

    def forward_tokens(
        self, x_TD: Tensor, token_index_R: Tensor, weight_R: Tensor, counts_E: Tensor
    ) -> Tensor:
        """See `Experts.forward_tokens`: the gather folded into the first matmuls, the
        weighted combine into the last (`moe.ops.fused`); no [R, D] row matrix."""
        h_RH = gather_grouped_mm(x_TD, self.w1_EDH, token_index_R, counts_E)
        gate_RH = None
        if self.w3_EDH is not None:
            gate_RH = gather_grouped_mm(x_TD, self.w3_EDH, token_index_R, counts_E)
        h_RH = apply_activation(h_RH, gate_RH, self.activation)
        return grouped_mm_combine(
            h_RH, self.w2_EHD, token_index_R, weight_R, counts_E, x_TD.shape[0]
        )

    def forward_every(self, x_TD: Tensor) -> Tensor:
        """See `Experts.forward_every`: one batched product per projection over the
        stacked weights (x broadcast over the experts, no copy), plain torch ops that
        `torch.compile` fuses and lowers without a custom op."""
        x_1TD = x_TD.unsqueeze(0)
        gate_ETH = None if self.w3_EDH is None else torch.matmul(x_1TD, self.w3_EDH)
        h_ETH = apply_activation(torch.matmul(x_1TD, self.w1_EDH), gate_ETH, self.activation)
        return torch.matmul(h_ETH, self.w2_EHD)

    def expert_forward(self, x_ND: Tensor, expert: int) -> Tensor:
        """One local expert on any rows (plain torch; the reference and small-batch path)."""
        gate = None if self.w3_EDH is None else x_ND @ self.w3_EDH[expert]
        h = apply_activation(x_ND @ self.w1_EDH[expert], gate, self.activation)
        return h @ self.w2_EHD[expert]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation.value}, expert_ids={list(self.expert_ids)}"
            + (", replicated" if self.replicated else "")
        )


class ExpertFFN(nn.Module):
    """A dense FFN made of the expert-layer code: one expert, no router. Every token goes
    to expert 0 (`counts = [T]`), so the module computes what one expert of an MoE layer
    computes, with the same class (`GroupedExperts`, replicated) and parameter layout
    (`experts.w1_EDH` [1, D, H], ...). It is the distillation student's FFN: a teacher
    expert copies into it, and its checkpoint files have the format of an expert's.
    `experts` may be swapped for another `Experts` (int8 at inference)."""

    def __init__(
        self, d_model: int, d_hidden: int, activation: Activation | str = Activation.GELU
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.experts: Experts = GroupedExperts(1, d_model, d_hidden, activation, replicated=True)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., D] -> [..., D]."""
        x_TD = x.reshape(-1, self.d_model)
        counts_E = torch.full((1,), x_TD.shape[0], dtype=torch.int64, device=x.device)
        return self.experts(x_TD, counts_E).reshape(x.shape)


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
        gate = None if self.gate is None else self.gate(x_TD)
        return self.down(apply_activation(self.up(x_TD), gate, self.activation))
