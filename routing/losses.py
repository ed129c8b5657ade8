"""Auxiliary routing losses (all unweighted; the router applies the config weights).

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """Switch/GShard balance loss E * sum_e f_e * P_e.

    f_e: fraction of the T*K token-slots whose choice is e (counted before capacity);
    P_e: mean router probability of e over the tokens. Equals 1 when both are uniform.
    """
    num_experts = probs_TE.shape[1]
    ids_N = expert_ids_TK.reshape(-1)  # scatter-add, not bincount: a static [E] shape
    slots_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_N.device)
    slots_E.scatter_add_(0, ids_N, torch.ones_like(ids_N))
    fraction_E = slots_E.to(probs_TE.dtype) / max(expert_ids_TK.numel(), 1)
    mean_prob_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(fraction_E * mean_prob_E)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def batch_entropy_regularizer(logits_TE: Tensor) -> Tensor:
    """Sigma-MoE regulariser: the negative entropy of the batch-mean selection
    distribution, mean_t softmax(logits_t). Minimising it spreads use over experts
    while each token's own choice may stay sharp."""
    log_probs_TE = torch.log_softmax(logits_TE, dim=-1)
    log_mean_E = torch.logsumexp(log_probs_TE, dim=0) - torch.log(
        torch.tensor(float(logits_TE.shape[0]), dtype=logits_TE.dtype, device=logits_TE.device)
    )
    return torch.sum(log_mean_E.exp() * log_mean_E)


def mean_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy of each token's routing distribution (nats)."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(dim=-1).mean()
