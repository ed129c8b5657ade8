"""What a training run minimises: the objective that the trainer loop takes.

`launch.training.loop.run_training` is the one training loop (batches, LR schedule, gradient
accumulation, reduction and clipping, evaluation, checkpoints, resumption, tracking);
what it backpropagates comes from an `Objective`:

- `LanguageModelling`: next-token cross entropy plus the MoE layers' routing losses
  (`launch.train`).
- `Distillation`: Hinton et al.'s knowledge distillation from a frozen teacher
  (`launch.distill`; the loss is `moe.distill.loss.distillation_loss`). The teacher is not a
  parameter of the trained model: the engine and its optimizer never see it, it runs in
  eval mode under `no_grad`, and when the run is expert-parallel its experts are sharded
  over the EP group like a training model's (every rank calls it in lockstep, which the
  loop guarantees: every rank runs every micro-batch).

Legend: B batch rows, T positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from moe.distill import check_loss_settings, distillation_loss
from moe.transformer import ModelOutput, MoETransformer, lm_loss


@dataclass(frozen=True)
class StepLoss:
    """One micro-batch's loss. `loss`: what to backpropagate; `ce`: the trained model's
    next-token cross entropy (nats; `train_loss` in metrics.jsonl); `terms`: more scalars,
    logged as `train/<name>` and recorded in metrics.jsonl under their name."""

    loss: Tensor
    ce: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class TrainedModel(Protocol):
    """What an objective calls: the trained model as the loop runs it (the engine's
    module, or the `CompiledStep` in front of it): tokens and task ids in, its output out."""

    def __call__(self, tokens_BT: Tensor, task_ids: Tensor | None, /) -> ModelOutput: ...


class Objective(Protocol):
    """What the trainer loop minimises (see the module docstring)."""

    # The loop's name in logs and progress bars ("train", "distill").
    name: str

    def __call__(
        self, model: TrainedModel, inputs_BT: Tensor, targets_BT: Tensor, task_ids_B: Tensor
    ) -> StepLoss:
        """The loss of `model` (the engine's module: the trained model) on one micro-batch."""
        ...

    def routed_model(self, model: MoETransformer) -> MoETransformer:
        """The model whose MoE layers the loop monitors (expert load, routing statistics,
        MoE-layer and all-to-all time)."""
        ...

    def config_record(self) -> dict[str, Any]:
        """Plain-JSON settings of the objective: merged into the run config that
        checkpoints and wandb record, and compared when a run resumes."""
        ...


class LanguageModelling:
    """Next-token cross entropy + the model's routing losses (`moe.transformer.lm_loss`)."""

    name = "train"

    def __call__(
        self, model: TrainedModel, inputs_BT: Tensor, targets_BT: Tensor, task_ids_B: Tensor
    ) -> StepLoss:
        losses = lm_loss(model(inputs_BT, task_ids_B), targets_BT)
        return StepLoss(loss=losses.loss, ce=losses.ce)

    def routed_model(self, model: MoETransformer) -> MoETransformer:
        return model

    def config_record(self) -> dict[str, Any]:
        return {}


class Distillation:
    """`T^2 KL(teacher || student at temperature T) + alpha CE(labels, student)` (+ the
    student's own routing losses, zero for a dense student) against a frozen `teacher`.

    The constructor freezes the teacher (eval mode, `requires_grad=False`); its logits
    are computed under `no_grad`, so no gradient and no optimizer state ever reach it.
    `record`: the settings to store with the run (teacher checkpoint, `distill` group)."""

    name = "distill"

    def __init__(
        self, teacher: MoETransformer, temperature: float, alpha: float, record: dict[str, Any]
    ) -> None:
        check_loss_settings(temperature, alpha)
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha
        self.record = record

    def __call__(
        self, model: TrainedModel, inputs_BT: Tensor, targets_BT: Tensor, task_ids_B: Tensor
    ) -> StepLoss:
        with torch.no_grad():
            teacher_logits_BTV = self.teacher(inputs_BT, task_ids_B).logits_BTV
        output = model(inputs_BT, task_ids_B)
        losses = distillation_loss(
            output.logits_BTV, teacher_logits_BTV, targets_BT, self.temperature, self.alpha
        )
        return StepLoss(
            loss=losses.loss + output.aux_loss, ce=losses.ce, terms={"kd_loss": losses.kd}
        )

    def routed_model(self, model: MoETransformer) -> MoETransformer:
        return self.teacher

    def config_record(self) -> dict[str, Any]:
        return self.record
