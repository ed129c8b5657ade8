"""DynaMoE's state (`routing.capacity=dynamic`): per layer, what the MoE layer routes
with; per model, what the training loop drives (the `routing.state` protocols).

- `DynamicRouting` (one per layer, a `CapacityState`): the capacity controller
  (`routing.dynamic.controller`), the optional assignment cache
  (`routing.dynamic.cache`), and this step's demand (slots per expert before capacity,
  training forwards only). Its plans carry per-expert capacities (`capacity_E`) and
  their sum P (`padded_rows`); the layer lays rows out padded to them, expert e's rows
  starting at sum(capacity[:e]). The experts and the all-to-all therefore see P rows,
  and, since every rank holds the same controller state, the all-to-all split sizes are
  known on every rank: the split-size exchange is skipped. The capacities reach the
  layer as a tensor (the controller's `capacity_E`, updated in place) and P as an int:
  under `torch.compile` only P is baked into the graph, so a reshuffle (new capacities,
  same P) reuses the compiled step and only a rebuild (new P) compiles a new one.
- `DynamicPolicyState` (one per model, a `PolicyState`): before a training forward it
  sets the samples (the cache's keys) and fixes the training T on the first call (so a
  compiled step does not compile its first graph twice); after each optimizer step one
  all-reduce of every layer's demand (all ranks of the run, so every rank keeps the
  same capacities), then each controller observes it; its compile key is every layer's
  P; its checkpoint state is every layer's controller and (one-process runs) cache.

Shapes: T tokens, K experts per token, E experts, B samples, S tokens per sample, N = T*K
slots, P padded rows (sum of the capacities).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from routing.capacity import apply_expert_capacities
from routing.config import RoutingConfig
from routing.dynamic.cache import AssignmentCache
from routing.dynamic.controller import DynamicCapacityController, reassign
from routing.plan import RoutingPlan
from routing.state import AllReduce, PolicyState

# Compiled runs recompile at every change of P: below this interval that is often.
COMPILE_MIN_REBUILD_INTERVAL = 50


class DynamicRouting:
    """A layer's DynaMoE state (see the module docstring)."""

    name = "dynamic"

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

    @staticmethod
    def policy_state(layers: Sequence[tuple[int, Any]]) -> PolicyState:
        return DynamicPolicyState(layers)

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
        # compiled step routes every sample through the router (compile_notes says so).
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


class DynamicPolicyState:
    """Every DynaMoE layer of a model, as the training loop drives them (see the module
    docstring). `layers`: (block index, `DynamicRouting`) pairs."""

    def __init__(self, layers: Sequence[tuple[int, DynamicRouting]]) -> None:
        self.layers = list(layers)

    def before_forward(self, sample_ids_B: Tensor | None, num_tokens: int) -> None:
        ids = None if sample_ids_B is None else [int(i) for i in sample_ids_B.tolist()]
        for _, dynamic in self.layers:
            dynamic.sample_ids = ids
            dynamic.controller.start(num_tokens)  # a no-op once T is known

    def end_step(self, all_reduce: AllReduce | None) -> int:
        """Sum every layer's demand of this step over the ranks (one all-reduce) and let
        each controller observe it; returns the rebuilds of this step."""
        layers = [(block, d) for block, d in self.layers if d.tokens > 0]
        if not layers:
            return 0
        demand_LE = torch.stack([dynamic.take_demand() for _, dynamic in layers])
        if all_reduce is not None:
            demand_LE = all_reduce(demand_LE).to("cpu", torch.int64)
        rebuilds = 0
        for (_, dynamic), demand_E in zip(layers, demand_LE):
            rebuilds += int(dynamic.controller.observe(demand_E, dynamic.tokens))
        return rebuilds

    def scalars(self) -> dict[str, float]:
        """Since the last call: rebuilds and reshuffles (totals so far), cache hit rate,
        padded rows the experts processed per forward, and whether the buckets froze."""
        out: dict[str, float] = {}
        hits = lookups = rows = forwards = 0
        for block, dynamic in self.layers:
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
        controllers = [d.controller for _, d in self.layers]
        out["dynamic/rebuilds"] = float(sum(c.rebuilds for c in controllers))
        out["dynamic/reshuffles"] = float(sum(c.reshuffles for c in controllers))
        out["dynamic/frozen"] = float(any(c.frozen for c in controllers))
        out["dynamic/processed_rows_per_forward"] = rows / max(forwards, 1)
        if lookups:
            out["dynamic/cache_hit_rate"] = hits / lookups
        return out

    def state_dict(self, per_rank: bool) -> dict[str, Any]:
        """Every layer's controller state (the same on every rank) and, with `per_rank`,
        its assignment cache, by block."""
        state: dict[str, Any] = {}
        for block, dynamic in self.layers:
            cache = dynamic.cache.state_dict() if per_rank and dynamic.cache is not None else None
            state[str(block)] = {"controller": dynamic.controller.state_dict(), "cache": cache}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`'s output (ValueError when the blocks differ; a missing
        cache state leaves that cache empty)."""
        layers = {str(block): dynamic for block, dynamic in self.layers}
        if sorted(state) != sorted(layers):
            raise ValueError(
                f"DynaMoE state for blocks {sorted(state)}; this model's dynamic blocks are "
                f"{sorted(layers)}"
            )
        for block, dynamic in layers.items():
            dynamic.controller.load_state_dict(state[block]["controller"])
            if dynamic.cache is not None and state[block].get("cache") is not None:
                dynamic.cache.load_state_dict(state[block]["cache"])

    def compile_key(self) -> Hashable:
        """Every layer's padded rows P (0 before the training T is known)."""
        return tuple(dynamic.controller.padded_rows for _, dynamic in self.layers)

    def compile_notes(self) -> list[str]:
        notes = []
        if any(dynamic.cache is not None for _, dynamic in self.layers):
            notes.append(
                "the DynaMoE assignment cache is host-side and runs eagerly only: this "
                "compiled run routes every sample through the router "
                "(routing.cache_max_entries has no effect)"
            )
        intervals = [dynamic.controller.rebuild_interval for _, dynamic in self.layers]
        if intervals and min(intervals) < COMPILE_MIN_REBUILD_INTERVAL:
            notes.append(
                f"routing.dynamic_rebuild_interval={min(intervals)}: every change of the "
                "padded rows recompiles the step (about 20 s on the demo); compiled runs "
                f"warm up with {COMPILE_MIN_REBUILD_INTERVAL} or more (docs/TRAINING.md)"
            )
        return notes
