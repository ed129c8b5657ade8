"""Who goes where: routers, capacity policies and routing losses. Pure tensor code."""

from routing.capacity import apply_capacity, expert_capacity, keep_within_capacity, priority_order
from routing.config import CapacityKind, PriorityKind, RouterKind, RoutingConfig
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
    "build_router",
    "expert_capacity",
    "keep_within_capacity",
    "priority_order",
    "validate_tokens",
]
