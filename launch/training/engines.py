"""Who turns gradients into updates: the plain-torch engine (and the protocol that the
optional DeepSpeed engine in `launch.training.deepspeed` also follows).

One optimizer step is `begin_step(lr)`, then `backward(loss)` once per micro-batch with
that micro-batch's loss, then `finish_step()`, which reduces the gradients over the
ranks, clips them by their global norm and updates the weights.

Precision (`moe.precision`): the engines' parameters are the fp32 master weights; the
loop runs the forward under the run's autocast. With fp16 the torch engine scales the
loss (`launch.training.loss_scaling`): the gradients are reduced scaled, then unscaled in
fp32 before the norm, the clipping and the update, and an overflowing step is skipped.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from launch.config import TrainConfig, TrainingEngineKind
from launch.runtime import Runtime
from launch.training.gradients import reduce_gradients
from launch.training.loss_scaling import DynamicLossScaler, skip_step_if_overflow
from launch.training.optim import (
    build_optimizer,
    clip_gradients,
    global_grad_norm,
    set_learning_rate,
    split_parameters,
)
from moe.precision import FULL_PRECISION, ResolvedPrecision


class TrainingEngine(Protocol):
    """The optimizer side of the training loop."""

    module: nn.Module  # call this for the forward pass

    def begin_step(self, lr: float) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def gradient_scale(self) -> float | torch.Tensor:
        """The factor the gradients carry between the backwards and `finish_step` (what
        the pruning state's SR-STE term is multiplied by): fp16's loss scale (a 0-dim
        tensor on the device), 1.0 otherwise."""
        ...

    def finish_step(self) -> float | torch.Tensor:
        """Update the weights; returns the global gradient norm before clipping (a
        0-dim tensor where reading it would stall the step: the loop reads it when it
        logs)."""
        ...

    def optimizer_state(self) -> dict[str, Any]: ...

    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...

    def scalars(self) -> dict[str, float]:
        """What the loop logs besides the losses (fp16: the loss scale and the skipped
        steps); read at log time."""
        ...


class TorchEngine:
    """AdamW with dense and expert parameter groups, `launch.training.gradients.reduce_gradients`,
    and clipping by the norm over every rank's experts."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        runtime: Runtime,
        precision: ResolvedPrecision = FULL_PRECISION,
        loss_scaler: DynamicLossScaler | None = None,
    ) -> None:
        """`loss_scaler`: the fp16 scaler (default: one when `precision` needs it)."""
        self.module = model
        self.config = config
        self.runtime = runtime
        self.optimizer = build_optimizer(model, config)
        self.split = split_parameters(model)
        if loss_scaler is None and precision.loss_scaling:
            loss_scaler = DynamicLossScaler(runtime.device)
        self.loss_scaler = loss_scaler

    def begin_step(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.config.grad_accum
        if self.loss_scaler is not None:
            loss = self.loss_scaler.scale(loss)
        loss.backward()

    def gradient_scale(self) -> float | torch.Tensor:
        return self.loss_scaler.current_scale() if self.loss_scaler is not None else 1.0

    def finish_step(self) -> torch.Tensor:
        groups = self.runtime.groups
        if groups is not None:
            reduce_gradients(self.module, groups)
        if self.loss_scaler is not None:
            params = self.split.dense + self.split.dense_no_decay + self.split.expert
            self.loss_scaler.unscale_([p.grad for p in params if p.grad is not None])
        norm = global_grad_norm(self.split, groups.ep if groups else None, self.runtime.ep_size)
        if self.loss_scaler is not None:
            skip_step_if_overflow(self.optimizer, self.loss_scaler.update(norm))
        clip_gradients(self.split, self.config.grad_clip, norm)
        self.optimizer.step()
        return norm

    def optimizer_state(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        if self.loss_scaler is not None:
            state = {**state, "loss_scaler": self.loss_scaler.state_dict()}
        return state

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        scaler_state = state.pop("loss_scaler", None)
        if self.loss_scaler is not None and scaler_state is not None:
            self.loss_scaler.load_state_dict(scaler_state)
        self.optimizer.load_state_dict(state)

    def scalars(self) -> dict[str, float]:
        return self.loss_scaler.scalars() if self.loss_scaler is not None else {}


def build_engine(
    model: nn.Module,
    config: TrainConfig,
    runtime: Runtime,
    precision: ResolvedPrecision = FULL_PRECISION,
) -> TrainingEngine:
    if config.engine == TrainingEngineKind.DEEPSPEED:
        from launch.training.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, config, runtime, precision)
    return TorchEngine(model, config, runtime, precision)
