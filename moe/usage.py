"""Expert usage: the token-slots each expert of each MoE layer received, counted one way
for every caller (the training loop's load heatmap, distillation's choice of experts,
task expert subsets).

`ExpertUsage.observe(model)` adds the last forward's kept slots per expert of every MoE
layer (`RoutingStats.tokens_per_expert_E`: this process's tokens, every global expert)
to a float64 sum that stays on the device, so observing costs no host sync. To count
every choice rather than the kept ones, observe under
`model.capacity_override(CapacityOverride.DROPLESS)`.

Legend: E experts of a layer (global ids).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from routing import AllReduce, RoutingStats


class RoutedModel(Protocol):
    """What `ExpertUsage` asks of a model (a `MoETransformer`): the routing statistics
    of its last forward, by block index (blocks without routing statistics left out)."""

    def routing_stats(self) -> dict[int, RoutingStats]: ...


class ExpertUsage:
    """Kept token-slots per expert, by block index, summed over the observed forwards."""

    def __init__(self) -> None:
        self.per_layer: dict[int, Tensor] = {}

    def observe(self, model: RoutedModel) -> None:
        """Add `model`'s last forward (a `MoETransformer`; blocks without routing
        statistics are skipped)."""
        for block, stats in model.routing_stats().items():
            load_E = stats.tokens_per_expert_E.detach().to(torch.float64, copy=True)
            previous = self.per_layer.get(block)
            self.per_layer[block] = load_E if previous is None else previous + load_E

    def blocks(self) -> list[int]:
        return sorted(self.per_layer)

    def totals(self, all_reduce: AllReduce | None = None) -> dict[int, Tensor]:
        """Block -> float64 [E] on the CPU; with `all_reduce`, summed over the ranks
        (one collective for every layer: every rank must call it, having observed the
        same layers)."""
        blocks = self.blocks()
        if not blocks:
            return {}
        flat = torch.cat([self.per_layer[b] for b in blocks])
        if all_reduce is not None:
            flat = all_reduce(flat)
        parts = flat.cpu().split([len(self.per_layer[b]) for b in blocks])
        return dict(zip(blocks, parts))
