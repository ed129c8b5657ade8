"""Routing configuration: the schema of the Hydra `routing` group.

Plain data, validated on construction; no tensors, devices or process groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar


class RouterKind(str, Enum):
    """Who picks the experts."""

    TOPK = "topk"  # softmax top-k over token logits (Switch k=1, GShard k=2, any k)
    SIGMA = "sigma"  # sigmoid gates, top-k by gate value (sigma-MoE, Csordas et al. 2023)
    TASK = "task"  # the task id, not the token, picks the experts (Kudugunta et al. 2021)


class CapacityKind(str, Enum):
    """How router choices become kept slots."""

    FIXED = "fixed"  # round(C*K*T/E) slots per expert, filled choice by choice in token order
    PRIORITY = "priority"  # same capacity, filled in order of router confidence (BPR, V-MoE)
    DROPLESS = "dropless"  # every choice is kept
    DYNAMIC = "dynamic"  # per-expert capacity from recent load, bucketed (DynaMoE)


class CapacityOverride(str, Enum):
    """Whose capacity policy a model routes with outside training (inference, a
    distillation teacher, usage measurement): set on the model with
    `MoETransformer.override_capacity` (or the `capacity_override` context)."""

    DROPLESS = "dropless"  # every choice kept: a token's output does not depend on its batch
    TRAINED = "trained"  # the policy the model was trained with (DynaMoE: its capacities)


class PriorityKind(str, Enum):
    """Batch Priority Routing score of a token."""

    MAX = "max"  # the token's largest router score
    SUM = "sum"  # the sum of its top-k router scores


@dataclass
class RoutingConfig:
    """Settings of a router and its capacity policy.

    `normalize_weights` renormalises the kept top-k softmax weights to sum to 1 per token
    (before capacity is applied; a dropped slot is not re-spread over the others) when
    top_k > 1; a top-1 weight stays the expert's probability (Switch), since a weight
    renormalised to 1 would cut the router off from the loss. Sigma-MoE weights are never
    renormalised. `normalize_top1` renormalises a top-1 weight as well (it becomes 1): the
    HuggingFace MoE families divide by the kept sum whatever K is (Mixtral always, Qwen-MoE
    and OLMoE when `norm_topk_prob`), so an imported top-1 model needs it.
    """

    router: RouterKind = RouterKind.TOPK
    top_k: int = 2
    capacity: CapacityKind = CapacityKind.FIXED
    capacity_factor: float = 1.25
    min_capacity: int = 1
    priority: PriorityKind = PriorityKind.MAX
    normalize_weights: bool = True
    normalize_top1: bool = False
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    jitter_noise: float = 0.0
    entropy_weight: float = 0.001
    expert_dropout: float = 0.0
    num_tasks: int = 0
    check_finite: bool = False
    # DynaMoE (capacity=dynamic; routing.dynamic.DynamicCapacityController): per-expert
    # capacity = headroom * (moving maximum over `dynamic_window` steps of the expert's
    # share of the slots) * K * T, clamped to [min_factor, max_factor] * K*T/E slots and
    # rounded up to a bucket: the next entry of `dynamic_buckets` (slot counts) when given,
    # else the next multiple of `dynamic_bucket_step` x K*T/E slots (a quarter of the
    # balanced load by default), else (step 0) the next power of two. A *rebuild* changes
    # the padded rows P (their sum: the shape a compiled step is keyed by); a *reshuffle*
    # moves slots between experts within P (data only, free, any step). After
    # `dynamic_max_rebuilds` rebuilds P freezes.
    dynamic_window: int = 16
    dynamic_headroom: float = 1.0
    dynamic_min_factor: float = 0.25
    dynamic_max_factor: float = 2.0
    dynamic_buckets: list[int] = field(default_factory=list)
    dynamic_bucket_step: float = 0.25
    # P grows at once but shrinks only when that saves this share of the padded slots.
    dynamic_shrink_margin: float = 0.1
    # P may change only on steps 1, 2, 4, ... below this and then on every this-many-th
    # step, the same in every layer (1: any step). Compiled runs: 50 or more.
    dynamic_rebuild_interval: int = 10
    dynamic_max_rebuilds: int = 32
    # Assignment cache (capacity=dynamic, training only): a sample whose share of changed
    # token-slots since it was last seen is below `cache_threshold` is served its cached
    # experts; at most `cache_max_entries` samples per layer (LRU); 0 turns it off.
    cache_max_entries: int = 0
    cache_threshold: float = 0.05

    def __post_init__(self) -> None:
        self.router = parse_enum(RouterKind, self.router, "routing.router")
        self.capacity = parse_enum(CapacityKind, self.capacity, "routing.capacity")
        self.priority = parse_enum(PriorityKind, self.priority, "routing.priority")
        if self.top_k < 1:
            raise ValueError(f"routing.top_k={self.top_k} must be >= 1")
        if not self.capacity_factor > 0:
            raise ValueError(
                f"routing.capacity_factor={self.capacity_factor} must be > 0 "
                "(C < 1 forces drops; use routing.capacity=dropless to keep every choice)"
            )
        if self.min_capacity < 0:
            raise ValueError(f"routing.min_capacity={self.min_capacity} must be >= 0")
        for name in ("aux_loss_weight", "z_loss_weight", "jitter_noise", "entropy_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"routing.{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"routing.expert_dropout={self.expert_dropout} must be in [0, 1)")
        self._validate_dynamic()
        if self.router == RouterKind.TASK and self.num_tasks < 1:
            raise ValueError(
                f"routing.num_tasks={self.num_tasks}: the task router needs num_tasks >= 1"
            )

    def _validate_dynamic(self) -> None:
        if self.dynamic_window < 1:
            raise ValueError(f"routing.dynamic_window={self.dynamic_window} must be >= 1")
        if not self.dynamic_headroom >= 1.0:
            raise ValueError(f"routing.dynamic_headroom={self.dynamic_headroom} must be >= 1")
        if not 0 < self.dynamic_min_factor <= self.dynamic_max_factor:
            raise ValueError(
                f"routing.dynamic_min_factor={self.dynamic_min_factor} and "
                f"routing.dynamic_max_factor={self.dynamic_max_factor} must satisfy "
                "0 < min_factor <= max_factor"
            )
        buckets = [int(b) for b in self.dynamic_buckets]
        if any(b < 1 for b in buckets) or buckets != sorted(set(buckets)):
            raise ValueError(
                f"routing.dynamic_buckets={list(self.dynamic_buckets)} must be distinct "
                "ascending slot counts >= 1 (or empty for powers of two)"
            )
        self.dynamic_buckets = buckets
        if not 0.0 <= self.dynamic_bucket_step <= 1.0:
            raise ValueError(
                f"routing.dynamic_bucket_step={self.dynamic_bucket_step} must be in [0, 1] "
                "(a fraction of the balanced load K*T/E; 0 = powers of two)"
            )
        if not 0.0 <= self.dynamic_shrink_margin < 1.0:
            raise ValueError(
                f"routing.dynamic_shrink_margin={self.dynamic_shrink_margin} must be in [0, 1)"
            )
        if self.dynamic_rebuild_interval < 1:
            raise ValueError(
                f"routing.dynamic_rebuild_interval={self.dynamic_rebuild_interval} must be >= 1"
            )
        if self.dynamic_max_rebuilds < 0:
            raise ValueError(
                f"routing.dynamic_max_rebuilds={self.dynamic_max_rebuilds} must be >= 0"
            )
        if self.cache_max_entries < 0:
            raise ValueError(f"routing.cache_max_entries={self.cache_max_entries} must be >= 0")
        if not 0.0 < self.cache_threshold <= 1.0:
            raise ValueError(f"routing.cache_threshold={self.cache_threshold} must be in (0, 1]")

    def validate_for(self, num_experts: int) -> None:
        """Check the settings that depend on the layer's expert count."""
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1")
        if self.top_k > num_experts:
            raise ValueError(
                f"routing.top_k={self.top_k} exceeds num_experts={num_experts}; "
                f"choose top_k in [1, {num_experts}]"
            )

    @property
    def needs_task_ids(self) -> bool:
        """Whether the router reads a task id for every token (task-level routing)."""
        return self.router == RouterKind.TASK

    def validate_for_data(self, num_tasks: int) -> None:
        """Check the settings that depend on the data: a router that reads task ids
        needs an id for every task the data has."""
        if self.needs_task_ids and self.num_tasks < num_tasks:
            raise ValueError(
                f"routing.num_tasks={self.num_tasks} but the data has {num_tasks} "
                f"tasks; set routing.num_tasks={num_tasks}"
            )


EnumT = TypeVar("EnumT", bound=Enum)


def parse_enum(kind: type[EnumT], value: object, key: str) -> EnumT:
    """`value` as a member of `kind` (by value), or a ValueError naming `key` and the
    accepted values. Used by every config dataclass's validation."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        accepted = ", ".join(str(member.value) for member in kind)
        raise ValueError(f"{key}={value!r} is not one of: {accepted}") from None
