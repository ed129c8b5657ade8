"""What an inference engine did and holds, for a server's metrics.

`EngineMeter` is the engine's side: after every model call it adds, on the device and
without a host sync, the token-slots each MoE layer kept per expert and the slots it
dropped (from the layers' `RoutingStats`; after a compiled decode call, whose padding
rows are routed too, from the experts its live rows chose), and after every step the
seconds the layers' all-to-alls took (expert parallelism; 0 otherwise). `take()` copies them to the host once, resets them,
and returns an `EngineTelemetry`: plain data (it travels from expert-parallel workers to
their replica and from replicas to the gateway) holding counters since the previous
`take()` and gauges as they are now. `accumulate` folds such deltas into running
totals; `summed` and `of_ranks` add up the telemetry of several engines.

Expert ids are global (a task subset or an expert-parallel rank reports the experts of
the whole model it routes over); layers are block indices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from moe.transformer import MoETransformer

# Counted since the previous take (added up over time), and gauges (the latest wins over
# time; the parts of one step add up across ranks).
_COUNTERS = ("steps", "model_tokens", "prompt_tokens", "generated_tokens", "alltoall_seconds")
_GAUGES = ("running", "waiting", "slots_in_use", "slots_total", "kv_tokens", "kv_capacity")


@dataclass
class EngineTelemetry:
    """Counters (see the module docstring): `steps` model calls, `model_tokens` tokens
    through the model (prefills, decodes, re-prefills), `prompt_tokens` prompt tokens
    admitted, `generated_tokens` tokens sampled, `expert_tokens` block -> kept
    token-slots per expert, `dropped_slots` block -> slots the capacity policy dropped,
    `alltoall_seconds` time in the MoE all-to-alls. Gauges: `running` and `waiting`
    sequences, KV-cache `slots_in_use` of `slots_total`, and `kv_tokens` positions held
    of `kv_capacity`."""

    steps: int = 0
    model_tokens: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    alltoall_seconds: float = 0.0
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)
    dropped_slots: dict[int, int] = field(default_factory=dict)
    running: int = 0
    waiting: int = 0
    slots_in_use: int = 0
    slots_total: int = 0
    kv_tokens: int = 0
    kv_capacity: int = 0

    def copy(self) -> EngineTelemetry:
        return replace(
            self, expert_tokens={b: list(c) for b, c in self.expert_tokens.items()},
            dropped_slots=dict(self.dropped_slots),
        )  # fmt: skip

    def accumulate(self, delta: EngineTelemetry) -> None:
        """Add `delta`'s counters to these; take its gauges."""
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(delta, name))
        _add_per_layer(self, delta)
        for name in _GAUGES:
            setattr(self, name, getattr(delta, name))

    @classmethod
    def summed(cls, parts: Iterable[EngineTelemetry]) -> EngineTelemetry:
        """Every counter and gauge added up (engines that step on their own: replicas)."""
        total = cls()
        for part in parts:
            for name in _COUNTERS + _GAUGES:
                setattr(total, name, getattr(total, name) + getattr(part, name))
            _add_per_layer(total, part)
        return total

    @classmethod
    def of_ranks(cls, parts: Iterable[EngineTelemetry]) -> EngineTelemetry:
        """The expert-parallel ranks of one model, stepped together: tokens, sequences
        and slots add up; `steps` and `alltoall_seconds` are each rank's (the ranks step
        in lockstep): the most steps, the mean all-to-all time."""
        parts = list(parts)
        total = cls.summed(parts)
        if parts:
            total.steps = max(part.steps for part in parts)
            total.alltoall_seconds /= len(parts)
        return total


def _add_per_layer(total: EngineTelemetry, part: EngineTelemetry) -> None:
    for block, counts in part.expert_tokens.items():
        mine = total.expert_tokens.setdefault(block, [0] * len(counts))
        total.expert_tokens[block] = [a + b for a, b in zip(mine, counts)]
    for block, dropped in part.dropped_slots.items():
        total.dropped_slots[block] = total.dropped_slots.get(block, 0) + dropped


class EngineMeter:
    """The engine's accumulators (see the module docstring): one float64 buffer on the
    model's device holding, per MoE layer, its experts' kept slots and its dropped slots
    (whole numbers, exact in float64 far beyond any count a server reaches), so that
    `take()` copies them to the host in one transfer."""

    def __init__(self, model: MoETransformer) -> None:
        self.model = model
        self.layers = model.moe_layers()
        self._spans: list[tuple[int, int, int]] = []  # (block, first expert slot, experts)
        size = 0
        for block, layer in self.layers:
            self._spans.append((block, size, layer.num_experts))
            size += layer.num_experts + 1  # the experts, then the dropped slots
        self._buffer = torch.zeros(size, dtype=torch.float64, device=model.embed.weight.device)
        self.counts = EngineTelemetry()

    def record_step(self, model_tokens: int, prompt_tokens: int, generated_tokens: int) -> None:
        """After a step whose model calls carried `model_tokens` tokens."""
        self.counts.steps += 1
        self.counts.model_tokens += model_tokens
        self.counts.prompt_tokens += prompt_tokens
        self.counts.generated_tokens += generated_tokens
        self.counts.alltoall_seconds += self.model.take_comm_time()

    def record_routing(self, model_tokens: int) -> None:
        """After a model call over `model_tokens` tokens, all of them live: the layers'
        routing stats (0 tokens: an expert-parallel rank with nothing to do, whose
        layers saw no token)."""
        if model_tokens == 0:
            return
        for (_, first, experts), (_, layer) in zip(self._spans, self.layers):
            stats = layer.last_stats
            if stats is None:
                continue
            self._buffer[first : first + experts] += stats.tokens_per_expert_E.double()
            slots = model_tokens * layer.routing.top_k
            self._buffer[first + experts] += stats.dropped_fraction.double() * slots

    def record_routed(self, expert_ids: list[torch.Tensor]) -> None:
        """After a dropless call whose live rows chose `expert_ids` ([rows, K] global ids
        per MoE layer, in block order): each expert's slots (none dropped). One
        `index_add_` for every layer (a `bincount` per layer costs more than the rest of
        a compiled decode step's bookkeeping)."""
        if not expert_ids:
            return
        slots = torch.cat([
            ids.reshape(-1) + first
            for (_, first, _), ids in zip(self._spans, expert_ids, strict=True)
        ])  # fmt: skip
        self._buffer.index_add_(0, slots, torch.ones_like(slots, dtype=self._buffer.dtype))

    def take(self, **gauges: int) -> EngineTelemetry:
        """The counters since the last take, with `gauges` (the `_GAUGES` fields)."""
        values = self._buffer.tolist()
        self._buffer.zero_()
        taken, self.counts = self.counts, EngineTelemetry()
        for block, first, experts in self._spans:
            taken.expert_tokens[block] = [round(v) for v in values[first : first + experts]]
            taken.dropped_slots[block] = round(values[first + experts])
        for name, value in gauges.items():
            if name not in _GAUGES:
                raise ValueError(f"{name} is not a gauge; accepted: {', '.join(_GAUGES)}")
            setattr(taken, name, value)
        return taken
