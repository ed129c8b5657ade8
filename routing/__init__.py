"""Who goes where: routers, capacity policies (and the state of stateful ones, DynaMoE),
and routing losses. Pure tensor code: no layer, no process group."""

from routing.capacity import (
    apply_capacity,
    apply_expert_capacities,
    expert_capacity,
    keep_within_capacity,
    priority_order,
)
from routing.config import (
    CapacityKind,
    CapacityOverride,
    PriorityKind,
    RouterKind,
    RoutingConfig,
)
from routing.dynamic import DynamicCapacityController, bucket_up, changed_share, reassign
from routing.plan import RoutingPlan, RoutingStats
from routing.routers import (
    Router,
    SigmaRouter,
    TaskRouter,
    TopKRouter,
    build_router,
    validate_tokens,
)
from routing.state import (
    AllReduce,
    CapacityState,
    NoPolicyState,
    PolicyState,
    build_capacity_state,
    model_policy_state,
)

__all__ = [
    "AllReduce",
    "CapacityKind",
    "CapacityOverride",
    "CapacityState",
    "DynamicCapacityController",
    "NoPolicyState",
    "PolicyState",
    "PriorityKind",
    "Router",
    "RouterKind",
    "RoutingConfig",
    "RoutingPlan",
    "RoutingStats",
    "SigmaRouter",
    "TaskRouter",
    "TopKRouter",
    "apply_capacity",
    "apply_expert_capacities",
    "bucket_up",
    "build_capacity_state",
    "build_router",
    "changed_share",
    "expert_capacity",
    "keep_within_capacity",
    "model_policy_state",
    "priority_order",
    "reassign",
    "validate_tokens",
]
