"""DynaMoE (Kossmann et al. 2022): per-expert capacities from the recent load, bucketed so
that shapes change rarely, and the pieces the assignment cache needs.

`DynamicCapacityController` is collective-free: the caller hands it, once per training
step, the slots that chose each expert *before* capacity was applied (the demand),
summed over every rank and micro-batch of the step (one small all-reduce, made by
`routing.dynamic.state.DynamicPolicyState.end_step` with the function the training loop
hands it), and the token count T of one forward on one rank.

The statistic: the share of expert e in step s is p_e = demand_e / sum(demand); the
controller keeps the moving maximum m_e of p_e over the last `dynamic_window` steps.
For T tokens (K slots each) expert e's capacity is

    raw_e    = ceil(headroom * m_e * K * T)
    floor    = ceil(min_factor * K * T / E),  ceiling = min(T, ceil(max_factor * K * T / E))
    capacity = min(ceiling, bucket(max(raw_e, floor)))

where bucket() rounds up to the next entry of `dynamic_buckets` when that list is given
(above its last entry: the ceiling), else to the next multiple of the granule
g = max(1, ceil(dynamic_bucket_step * K * T / E)) (default step 0.25: a quarter of the
balanced load, so at most (max_factor - min_factor) / step + 1 buckets per expert and at
most g - 1 padding slots each), else (step 0) to the next power of two (up to 2x
padding). So busy experts get room for their peak recent load and idle ones shrink to
the floor.

Two kinds of change, because only one of them costs anything. The *padded rows*
P = sum(capacity_e) is a shape (the rows the experts and the all-to-all see; a compiled
step is keyed by it); the per-expert capacities within P are data (a tensor the layer
reads), so moving slots between experts changes no shape.

- A *rebuild* changes P. With need_e the bucketed capacities of the moving maximum:
  P grows as soon as sum(need) > P (drops cost quality), and shrinks only when
  sum(need) <= (1 - `dynamic_shrink_margin`) * P; the new vector is `need`. Only the
  observed steps 1, 2, 4, 8, ... below `dynamic_rebuild_interval` (the initial 1/E
  vector is a guess, and the router moves fastest early) and then every interval-th
  step may rebuild (the same steps in every layer, so a model's layers change together
  and a compiled step is rebuilt once for them); in between, a needed rebuild waits.
  Each rebuild is announced to the listeners (`on_buckets_changed(buckets)`); after
  `dynamic_max_rebuilds` of them P freezes (`frozen`). Without the margin a moving
  maximum that drifts across a bucket boundary changes P every few steps; without the
  interval the budget is spent while the router still moves (KJV demo: all 32 allowed
  rebuilds of every layer within 100 steps).
- A *reshuffle* keeps P and moves slots: when some expert needs more than it has, the
  vector becomes `need` plus the slack P - sum(need) handed out one slot at a time,
  round-robin over the experts below the ceiling, busiest (largest moving maximum)
  first (`spread`); if sum(need) > P (a grow waiting for its step, or P frozen), the
  needs are first scaled down to P (`fit`), so the slots follow the load's shape while
  P cannot. Reshuffles are free (no shape changes, no recompile), so they may happen on
  any step and after the freeze; `reshuffles` counts them.

Before the first observation every expert's share is taken to be 1/E.

Shapes: T tokens, K experts per token, E experts, B samples, S tokens per sample.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from routing.config import RouterKind, RoutingConfig
from routing.plan import RoutingPlan, count_per_expert

BucketListener = Callable[[tuple[int, ...]], None]


def bucket_up(slots: int, buckets: Sequence[int], granule: int = 0) -> int:
    """The smallest bucket >= `slots`: the next entry of `buckets` (ascending) when given
    (above the last one: `slots`), else the next multiple of `granule` when it is >= 1,
    else the next power of two."""
    if slots <= 0:
        return 0
    if not buckets:
        if granule >= 1:
            return -(-slots // granule) * granule
        return 1 << (slots - 1).bit_length()
    for bucket in buckets:
        if bucket >= slots:
            return int(bucket)
    return slots


def spread(
    need_E: Sequence[int], total: int, share_E: Sequence[float], ceiling: int
) -> tuple[int, ...]:
    """`need_E` plus `total - sum(need_E)` slack slots, one at a time round-robin over the
    experts below `ceiling`, largest share first (ties: lower index). Needs
    sum(need_E) <= total <= len(need_E) * ceiling."""
    out = list(need_E)
    slack = total - sum(out)
    if slack < 0 or total > len(out) * ceiling:
        raise ValueError(f"cannot spread {list(need_E)} over {total} rows (ceiling {ceiling})")
    order = sorted(range(len(out)), key=lambda e: (-share_E[e], e))
    while slack > 0:
        for e in order:
            if slack and out[e] < ceiling:
                out[e] += 1
                slack -= 1
    return tuple(out)


def fit(
    need_E: Sequence[int], total: int, share_E: Sequence[float], floor: int, ceiling: int
) -> tuple[int, ...]:
    """A vector of sum `total` for the needs `need_E`: `spread` when they fit; else each
    need scaled by total / sum(need_E) (rounded down, at least `floor`; while the floors
    overshoot, the largest entry above the floor gives one slot, lowest index first),
    then `spread`. Needs len(need_E) * floor <= total."""
    if sum(need_E) <= total:
        return spread(need_E, total, share_E, ceiling)
    out = [max(floor, need * total // sum(need_E)) for need in need_E]
    while sum(out) > total:
        largest = max(range(len(out)), key=lambda e: (out[e], -e))
        if out[largest] <= floor:
            raise ValueError(f"cannot fit {list(need_E)} in {total} rows (floor {floor})")
        out[largest] -= 1
    return spread(out, total, share_E, ceiling)


class DynamicCapacityController:
    """Per-expert capacities from the moving maximum of each expert's load share (see the
    module docstring for the formula). Pure Python state; no collectives."""

    def __init__(self, num_experts: int, top_k: int, config: RoutingConfig) -> None:
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"num_experts={num_experts}, top_k={top_k}: need 1 <= top_k <= num_experts"
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.window = config.dynamic_window
        self.headroom = config.dynamic_headroom
        self.min_factor = config.dynamic_min_factor
        self.max_factor = config.dynamic_max_factor
        self.buckets = tuple(int(b) for b in config.dynamic_buckets)
        self.bucket_step = config.dynamic_bucket_step
        self.max_rebuilds = config.dynamic_max_rebuilds
        self.shrink_margin = config.dynamic_shrink_margin
        self.rebuild_interval = config.dynamic_rebuild_interval
        self._steps = 0
        self._shares: deque[tuple[float, ...]] = deque(maxlen=self.window)
        # The statistic behind the current vector (changes at rebuilds and reshuffles).
        self.accepted_share_E: tuple[float, ...] = (1.0 / num_experts,) * num_experts
        self.reference_tokens: int | None = None
        self.bucket_vector: tuple[int, ...] | None = None
        # The vector as data (int64 [E], updated in place: what the layer reads) and its
        # sum P as a plain int (the shape a compiled step is keyed by).
        self.capacity_E = torch.zeros(num_experts, dtype=torch.int64)
        self.padded_rows = 0
        self.rebuilds = 0
        self.reshuffles = 0
        self.frozen = False
        self._listeners: list[BucketListener] = []

    def add_listener(self, listener: BucketListener) -> None:
        """Call `listener(bucket_vector)` after every rebuild (not at the first build)."""
        self._listeners.append(listener)

    def bounds(self, num_tokens: int) -> tuple[int, int]:
        """(floor, ceiling) slots per expert for `num_tokens` tokens."""
        slots = self.top_k * num_tokens
        ceiling = min(num_tokens, math.ceil(self.max_factor * slots / self.num_experts - 1e-9))
        floor = min(ceiling, math.ceil(self.min_factor * slots / self.num_experts - 1e-9))
        return max(floor, 0), max(ceiling, 0)

    def capacities_for(self, share_E: Sequence[float], num_tokens: int) -> tuple[int, ...]:
        """Bucketed per-expert capacities for `num_tokens` tokens from the shares."""
        floor, ceiling = self.bounds(num_tokens)
        slots = self.top_k * num_tokens
        granule = 0
        if self.bucket_step > 0:
            granule = max(1, math.ceil(self.bucket_step * slots / self.num_experts - 1e-9))
        out = []
        for share in share_E:
            raw = math.ceil(self.headroom * share * slots - 1e-9)
            out.append(min(ceiling, bucket_up(max(raw, floor), self.buckets, granule)))
        return tuple(out)

    def capacities(self, num_tokens: int) -> tuple[int, ...]:
        """Capacity of each expert for a forward of `num_tokens` tokens (the bucket vector
        when `num_tokens` is the training T)."""
        if num_tokens == self.reference_tokens and self.bucket_vector is not None:
            return self.bucket_vector
        return self.capacities_for(self.accepted_share_E, num_tokens)

    def moving_max_share(self) -> tuple[float, ...]:
        """m_e: the largest share of each expert over the window (1/E before any step)."""
        if not self._shares:
            return (1.0 / self.num_experts,) * self.num_experts
        return tuple(max(column) for column in zip(*self._shares))

    def start(self, num_tokens: int) -> None:
        """Take `num_tokens` (T of one training forward) as the reference: the vector
        from the accepted statistic (1/E each before any step). A no-op when it already
        is; `observe` does it when T changes."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens} must be >= 1")
        if num_tokens == self.reference_tokens and self.bucket_vector is not None:
            return
        self.reference_tokens = num_tokens
        self._set_vector(self.capacities_for(self.accepted_share_E, num_tokens))

    def _set_vector(self, vector: tuple[int, ...]) -> None:
        self.bucket_vector = vector
        self.padded_rows = sum(vector)
        self.capacity_E.copy_(torch.tensor(vector, dtype=torch.int64))

    def state_dict(self) -> dict[str, Any]:
        """The controller's state as plain data (a checkpoint's; floats round-trip JSON
        exactly, so a resumed run continues the same sequence)."""
        return {
            "steps": self._steps,
            "shares": [list(share) for share in self._shares],
            "accepted_share": list(self.accepted_share_E),
            "reference_tokens": self.reference_tokens,
            "vector": None if self.bucket_vector is None else list(self.bucket_vector),
            "rebuilds": self.rebuilds,
            "reshuffles": self.reshuffles,
            "frozen": self.frozen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (ValueError if it is for another E)."""
        shares = [tuple(float(v) for v in share) for share in state["shares"]]
        vector = state["vector"]
        lengths = {len(share) for share in [*shares, state["accepted_share"]]}
        if vector is not None:
            lengths.add(len(vector))
        if lengths != {self.num_experts}:
            raise ValueError(
                f"DynaMoE state holds vectors of lengths {sorted(lengths)}; this layer has "
                f"{self.num_experts} experts"
            )
        self._steps = int(state["steps"])
        self._shares = deque(shares, maxlen=self.window)
        self.accepted_share_E = tuple(float(v) for v in state["accepted_share"])
        self.reference_tokens = state["reference_tokens"]
        if vector is not None:
            self._set_vector(tuple(int(c) for c in vector))
        self.rebuilds = int(state["rebuilds"])
        self.reshuffles = int(state["reshuffles"])
        self.frozen = bool(state["frozen"])

    def observe(self, demand_E: Sequence[int] | Tensor, num_tokens: int) -> bool:
        """Record one step's demand (slots per expert before capacity, summed over ranks
        and micro-batches) and `num_tokens` (T of one forward on one rank). Returns True
        on a rebuild (the padded rows changed); a reshuffle returns False."""
        values = demand_E.tolist() if isinstance(demand_E, Tensor) else list(demand_E)
        if len(values) != self.num_experts or min(values) < 0:
            raise ValueError(
                f"demand_E={values} must hold {self.num_experts} non-negative slot counts"
            )
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens} must be >= 1")
        self._steps += 1
        total = float(sum(values))
        if total > 0:
            self._shares.append(tuple(float(v) / total for v in values))
        if self.reference_tokens != num_tokens or self.bucket_vector is None:
            self.start(num_tokens)
        assert self.bucket_vector is not None
        share = self.moving_max_share()
        need = self.capacities_for(share, num_tokens)
        rows = self.padded_rows
        grow = sum(need) > rows
        shrink = sum(need) < rows and sum(need) <= (1.0 - self.shrink_margin) * rows
        if (grow or shrink) and self._rebuild(need, share):
            return True
        if any(n > c for n, c in zip(need, self.bucket_vector)):
            # Within P: the needs plus the spare rows, or, while a grow waits (or P is
            # frozen), the needs scaled down to P: the load's shape, at no cost.
            floor, ceiling = self.bounds(num_tokens)
            vector = fit(need, rows, share, floor, ceiling)
            if vector != self.bucket_vector:
                self._set_vector(vector)
                self.accepted_share_E = share
                self.reshuffles += 1
        return False

    def _rebuild(self, need: tuple[int, ...], share: tuple[float, ...]) -> bool:
        """Change the padded rows to sum(need), if this step may; True if it did."""
        step, interval = self._steps, self.rebuild_interval
        if step % interval and not (step < interval and step & (step - 1) == 0):
            # Only steps 1, 2, 4, 8, ... below the interval (the initial vector is a
            # guess and the router moves fastest early) and then every interval-th step
            # may rebuild, the same steps in every layer (one step sees the layers'
            # changes together: one new compiled step, not one per layer); in between, a
            # grow waits (the slots are fitted into P) and the statistic keeps moving.
            return False
        if self.rebuilds >= self.max_rebuilds:
            self.frozen = True
            return False
        self.accepted_share_E = share
        self._set_vector(need)
        self.rebuilds += 1
        for listener in self._listeners:
            listener(need)
        return True


def reassign(plan: RoutingPlan, expert_ids_TK: Tensor, config: RoutingConfig) -> RoutingPlan:
    """The plan with its experts replaced by `expert_ids_TK` (a cached assignment); the
    combine weights are the router's scores of those experts (`plan.probs_TE`),
    renormalised as the router would. Every slot kept; aux losses stay the router's."""
    if plan.probs_TE is None:
        raise ValueError("this router exposes no score matrix (probs_TE); cannot reassign")
    if expert_ids_TK.shape != plan.expert_ids_TK.shape:
        raise ValueError(
            f"expert_ids_TK has shape {tuple(expert_ids_TK.shape)}; "
            f"expected {tuple(plan.expert_ids_TK.shape)}"
        )
    ids_TK = expert_ids_TK.to(device=plan.expert_ids_TK.device, dtype=torch.int64)
    scores_TK = plan.probs_TE.gather(1, ids_TK)
    weights_TK = scores_TK
    if (
        RouterKind(config.router) != RouterKind.SIGMA
        and config.normalize_weights
        and (ids_TK.shape[1] > 1 or config.normalize_top1)
    ):
        weights_TK = scores_TK / scores_TK.sum(dim=-1, keepdim=True)
    return RoutingPlan(
        expert_ids_TK=ids_TK,
        weights_TK=weights_TK,
        scores_TK=scores_TK.detach(),
        keep_TK=torch.ones_like(ids_TK, dtype=torch.bool),
        counts_E=count_per_expert(
            ids_TK, torch.ones_like(ids_TK, dtype=torch.bool), plan.num_experts
        ),
        aux_loss=plan.aux_loss,
        router_entropy=plan.router_entropy,
        losses=plan.losses,
        probs_TE=plan.probs_TE,
    )


def changed_share(old_ids_BSK: Tensor, new_ids_BSK: Tensor) -> Tensor:
    """Per sample, the share of its token-slots whose expert changed: a token's K choices
    are compared as sets, so a new expert counts once and a swap of rank alone is no
    change. -> float [B]."""
    new_BSK = new_ids_BSK.to(old_ids_BSK.dtype)
    present_BSK = (new_BSK[..., :, None] == old_ids_BSK[..., None, :]).any(dim=-1)
    return (~present_BSK).float().mean(dim=(1, 2))
