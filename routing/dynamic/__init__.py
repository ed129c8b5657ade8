"""DynaMoE (Kossmann et al. 2022): the capacity controller, the assignment cache, and
the per-layer and per-model state that the MoE layer and the training loop drive."""

from routing.dynamic.cache import AssignmentCache
from routing.dynamic.controller import (
    DynamicCapacityController,
    bucket_up,
    changed_share,
    reassign,
)
from routing.dynamic.state import DynamicPolicyState, DynamicRouting

__all__ = [
    "AssignmentCache",
    "DynamicCapacityController",
    "DynamicPolicyState",
    "DynamicRouting",
    "bucket_up",
    "changed_share",
    "reassign",
]
