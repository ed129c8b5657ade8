"""Permute and unpermute: local reordering of token-slots, no communication.

`permute` sorts the kept slots by expert (stable: token order within an expert) and
gathers their token rows (compact: R = kept slots; or capacity-padded, see
`capacity_padded_permutation`); `unpermute` gathers each token's expert outputs back and
sums them with the routing weights.

Shapes: T tokens, K slots per token, R kept slots (routed rows), D model width, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    filled_E: a capacity-padded layout's kept slots per expert (int64): the first
        filled_E[e] of expert e's counts_E[e] rows; the rest are padding. None: every
        row holds a slot.
    slot_index_R: the compact layout's flat slot (t*K + k) of each row, for experts
        that fold the weighted combine into their matmuls (`Experts.forward_tokens`);
        None for a padded layout.
    """

    token_index_R: Tensor
    row_of_slot_TK: Tensor
    counts_E: Tensor
    filled_E: Tensor | None = None
    slot_index_R: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.token_index_R.shape[0])


def sort_by_expert(plan: RoutingPlan) -> Permutation:
    """Sort the kept slots by expert; dropped slots sort last and get row -1.

    A plan without capacity (`plan.capacity is None`: every slot kept) has R = T*K rows,
    known without looking at the data (no host sync; a static shape under
    `torch.compile`)."""
    num_tokens, top_k = plan.expert_ids_TK.shape
    keep_N = plan.keep_TK.reshape(-1)
    if plan.capacity is None:
        slot_order_N = torch.sort(plan.expert_ids_TK.reshape(-1), stable=True).indices
        num_rows = slot_order_N.numel()
    else:
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
        slot_index_R=slot_R,
    )


def capacity_padded_permutation(
    plan: RoutingPlan, slots_E: Sequence[int] | Tensor, total: int | None = None
) -> Permutation:
    """Capacity-padded layout: expert e owns rows [offset_e, offset_e + slots_E[e]),
    its kept slots first (token order), then padding rows (token 0's row: their outputs
    are never combined, so they get zero gradient). R = sum(slots_E) and
    `counts_E = slots_E` are fixed by the capacities, not by the data: no host sync,
    static shapes under `torch.compile`, and with equal capacities the grouped matmuls
    run as one `bmm` (`moe.ops`) when every row is filled; otherwise they multiply only
    the `filled_E` rows. Every expert must keep at most slots_E[e] slots.
    `slots_E` as an int64 tensor (DynaMoE's capacities) needs `total`, its sum: then only
    R is a shape, and the capacities within it are data."""
    num_tokens, top_k = plan.expert_ids_TK.shape
    num_experts = plan.num_experts
    device = plan.expert_ids_TK.device
    assert len(slots_E) == num_experts, "one capacity per expert"
    if isinstance(slots_E, Tensor):
        assert total is not None, "a capacity tensor needs its sum"
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        slots_X = torch.cat([slots_E.to(device=device, dtype=torch.int64), zero])
    else:
        total = int(sum(slots_E))
        slots_X = torch.tensor([*slots_E, 0], dtype=torch.int64, device=device)
    keep_N = plan.keep_TK.reshape(-1)
    key_N = torch.where(keep_N, plan.expert_ids_TK.reshape(-1), num_experts)
    order_N = torch.sort(key_N, stable=True).indices
    key_sorted_N = key_N[order_N]
    # Kept slots per expert (and the dropped ones under key E), without bincount's
    # data-dependent output size.
    counts_X = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts_X.scatter_add_(0, key_N, torch.ones_like(key_N))
    start_X = torch.cumsum(counts_X, 0) - counts_X
    rank_sorted_N = torch.arange(key_N.numel(), device=device) - start_X[key_sorted_N]
    offset_X = torch.cumsum(slots_X, 0) - slots_X
    kept_sorted_N = key_sorted_N < num_experts
    # Dropped slots write into a spare row `total`, cut off below.
    row_sorted_N = torch.where(kept_sorted_N, offset_X[key_sorted_N] + rank_sorted_N, total)
    token_index_P = torch.zeros(total + 1, dtype=torch.int64, device=device)
    token_index_P.scatter_(0, row_sorted_N, order_N // top_k)
    row_of_slot_N = torch.empty_like(key_N)
    row_of_slot_N[order_N] = torch.where(kept_sorted_N, row_sorted_N, -1)
    return Permutation(
        token_index_R=token_index_P[:total],
        row_of_slot_TK=row_of_slot_N.view(num_tokens, top_k),
        counts_E=slots_X[:num_experts],
        filled_E=counts_X[:num_experts],
    )


def permute(x_TD: Tensor, permutation: Permutation) -> Tensor:
    """Rows of x for each kept slot, sorted by expert: x_RD."""
    return gather_rows(x_TD, permutation.token_index_R)


def unpermute(y_RD: Tensor, permutation: Permutation, weights_TK: Tensor) -> Tensor:
    """y_TD[t] = sum over t's kept slots of weight * expert output."""
    return combine(y_RD, permutation.row_of_slot_TK, weights_TK)
