"""Optimizer, learning-rate schedule and gradient handling under expert parallelism.

Parameters fall in two kinds. Dense parameters (attention, norms, embeddings, routers,
dense and residual MLPs) are replicated on every rank; expert parameters
(`moe.experts.Experts`) live on one EP rank per EP group. `launch.training.gradients.reduce_gradients`
averages each kind over the right ranks; this module adds the optimizer groups, the LR
schedule and clipping by the global norm.

The global gradient norm (for clipping) counts each dense gradient once and each expert
gradient once: dense squares are the same on every rank, expert squares are summed over
the EP group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from launch.config import TrainConfig
from moe.experts import expert_parameter_ids


@dataclass(frozen=True)
class ParamSplit:
    """The model's parameters by kind (each list in `named_parameters` order)."""

    dense: list[nn.Parameter]
    expert: list[nn.Parameter]
    dense_no_decay: list[nn.Parameter]


def split_parameters(model: nn.Module) -> ParamSplit:
    """Expert parameters are those of the expert stacks (`moe.experts.Experts`); dense
    1-D parameters (norm gains) and embeddings get no weight decay."""
    expert_ids = expert_parameter_ids(model)
    dense, expert, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in expert_ids:
            expert.append(param)
        elif param.dim() < 2 or name.startswith("embed."):
            no_decay.append(param)
        else:
            dense.append(param)
    return ParamSplit(dense=dense, expert=expert, dense_no_decay=no_decay)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: dense with decay, dense without, experts (tagged `moe=True`)."""
    split = split_parameters(model)
    groups = [
        {"name": "dense", "params": split.dense, "weight_decay": weight_decay},
        {"name": "dense_no_decay", "params": split.dense_no_decay, "weight_decay": 0.0},
        {"name": "experts", "params": split.expert, "weight_decay": weight_decay, "moe": True},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        # One vectorised kernel per parameter (CPU and CUDA): the update of each element
        # depends only on that element, so the arithmetic is the same whatever the group
        # sizes (EP=1 vs EP=2). Demo model on 2 CPU threads: 5.9 -> 1.7 ms per step
        # against the per-tensor loop (foreach=False), several ops per tensor.
        fused=True,
    )


def learning_rate(step: int, config: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based): linear warmup to `lr` over `warmup_steps`,
    then a cosine from `lr` to `min_lr` at `steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def global_grad_norm(
    split: ParamSplit, ep_group: dist.ProcessGroup | None, ep_size: int
) -> torch.Tensor:
    """L2 norm of all gradients of the model, experts of every EP rank included: a 0-dim
    fp32 tensor on the parameters' device (no host sync; read it when logging)."""
    device = next(iter(split.dense + split.dense_no_decay + split.expert)).device

    def sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), device=device)
        return torch.nn.utils.get_total_norm(grads).float().square()

    dense_sq = sum_of_squares(_grads(split.dense + split.dense_no_decay))
    expert_sq = sum_of_squares(_grads(split.expert))
    if ep_size > 1:
        dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=ep_group)
    return torch.sqrt(dense_sq + expert_sq)


def clip_gradients(split: ParamSplit, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every gradient by min(1, max_norm / (total_norm + 1e-6)) on the device, no
    host sync (`torch.nn.utils.clip_grads_with_norm_`; below the threshold the factor is
    exactly 1); a no-op when max_norm == 0."""
    if max_norm <= 0:
        return
    params = split.dense + split.dense_no_decay + split.expert  # it scales their .grad
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
