"""Who turns gradients into updates: the plain-torch engine (and the protocol that the
optional DeepSpeed engine in `launch.training.deepspeed` also follows).

One optimizer step is `begin_step(lr)`, then `backward(loss)` once per micro-batch with
that micro-batch's loss, then `finish_step()`, which reduces the gradients over the
ranks, clips them by their global norm and updates the weights.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from launch.config import TrainConfig, TrainingEngineKind
from launch.runtime import Runtime
from launch.training.gradients import reduce_gradients
from launch.training.optim import (
    build_optimizer,
    clip_gradients,
    global_grad_norm,
    set_learning_rate,
    split_parameters,
)


class TrainingEngine(Protocol):
    """The optimizer side of the training loop."""

    module: nn.Module  # call this for the forward pass

    def begin_step(self, lr: float) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def finish_step(self) -> float | torch.Tensor:
        """Update the weights; returns the global gradient norm before clipping (a
        0-dim tensor where reading it would stall the step: the loop reads it when it
        logs)."""
        ...

    def optimizer_state(self) -> dict[str, Any]: ...

    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...


class TorchEngine:
    """AdamW with dense and expert parameter groups, `launch.training.gradients.reduce_gradients`,
    and clipping by the norm over every rank's experts."""

    def __init__(self, model: nn.Module, config: TrainConfig, runtime: Runtime) -> None:
        self.module = model
        self.config = config
        self.runtime = runtime
        self.optimizer = build_optimizer(model, config)
        self.split = split_parameters(model)

    def begin_step(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.config.grad_accum).backward()

    def finish_step(self) -> torch.Tensor:
        groups = self.runtime.groups
        if groups is not None:
            reduce_gradients(self.module, groups)
        norm = global_grad_norm(self.split, groups.ep if groups else None, self.runtime.ep_size)
        clip_gradients(self.split, self.config.grad_clip, norm)
        self.optimizer.step()
        return norm

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def build_engine(model: nn.Module, config: TrainConfig, runtime: Runtime) -> TrainingEngine:
    if config.engine == TrainingEngineKind.DEEPSPEED:
        from launch.training.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, config, runtime)
    return TorchEngine(model, config, runtime)
