"""DynaMoE in the MoE layer (`routing.capacity=dynamic`): per-layer state, static padded
shapes, and the once-per-step controller update.

- `DynamicRouting` (one per layer): the capacity controller
  (`routing.DynamicCapacityController`), the optional assignment cache
  (`moe.assignment_cache`), and this step's demand (slots per expert before capacity,
  training forwards only).
- The layer lays the plan out with `moe.dispatch.capacity_padded_permutation` and the
  plan's per-expert capacities: expert e's rows start at sum(capacity[:e]) and every
  expert gets exactly capacity[e] rows (unused rows hold token 0 and are never
  combined). The experts and the all-to-all therefore see P = sum(capacity) rows, and,
  since every rank holds the same controller state, the all-to-all split sizes are
  known on every rank: the split-size exchange is skipped. The capacities reach the
  layer as a tensor (the controller's `capacity_E`, updated in place) and P as an int:
  under `torch.compile` only P is baked into the graph, so a reshuffle (new capacities,
  same P) reuses the compiled step and only a rebuild (new P) compiles a new one.
- `end_dynamic_step(model, group)`: one all-reduce of every layer's demand (over `group`,
  all ranks of the run, so every rank keeps the same capacities), then each controller
  observes it. The trainer calls it after each optimizer step.
- `set_sample_ids(model, sample_ids_B)`: the samples of the next training forward (the
  cache's keys).
- `start_dynamic(model, num_tokens)`: fix the training T before the first forward (the
  trainer does; otherwise the first `end_dynamic_step` does, and a compiled step
  compiles its first graph twice).

Shapes: T tokens, K experts per token, E experts, B samples, S tokens per sample, N = T*K
slots, P padded rows (sum of the capacities).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moe.assignment_cache import AssignmentCache
from routing import (
    DynamicCapacityController,
    RoutingConfig,
    RoutingPlan,
    apply_expert_capacities,
    reassign,
)


class DynamicRouting:
    """A layer's DynaMoE state (see the module docstring)."""

    def __init__(self, num_experts: int, config: RoutingConfig) -> None:
        self.num_experts = num_experts
        self.config = config
        self.controller = DynamicCapacityController(num_experts, config.top_k, config)
        self.cache = (
            AssignmentCache(config.cache_max_entries, config.cache_threshold)
            if config.cache_max_entries > 0
            else None
        )
        self.demand_E = torch.zeros(num_experts, dtype=torch.int64)
        self.tokens = 0  # T of the last training forward
        self.sample_ids: list[int] | None = None
        # Padded rows given to the experts and forwards since the last take. A tensor,
        # not Python ints: dynamo guards on int attributes, so counting in ints would
        # recompile a compiled step on every call.
        self.row_count_2 = torch.zeros(2, dtype=torch.int64)

    @property
    def processed_rows(self) -> int:
        return int(self.row_count_2[0])

    def take_row_counts(self) -> tuple[int, int]:
        """(padded rows, forwards) since the last call."""
        rows, forwards = self.row_count_2.tolist()
        self.row_count_2.zero_()
        return int(rows), int(forwards)

    def route(self, plan: RoutingPlan, num_samples: int, training: bool) -> RoutingPlan:
        """The router's plan (every slot kept) -> the capacity-applied plan: cached
        assignments for converged samples (training, cache on, sample ids set), demand
        recorded (training), per-expert capacities applied."""
        num_tokens = plan.num_tokens
        samples = self.sample_ids if training else None
        # The cache is host-side (per-sample dicts, data-dependent hits): eager only. A
        # compiled step routes every sample through the router (launch.trainer says so).
        cache = None if torch.compiler.is_compiling() else self.cache
        if cache is not None and samples is not None and len(samples) == num_samples:
            shape_SK = (num_tokens // num_samples, plan.top_k)
            router_ids_BSK = plan.expert_ids_TK.view(num_samples, *shape_SK)
            cached_BSK, hit_B = cache.lookup(samples, shape_SK)
            cache.update(samples, router_ids_BSK)
            if bool(hit_B.any()):
                device = plan.expert_ids_TK.device
                ids_BSK = torch.where(
                    hit_B.to(device)[:, None, None], cached_BSK.to(device), router_ids_BSK
                )
                plan = reassign(plan, ids_BSK.reshape(num_tokens, plan.top_k), self.config)
        if training:
            self.demand_E += plan.counts_E.detach().to("cpu", torch.int64)
            self.tokens = num_tokens
        controller = self.controller
        if num_tokens == controller.reference_tokens:
            # Read only `capacity_E` (data) and the int P: a compiled step guards on P.
            # A copy: the controller updates its tensor in place after the step, and a
            # plan kept past it must still hold the capacities it was routed with.
            rows = controller.padded_rows
            plan = apply_expert_capacities(plan, controller.capacity_E.clone(), rows)
        else:  # another T (an evaluation batch): the accepted statistic, eagerly
            plan = apply_expert_capacities(plan, controller.capacities(num_tokens))
            assert plan.padded_rows is not None
            rows = plan.padded_rows
        self.row_count_2 += torch.tensor([rows, 1], dtype=torch.int64)
        return plan

    def take_demand(self) -> Tensor:
        demand, self.demand_E = self.demand_E, torch.zeros_like(self.demand_E)
        return demand


def _dynamic_layers(model: Any) -> list[tuple[int, DynamicRouting]]:
    return [
        (block, layer.dynamic)
        for block, layer in model.moe_layers()
        if getattr(layer, "dynamic", None) is not None
    ]


def set_sample_ids(model: Any, sample_ids_B: Tensor | None) -> None:
    """Tell every dynamic layer which samples the next forward's rows are."""
    ids = None if sample_ids_B is None else [int(i) for i in sample_ids_B.tolist()]
    for _, dynamic in _dynamic_layers(model):
        dynamic.sample_ids = ids


def end_dynamic_step(model: Any, group: dist.ProcessGroup | None = None) -> int:
    """Sum every dynamic layer's demand of this step over `group` (one all-reduce; None:
    this process alone) and let each controller observe it. Returns the rebuilds of
    this step (bucket-vector changes, over layers). Every rank of `group` must call it."""
    layers = [(block, d) for block, d in _dynamic_layers(model) if d.tokens > 0]
    if not layers:
        return 0
    demand_LE = torch.stack([dynamic.take_demand() for _, dynamic in layers])
    if group is not None and dist.get_world_size(group=group) > 1:
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
        buffer = demand_LE.to(device) if device is not None else demand_LE
        dist.all_reduce(buffer, group=group)
        demand_LE = buffer.cpu()
    rebuilds = 0
    for (_, dynamic), demand_E in zip(layers, demand_LE):
        rebuilds += int(dynamic.controller.observe(demand_E, dynamic.tokens))
    return rebuilds


def dynamic_state(model: Any, with_cache: bool = True) -> dict[str, Any]:
    """Every dynamic layer's controller state and (`with_cache`) its assignment cache, by
    block ({} without dynamic layers): what a checkpoint keeps so that a resumed run
    continues the same capacities. The controllers are the same on every rank; the
    caches are per rank (the trainer keeps them only in a single-process run)."""
    state: dict[str, Any] = {}
    for block, dynamic in _dynamic_layers(model):
        cache = dynamic.cache.state_dict() if with_cache and dynamic.cache is not None else None
        state[str(block)] = {"controller": dynamic.controller.state_dict(), "cache": cache}
    return state


def load_dynamic_state(model: Any, state: dict[str, Any]) -> None:
    """Restore `dynamic_state`'s output into the model's dynamic layers (ValueError when
    the blocks differ; a missing cache state leaves that cache empty)."""
    layers = dict(_dynamic_layers(model))
    if sorted(state) != sorted(str(block) for block in layers):
        raise ValueError(
            f"DynaMoE state for blocks {sorted(state)}; this model's dynamic blocks are "
            f"{sorted(str(block) for block in layers)}"
        )
    for block, dynamic in layers.items():
        layer_state = state[str(block)]
        dynamic.controller.load_state_dict(layer_state["controller"])
        if dynamic.cache is not None and layer_state.get("cache") is not None:
            dynamic.cache.load_state_dict(layer_state["cache"])


def start_dynamic(model: Any, num_tokens: int) -> None:
    """Every dynamic layer takes `num_tokens` (T of one training forward on one rank) as
    its reference, before the first forward (see the module docstring)."""
    for _, dynamic in _dynamic_layers(model):
        dynamic.controller.start(num_tokens)


def bucket_key(model: Any) -> tuple[int, ...]:
    """Every dynamic layer's padded rows P: the key a compiled step is cached under (the
    only shapes the capacities set; 0 before the reference T is known)."""
    return tuple(dynamic.controller.padded_rows for _, dynamic in _dynamic_layers(model))


def dynamic_scalars(model: Any) -> dict[str, float]:
    """Metrics since the last call: rebuilds (total so far), cache hit rate, padded rows
    the experts processed per forward, and whether the buckets froze."""
    layers = _dynamic_layers(model)
    if not layers:
        return {}
    out: dict[str, float] = {}
    hits = lookups = 0
    rows = forwards = 0
    for block, dynamic in layers:
        controller = dynamic.controller
        out[f"dynamic/layer{block}/rebuilds"] = float(controller.rebuilds)
        out[f"dynamic/layer{block}/reshuffles"] = float(controller.reshuffles)
        if controller.bucket_vector is not None:
            out[f"dynamic/layer{block}/capacity_sum"] = float(sum(controller.bucket_vector))
        if dynamic.cache is not None:
            layer_hits, layer_lookups = dynamic.cache.take_counts()
            hits, lookups = hits + layer_hits, lookups + layer_lookups
        layer_rows, layer_forwards = dynamic.take_row_counts()
        rows, forwards = rows + layer_rows, forwards + layer_forwards
    out["dynamic/rebuilds"] = float(sum(d.controller.rebuilds for _, d in layers))
    out["dynamic/reshuffles"] = float(sum(d.controller.reshuffles for _, d in layers))
    out["dynamic/frozen"] = float(any(d.controller.frozen for _, d in layers))
    out["dynamic/processed_rows_per_forward"] = rows / max(forwards, 1)
    if lookups:
        out["dynamic/cache_hit_rate"] = hits / lookups
    return out
