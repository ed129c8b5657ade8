"""What a serving process holds: experts per layer, weight bytes, resident memory."""

from __future__ import annotations

from typing import Any

import psutil
from torch import nn

from moe.experts import expert_modules
from moe.inference import LoadedModel


def state_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (int8 experts keep their weights in buffers)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def describe_model(loaded: LoadedModel) -> dict[str, Any]:
    """The experts this process holds per MoE layer (global ids) and its weight bytes,
    split into experts and the dense rest (embeddings, attention, norms, routers)."""
    model = loaded.model
    experts = expert_modules(model)
    expert_bytes = sum(state_bytes(module) for _, module in experts)
    return {
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "precision": loaded.precision.precision.value,
        "experts": {name: list(module.expert_ids) for name, module in experts},
        "weight_bytes": state_bytes(model),
        "expert_bytes": expert_bytes,
        "dense_bytes": state_bytes(model) - expert_bytes,
        "task_ids": loaded.task_ids,
        "context_bytes": model.config.max_seq_len,
        "needs_task": bool(model.routing is not None and model.routing.needs_task_ids),
    }


def resident_bytes() -> int:
    """This process's resident set size."""
    return int(psutil.Process().memory_info().rss)
