"""Slow, obvious references kept as test oracles: a per-slot loop for capacity and a
per-token loop for the whole MoE layer. Never used on a hot path.

Shapes: T tokens, D model width, E experts, K slots per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.layer import MoELayer
from routing import RoutingPlan


def reference_keep(expert_ids_TK: Tensor, token_order: list[int], capacity: int) -> Tensor:
    """Fill expert queues choice by choice, tokens in `token_order`; keep_TK (bool)."""
    num_tokens, top_k = expert_ids_TK.shape
    used: dict[int, int] = {}
    keep = torch.zeros(num_tokens, top_k, dtype=torch.bool)
    for choice in range(top_k):
        for token in token_order:
            expert = int(expert_ids_TK[token, choice])
            if used.get(expert, 0) < capacity:
                used[expert] = used.get(expert, 0) + 1
                keep[token, choice] = True
    return keep


def reference_layer_output(layer: MoELayer, x_TD: Tensor, plan: RoutingPlan) -> Tensor:
    """y[t] = sum over kept slots k of weight[t,k] * expert_{e[t,k]}(x[t]), one token at a
    time (plus the residual MLP mix when the layer has one). Single process only; a
    layer holding a subset of the experts maps each global id to its local one."""
    experts = layer.experts
    local_of = {expert: local for local, expert in enumerate(experts.expert_ids)}
    rows = []
    for token in range(x_TD.shape[0]):
        y_D = torch.zeros_like(x_TD[token])
        for choice in range(plan.top_k):
            if bool(plan.keep_TK[token, choice]):
                expert = int(plan.expert_ids_TK[token, choice])
                out = experts.expert_forward(x_TD[token : token + 1], local_of[expert])[0]
                y_D = y_D + plan.weights_TK[token, choice].to(x_TD.dtype) * out
        if layer.residual is not None and layer.residual_gate is not None:
            coefficients = torch.softmax(layer.residual_gate(x_TD[token]), dim=-1)
            y_D = (
                y_D * coefficients[0] + layer.residual(x_TD[token : token + 1])[0] * coefficients[1]
            )
        rows.append(y_D)
    return torch.stack(rows)
