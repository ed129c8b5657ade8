"""The distillation loss (Hinton et al. 2015), over the N = B*T positions of a batch:

    L = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + alpha * CE(y, z_student)

with the KL summed over the vocabulary and averaged over positions; the temperature
divides both sides' logits, and T^2 keeps the soft term's gradients at the scale of the
hard one as T changes. `check_loss_settings` is the one validation of T and alpha.

Legend: N positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


def check_loss_settings(temperature: float, alpha: float) -> None:
    """ValueError naming `distill.temperature` (> 0) or `distill.alpha` (>= 0)."""
    if not temperature > 0:
        raise ValueError(f"distill.temperature={temperature} is invalid; accepted: > 0")
    if not alpha >= 0:
        raise ValueError(f"distill.alpha={alpha} is invalid; accepted: >= 0")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T)).

    Logits [..., V] (any leading shape, the same on both sides); computed in float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; the vocabularies must match"
        )
    vocab = student_logits.shape[-1]
    log_q_NV = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    log_p_NV = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(log_q_NV, log_p_NV, reduction="batchmean", log_target=True)
    return temperature**2 * kl


@dataclass(frozen=True)
class DistillLoss:
    """loss = kd + alpha * ce; kd: the T^2-scaled KL term; ce: the student's next-token
    cross entropy against the labels (nats)."""

    loss: Tensor
    kd: Tensor
    ce: Tensor


def distillation_loss(
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    targets_BT: Tensor,
    temperature: float,
    alpha: float,
) -> DistillLoss:
    """Hinton et al.'s loss (module docstring); the teacher's logits carry no gradient."""
    kd = kd_loss(student_logits_BTV, teacher_logits_BTV.detach(), temperature)
    ce = F.cross_entropy(student_logits_BTV.flatten(0, 1).float(), targets_BT.flatten())
    return DistillLoss(loss=kd + alpha * ce, kd=kd, ce=ce)
