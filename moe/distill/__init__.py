"""Distillation of an MoE teacher into a dense student: the loss (`loss`) and the
student's shape and initialisation from the teacher's experts (`student`). The run
itself is a training run with another objective (`launch.training.distillation`)."""

from moe.distill.loss import DistillLoss, check_loss_settings, distillation_loss, kd_loss
from moe.distill.student import (
    StudentInit,
    check_init,
    combine_experts,
    default_width,
    initialise_student,
    student_config,
    usage_order,
)

__all__ = [
    "DistillLoss",
    "StudentInit",
    "check_init",
    "check_loss_settings",
    "combine_experts",
    "default_width",
    "distillation_loss",
    "initialise_student",
    "kd_loss",
    "student_config",
    "usage_order",
]
