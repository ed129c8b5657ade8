"""Capacity policies: turn a plan's choices into kept slots.

Fixed capacity = max(min_capacity, round(C * K * T / E)) slots per expert (round half
up). Slots fill choice by choice, and within a choice in token order: every token's
first choice is placed before any token's second choice (GShard; V-MoE). Batch Priority
Routing (V-MoE) fills in the same way but visits tokens by descending priority score
(max or sum of the token's router scores; ties keep token order). A dropped slot keeps
its weight in `weights_TK` but is marked in `keep_TK`; the token then keeps only its
other choices (and the residual stream). Dropless keeps every slot. Dynamic (DynaMoE)
fills like fixed, choice-major in token order, but expert e has its own capacity
`capacity_E[e]` (from `routing.dynamic.DynamicCapacityController`, handed in).

Shapes: T tokens, K experts per token, E experts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from routing.config import CapacityKind, PriorityKind, RoutingConfig
from routing.plan import RoutingPlan, count_per_expert


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int
) -> int:
    """Slots per expert: round(C * K * T / E), half up, at least `min_capacity`."""
    return max(min_capacity, math.floor(capacity_factor * top_k * num_tokens / num_experts + 0.5))


def priority_order(scores_TK: Tensor, kind: PriorityKind) -> Tensor:
    """Token indices, highest priority first (stable: ties keep token order)."""
    priority_T = scores_TK.max(dim=-1).values if kind == PriorityKind.MAX else scores_TK.sum(-1)
    return torch.sort(priority_T, descending=True, stable=True).indices


def keep_within_capacity(
    expert_ids_TK: Tensor, token_order_T: Tensor, capacity: int | Tensor
) -> Tensor:
    """Mark the slots that fit: choice-major over tokens in `token_order_T`.

    `capacity`: slots of every expert (int), or of each expert (int64 [E] tensor).
    Returns keep_TK (bool). Position of a slot in its expert's queue = number of earlier
    slots (in visiting order) that chose the same expert.
    """
    num_tokens, top_k = expert_ids_TK.shape
    # Visiting order: all first choices (tokens in token_order), then all second choices...
    visit_ids_N = expert_ids_TK[token_order_T].t().reshape(-1)
    sorted_ids, order_N = torch.sort(visit_ids_N, stable=True)
    is_start = torch.ones_like(sorted_ids, dtype=torch.bool)
    is_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    index_N = torch.arange(sorted_ids.numel(), device=sorted_ids.device)
    group_start_N = torch.cummax(torch.where(is_start, index_N, 0), dim=0).values
    rank_sorted_N = index_N - group_start_N
    rank_N = torch.empty_like(rank_sorted_N)
    rank_N[order_N] = rank_sorted_N
    if isinstance(capacity, Tensor):
        limit_N = capacity.to(device=visit_ids_N.device, dtype=torch.int64)[visit_ids_N]
        keep_visit_KT = (rank_N < limit_N).view(top_k, num_tokens)
    else:
        keep_visit_KT = (rank_N < capacity).view(top_k, num_tokens)
    keep_TK = torch.empty_like(expert_ids_TK, dtype=torch.bool)
    keep_TK[token_order_T] = keep_visit_KT.t()
    return keep_TK


def apply_capacity(
    plan: RoutingPlan, config: RoutingConfig, capacity_E: Sequence[int] | None = None
) -> RoutingPlan:
    """Apply the configured capacity policy to a plan with every slot kept.

    `capacity_E`: the per-expert slots of `capacity=dynamic` (required there, refused
    elsewhere)."""
    kind = CapacityKind(config.capacity)
    if kind == CapacityKind.DYNAMIC:
        return apply_expert_capacities(plan, capacity_E)
    if capacity_E is not None:
        raise ValueError(
            f"per-expert capacities were given but routing.capacity={kind.value}; "
            "they apply only to routing.capacity=dynamic"
        )
    if kind == CapacityKind.DROPLESS:
        return plan
    capacity = expert_capacity(
        plan.num_tokens, plan.num_experts, plan.top_k, config.capacity_factor, config.min_capacity
    )
    if kind == CapacityKind.PRIORITY:
        order_T = priority_order(plan.scores_TK, PriorityKind(config.priority))
    else:
        order_T = torch.arange(plan.num_tokens, device=plan.expert_ids_TK.device)
    keep_TK = keep_within_capacity(plan.expert_ids_TK, order_T, capacity) & plan.keep_TK
    return dataclasses.replace(
        plan,
        keep_TK=keep_TK,
        counts_E=count_per_expert(plan.expert_ids_TK, keep_TK, plan.num_experts),
        capacity=capacity,
    )


def apply_expert_capacities(
    plan: RoutingPlan, capacity_E: Sequence[int] | Tensor | None, padded_rows: int | None = None
) -> RoutingPlan:
    """Keep at most `capacity_E[e]` slots of expert e, choice-major in token order (as
    fixed capacity); the plan records the capacities (`capacity_E`, int64 [E]) and their
    sum (`padded_rows`). A tensor `capacity_E` needs `padded_rows`, its sum, from the
    caller (no host sync: under `torch.compile` the capacities stay data and only the
    sum is a shape)."""
    if capacity_E is None or len(capacity_E) != plan.num_experts:
        raise ValueError(
            f"routing.capacity=dynamic needs one capacity per expert ({plan.num_experts}); "
            f"got {None if capacity_E is None else list(capacity_E)}"
        )
    device = plan.expert_ids_TK.device
    if isinstance(capacity_E, Tensor):
        if padded_rows is None:
            raise ValueError("a capacity tensor needs padded_rows (its sum)")
        limit_E = capacity_E.to(device=device, dtype=torch.int64)
    else:
        capacities = [int(c) for c in capacity_E]
        if min(capacities) < 0:
            raise ValueError(f"per-expert capacities {capacities} must be >= 0")
        limit_E = torch.tensor(capacities, dtype=torch.int64, device=device)
        padded_rows = sum(capacities)
    order_T = torch.arange(plan.num_tokens, device=device)
    keep_TK = keep_within_capacity(plan.expert_ids_TK, order_T, limit_E) & plan.keep_TK
    return dataclasses.replace(
        plan,
        keep_TK=keep_TK,
        counts_E=count_per_expert(plan.expert_ids_TK, keep_TK, plan.num_experts),
        capacity=padded_rows,
        capacity_E=limit_E,
        padded_rows=padded_rows,
    )
