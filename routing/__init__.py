"""Who goes where: routers, capacity policies and routing losses. Pure tensor code."""

from routing.capacity import (
    apply_capacity,
    apply_expert_capacities,
    expert_capacity,
    keep_within_capacity,
    priority_order,
)
from routing.config import CapacityKind, PriorityKind, RouterKind, RoutingConfig
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

__all__ = [
    "CapacityKind",
    "DynamicCapacityController",
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
    "build_router",
    "changed_share",
    "expert_capacity",
    "keep_within_capacity",
    "priority_order",
    "reassign",
    "validate_tokens",
]
