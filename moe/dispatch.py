"""Permute and unpermute: local reordering of token-slots, no communication.

`permute` sorts the kept slots by expert (stable: token order within an expert) and
gathers their token rows; `unpermute` gathers each token's expert outputs back and
sums them with the routing weights.

Shapes: T tokens, K slots per token, R kept slots (routed rows), D model width, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe.ops import combine, gather_rows
from routing import RoutingPlan


@dataclass(frozen=True)
class Permutation:
    """Where each kept slot went.

    token_index_R: the token of each routed row (rows sorted by expert).
    row_of_slot_TK: the routed row of each slot, -1 where the slot was dropped.
    counts_E: rows per expert (int64), summing to R.
    """

    token_index_R: Tensor
    row_of_slot_TK: Tensor
    counts_E: Tensor

    @property
    def num_rows(self) -> int:
        return int(self.token_index_R.shape[0])


def plan_permutation(plan: RoutingPlan) -> Permutation:
    """Sort the kept slots by expert; dropped slots sort last and get row -1."""
    num_tokens, top_k = plan.expert_ids_TK.shape
    keep_N = plan.keep_TK.reshape(-1)
    sort_key_N = torch.where(keep_N, plan.expert_ids_TK.reshape(-1), plan.num_experts)
    slot_order_N = torch.sort(sort_key_N, stable=True).indices
    num_rows = int(keep_N.sum())
    slot_R = slot_order_N[:num_rows]
    row_of_slot_N = torch.full_like(keep_N, -1, dtype=torch.int64)
    row_of_slot_N[slot_R] = torch.arange(num_rows, device=slot_R.device)
    return Permutation(
        token_index_R=slot_R // top_k,
        row_of_slot_TK=row_of_slot_N.view(num_tokens, top_k),
        counts_E=plan.counts_E,
    )


def permute(x_TD: Tensor, permutation: Permutation) -> Tensor:
    """Rows of x for each kept slot, sorted by expert: x_RD."""
    return gather_rows(x_TD, permutation.token_index_R)


def unpermute(y_RD: Tensor, permutation: Permutation, weights_TK: Tensor) -> Tensor:
    """y_TD[t] = sum over t's kept slots of weight * expert output."""
    return combine(y_RD, permutation.row_of_slot_TK, weights_TK)
