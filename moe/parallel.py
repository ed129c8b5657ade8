"""Dispatchers: what happens between permute and the experts.

A dispatcher takes rows sorted by global expert with their per-expert counts, and
returns the rows this process's experts must compute, sorted by local expert; `combine`
brings the results back in the original row order. `LocalDispatcher` (EP=1) is the
identity; `ExpertParallelDispatcher` moves rows with the all-to-all of `comm`.

Shapes: R routed rows, D model width, E experts (global), L local experts.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor


class Dispatcher(Protocol):
    num_experts: int
    num_local_experts: int
    expert_offset: int

    def dispatch(self, x_RD: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor, Any]:
        """-> (rows for the local experts sorted by local expert, counts_L, context)."""
        ...

    def combine(self, y_RD: Tensor, context: Any) -> Tensor:
        """Local expert outputs -> outputs in the order of the rows given to dispatch."""
        ...


class LocalDispatcher:
    """Every expert is local: no data moves."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.expert_offset = 0

    def dispatch(self, x_RD: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor, None]:
        return x_RD, counts_E, None

    def combine(self, y_RD: Tensor, context: Any) -> Tensor:
        return y_RD
