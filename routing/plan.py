"""The routing plan: which token-slot goes to which expert, with what weight, and
whether it was kept. Routers produce it with every slot kept; capacity policies
(`routing.capacity`) mark slots dropped.

Shapes: T tokens, K experts per token, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class RoutingStats:
    """What a plan did, for logging (no gradient).

    tokens_per_expert_E: kept token-slots per expert (float).
    dropped_fraction: fraction of the T*K token-slots that were dropped (scalar).
    router_entropy: mean over tokens of the entropy of the routing distribution (nats).
    """

    tokens_per_expert_E: Tensor
    dropped_fraction: Tensor
    router_entropy: Tensor


@dataclass(frozen=True)
class RoutingPlan:
    """Routing decisions for T tokens over E experts, K choices each.

    expert_ids_TK: int64 expert of each slot.
    weights_TK: combine weight of each slot (differentiable; 0 is never implied by drop:
        read `keep_TK`).
    scores_TK: the router's raw score of each chosen expert (softmax probability or
        sigmoid gate), before any renormalisation; Batch Priority Routing reads it.
    keep_TK: bool, False where the capacity policy dropped the slot.
    counts_E: int64 kept slots per expert.
    aux_loss: weighted sum of the router's auxiliary losses (scalar).
    losses: the unweighted losses by name (for logging).
    capacity: slots per expert, or None when dropless (dynamic: `padded_rows`, a bound
        on every expert's slots).
    capacity_E: int64 [E] slots of each expert under `capacity=dynamic`, else None.
    padded_rows: sum of `capacity_E` (the rows of the padded layout), else None.
    probs_TE: the router's full score matrix (softmax probabilities or sigmoid gates,
        differentiable) when the router exposes it; an assignment fixed elsewhere (the
        DynaMoE cache, `routing.dynamic.reassign`) reads its weights from it.
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    scores_TK: Tensor
    keep_TK: Tensor
    counts_E: Tensor
    aux_loss: Tensor
    router_entropy: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    capacity: int | None = None
    capacity_E: Tensor | None = None
    padded_rows: int | None = None
    probs_TE: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids_TK.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids_TK.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.counts_E.shape[0])

    @property
    def stats(self) -> RoutingStats:
        slots = max(self.keep_TK.numel(), 1)
        kept = self.counts_E.sum()
        return RoutingStats(
            tokens_per_expert_E=self.counts_E.detach().float(),
            dropped_fraction=(1.0 - kept.float() / slots).detach(),
            router_entropy=self.router_entropy.detach(),
        )


def count_per_expert(expert_ids_TK: Tensor, keep_TK: Tensor, num_experts: int) -> Tensor:
    """Kept slots per expert, int64 [E]. A scatter-add, not `bincount` of the kept ids:
    the output size is E whatever the data (a static shape under `torch.compile`)."""
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids_TK.device)
    return counts_E.scatter_add_(0, expert_ids_TK.reshape(-1), keep_TK.reshape(-1).long())
