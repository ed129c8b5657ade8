"""Gradient reduction under expert parallelism: dense parameters over every rank,
expert parameters only over the ranks that hold the same experts (`reduce_gradients`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from comm.topology import ProcessGroups
from moe.experts import expert_parameter_ids


def _all_reduce_mean(grads: list[Tensor], group: dist.ProcessGroup, divisor: int) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if dist.get_world_size(group=group) > 1:
        dist.all_reduce(flat, group=group)
    flat.div_(divisor)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_gradients(module: nn.Module, groups: ProcessGroups) -> None:
    """Average gradients over the data: dense parameters over the dense DP group (all
    ranks), expert parameters (`moe.experts.expert_parameter_ids`) only over their replicas.

    Loss convention: each rank backpropagates the mean loss of *its own* tokens, and the
    training objective is the mean of those per-rank losses. Then the exact gradient is
    the sum over ranks divided by the world size, for both kinds: an expert's gradient on
    one rank already holds every token of its EP group that reached it (the all-to-all's
    backward brought them), so summing over the expert's replicas covers all tokens once,
    and the divisor is the world size, not the replica count (as in DeepSpeed). With this
    rule a run at EP=N equals EP=1 data parallelism on the same shards. A parameter with
    no gradient on this rank counts as zeros (so every rank reduces the same buffer).
    """
    expert_ids = expert_parameter_ids(module)
    dense: list[Tensor] = []
    experts: list[Tensor] = []
    for param in module.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        (experts if id(param) in expert_ids else dense).append(param.grad)
    world = groups.topology.world_size
    _all_reduce_mean(dense, groups.dense_dp, world)
    _all_reduce_mean(experts, groups.expert_dp, world)
