"""DynaMoE (Kossmann et al. 2022): per-expert capacities from the recent load, bucketed so
that shapes change rarely, and the pieces the assignment cache needs.

`DynamicCapacityController` is collective-free: the caller hands it, once per training
step, the slots that chose each expert *before* capacity was applied (the demand),
summed over every rank and micro-batch of the step (one small all-reduce, done in `moe`),
and the token count T of one forward on one rank.

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

Rebuilds: the capacities of the training T (the *bucket vector*) change only when the
bucketed candidate differs from the current vector, with hysteresis: a bucket grows as
soon as its expert's candidate is larger (drops cost quality), but buckets shrink only
when the candidate vector holds at most (1 - `dynamic_shrink_margin`) of the current
padded slots; otherwise only the growing buckets change (the statistic behind each
bucket is the larger of the accepted and the new share). Without it, a moving maximum
that drifts across a bucket boundary rebuilds every few steps (KJV demo: all 32 allowed
rebuilds of every layer within 100 steps). And only every `dynamic_rebuild_interval`-th
observed step may rebuild (steps k * interval, the same in every layer, so a model's
layers change together and a compiled step is rebuilt once for them): while the router
is still moving, a grow waits for the next allowed step (drops meanwhile) instead of
spending the budget; each change counts as one rebuild
and is announced to the listeners (`on_buckets_changed(buckets)`, e.g. a compiled step
keyed by the bucket vector). After `dynamic_max_rebuilds` changes the vector freezes.
Before the first observation every expert's share is taken to be 1/E.

Shapes: T tokens, K experts per token, E experts, B samples, S tokens per sample.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

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
        # The statistic behind the current bucket vector (changes only at a rebuild).
        self.accepted_share_E: tuple[float, ...] = (1.0 / num_experts,) * num_experts
        self.reference_tokens: int | None = None
        self.bucket_vector: tuple[int, ...] | None = None
        self.rebuilds = 0
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

    def observe(self, demand_E: Sequence[int] | Tensor, num_tokens: int) -> bool:
        """Record one step's demand (slots per expert before capacity, summed over ranks
        and micro-batches) and `num_tokens` (T of one forward on one rank). Returns True
        when the bucket vector changed (a rebuild)."""
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
            self.reference_tokens = num_tokens
            self.bucket_vector = self.capacities_for(self.accepted_share_E, num_tokens)
        candidate_share = self.moving_max_share()
        candidate = self.capacities_for(candidate_share, num_tokens)
        current = self.bucket_vector
        grows_only = all(c >= b for c, b in zip(candidate, current))
        if not grows_only and sum(candidate) > (1.0 - self.shrink_margin) * sum(current):
            # Shrinking would not save enough: keep every bucket, grow the ones that must.
            candidate_share = tuple(map(max, candidate_share, self.accepted_share_E))
            candidate = self.capacities_for(candidate_share, num_tokens)
        if candidate == current:
            return False
        if self._steps % self.rebuild_interval:
            # Only every interval-th step may rebuild, the same steps in every layer (one
            # step sees the layers' changes together: one new compiled step, not one
            # per layer); in between, a grow waits and the statistic keeps moving.
            return False
        if self.rebuilds >= self.max_rebuilds:
            self.frozen = True
            return False
        self.accepted_share_E = candidate_share
        self.bucket_vector = candidate
        self.rebuilds += 1
        for listener in self._listeners:
            listener(candidate)
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
        and ids_TK.shape[1] > 1
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
