"""What a capacity policy with state offers: the protocol between such a policy, the MoE
layer that routes with it, and the training loop that drives it.

A stateless policy (fixed, priority, dropless capacity) is a function of one batch
(`routing.apply_capacity`). A stateful one (DynaMoE's controller and assignment cache)
learns from the steps it has seen. Two levels:

- `CapacityState`, one per MoE layer: the layer hands it the router's plan and gets the
  capacity-applied plan back (`route`); `routing.build_capacity_state` builds it from the
  config (None for stateless policies).
- `PolicyState`, one per model and policy: what the training loop calls. The loop
  (and the compiled step, and checkpointing) talk only to this protocol, never to a
  policy by name; `model_policy_state` combines the states of a model's layers.

The loop's calls, in order: `before_forward(sample_ids_B, num_tokens)` before every
training forward; `end_step(all_reduce)` after each optimizer step on every rank
(`all_reduce` sums a tensor over the run's ranks, or is None in a one-process run);
`scalars()` when it logs; `state_dict(per_rank=...)` / `load_state_dict` with
checkpoints; `compile_key()` before every compiled call (the shapes the state sets) and
`compile_notes()` once when a compiled step is built.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from routing.config import CapacityKind, RoutingConfig
from routing.plan import RoutingPlan

# Sums a tensor over every rank of the run (in place or not; the sum is returned).
AllReduce = Callable[[Tensor], Tensor]


class PolicyState(Protocol):
    """A model's stateful routing, as the training loop sees it (module docstring)."""

    def before_forward(self, sample_ids_B: Tensor | None, num_tokens: int) -> None:
        """The next training forward's samples (ids, one per sequence) and tokens T."""
        ...

    def end_step(self, all_reduce: AllReduce | None) -> int:
        """After an optimizer step, on every rank: learn from the step; returns the
        shape changes (rebuilds) it caused."""
        ...

    def scalars(self) -> dict[str, float]:
        """Metrics since the last call, named `<policy>/...`."""
        ...

    def state_dict(self, per_rank: bool) -> dict[str, Any]:
        """What a checkpoint keeps; `per_rank`: include state that differs between ranks
        (only meaningful when one process holds the whole run)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def compile_key(self) -> Hashable:
        """The shapes this state fixes: a compiled step is cached under this key."""
        ...

    def compile_notes(self) -> list[str]:
        """What a person should know when this model's step is compiled."""
        ...


@runtime_checkable
class CapacityState(Protocol):
    """One MoE layer's stateful capacity policy. `name`: the policy's name, which
    prefixes its metrics and keys its state in checkpoints."""

    name: str

    def route(self, plan: RoutingPlan, num_samples: int, training: bool) -> RoutingPlan:
        """The router's plan (every slot kept) -> the capacity-applied plan."""
        ...

    @staticmethod
    def policy_state(layers: Sequence[tuple[int, Any]]) -> PolicyState:
        """The model-level state over (block index, this kind of state) pairs."""
        ...


class NoPolicyState:
    """A model without stateful routing: every call does nothing."""

    def before_forward(self, sample_ids_B: Tensor | None, num_tokens: int) -> None:
        return None

    def end_step(self, all_reduce: AllReduce | None) -> int:
        return 0

    def scalars(self) -> dict[str, float]:
        return {}

    def state_dict(self, per_rank: bool) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                f"the checkpoint holds routing state for {sorted(state)} but this model "
                "routes without state (its routing.capacity differs from the checkpoint's)"
            )

    def compile_key(self) -> Hashable:
        return None

    def compile_notes(self) -> list[str]:
        return []


class CombinedPolicyState:
    """Several policies' states in one model, each under its own name."""

    def __init__(self, parts: dict[str, PolicyState]) -> None:
        self.parts = parts

    def before_forward(self, sample_ids_B: Tensor | None, num_tokens: int) -> None:
        for part in self.parts.values():
            part.before_forward(sample_ids_B, num_tokens)

    def end_step(self, all_reduce: AllReduce | None) -> int:
        return sum(part.end_step(all_reduce) for part in self.parts.values())

    def scalars(self) -> dict[str, float]:
        return {k: v for part in self.parts.values() for k, v in part.scalars().items()}

    def state_dict(self, per_rank: bool) -> dict[str, Any]:
        return {name: part.state_dict(per_rank) for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state) != sorted(self.parts):
            raise ValueError(
                f"the checkpoint holds routing state for {sorted(state)}; this model's "
                f"stateful routing is {sorted(self.parts)}"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state[name])

    def compile_key(self) -> Hashable:
        return tuple(part.compile_key() for part in self.parts.values())

    def compile_notes(self) -> list[str]:
        return [note for part in self.parts.values() for note in part.compile_notes()]


def model_policy_state(layers: Sequence[tuple[int, CapacityState | None]]) -> PolicyState:
    """The `PolicyState` of a model from its MoE layers' capacity states ((block index,
    state or None) pairs): the layers are grouped by their state's kind, each kind builds
    its own model-level state; a model without any gets `NoPolicyState`."""
    kinds: dict[str, tuple[Any, list[tuple[int, Any]]]] = {}
    for block, state in layers:
        if state is not None:
            kind = type(state)
            kinds.setdefault(state.name, (kind, []))[1].append((block, state))
    if not kinds:
        return NoPolicyState()
    parts = {name: kind.policy_state(members) for name, (kind, members) in kinds.items()}
    return CombinedPolicyState(parts)


def build_capacity_state(num_experts: int, config: RoutingConfig) -> CapacityState | None:
    """The per-layer state of `config`'s capacity policy (None: the policy has none)."""
    if CapacityKind(config.capacity) == CapacityKind.DYNAMIC:
        from routing.dynamic.state import DynamicRouting

        return DynamicRouting(num_experts, config)
    return None
