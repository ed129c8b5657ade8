"""Capacity policies: turn a plan's choices into kept slots.

Fixed capacity = max(min_capacity, round(C * K * T / E)) slots per expert (round half
up). Slots fill choice by choice, and within a choice in token order: every token's
first choice is placed before any token's second choice (GShard; V-MoE). Batch Priority
Routing (V-MoE) fills in the same way but visits tokens by descending priority score
(max or sum of the token's router scores; ties keep token order). A dropped slot keeps
its weight in `weights_TK` but is marked in `keep_TK`; the token then keeps only its
other choices (and the residual stream). Dropless keeps every slot.

Shapes: T tokens, K experts per token, E experts.
"""

from __future__ import annotations

import dataclasses
import math

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


def keep_within_capacity(expert_ids_TK: Tensor, token_order_T: Tensor, capacity: int) -> Tensor:
    """Mark the slots that fit: choice-major over tokens in `token_order_T`.

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
    keep_visit_KT = (rank_N < capacity).view(top_k, num_tokens)
    keep_TK = torch.empty_like(expert_ids_TK, dtype=torch.bool)
    keep_TK[token_order_T] = keep_visit_KT.t()
    return keep_TK


def apply_capacity(plan: RoutingPlan, config: RoutingConfig) -> RoutingPlan:
    """Apply the configured capacity policy to a plan with every slot kept."""
    kind = CapacityKind(config.capacity)
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
