"""Validation loss and bits per byte, routing statistics, and the end-of-run sample.

Every function here is collective when the model is expert-parallel: every rank must
call it, in the same order, with batches of the same shape (the MoE layers exchange
rows at every forward).

Legend: B batch rows, T positions, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moe.data import TokenDataset
from moe.transformer import MoETransformer, bits_per_byte, lm_loss
from moe.usage import ExpertUsage
from routing import AllReduce


@dataclass(frozen=True)
class Evaluation:
    val_loss: float  # mean next-token cross entropy in nats over the validation batches
    val_bpb: float  # bits per byte of validation text (per token times tokens per byte)


def mean_over_ranks(
    values: list[float], world_size: int, all_reduce: AllReduce | None
) -> list[float]:
    """Mean of each value over all ranks (identity in a one-process run)."""
    if all_reduce is None:
        return values
    return (all_reduce(torch.tensor(values, dtype=torch.float64)) / world_size).tolist()


@torch.no_grad()
def evaluate(
    model: MoETransformer,
    dataset: TokenDataset,
    batch_size: int,
    max_batches: int,
    rank: int,
    world_size: int,
    device: torch.device,
    all_reduce: AllReduce | None = None,
) -> Evaluation:
    """Mean cross entropy over the first `max_batches` fixed validation batches (global
    `batch_size` rows each, split over the ranks), in eval mode; `all_reduce` sums over
    the ranks (`Runtime.sum_over_ranks`; None in a one-process run)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in dataset.validation_batches(batch_size, rank, world_size, max_batches):
            tokens_BT = batch.tokens_BT.to(device)
            output = model(tokens_BT[:, :-1], batch.task_ids_B.to(device))
            total += float(lm_loss(output, tokens_BT[:, 1:]).ce)
            count += 1
    finally:
        model.train(was_training)
    (mean_loss,) = mean_over_ranks([total / max(count, 1)], world_size, all_reduce)
    return Evaluation(
        val_loss=mean_loss, val_bpb=bits_per_byte(mean_loss, dataset.val_tokens_per_byte)
    )


class RoutingMonitor:
    """What the loop reports about routing: each MoE layer's kept slots per expert
    accumulated over the run (`moe.usage.ExpertUsage`, on the device: observing a step
    costs no host sync) and the last step's per-layer scalars."""

    def __init__(self) -> None:
        self.usage = ExpertUsage()

    def observe(self, model: MoETransformer) -> None:
        self.usage.observe(model)

    def scalars(self, model: MoETransformer) -> dict[str, float]:
        """Per-layer scalars of the last step (this rank): dropped fraction, router
        entropy, and the load imbalance max/mean of the last step's kept slots; and the
        first two averaged over the layers."""
        out: dict[str, float] = {}
        dropped, entropy = [], []
        for block, stats in model.routing_stats().items():
            load_E = stats.tokens_per_expert_E.detach().float()
            dropped.append(float(stats.dropped_fraction))
            entropy.append(float(stats.router_entropy))
            out[f"routing/layer{block}/dropped_fraction"] = dropped[-1]
            out[f"routing/layer{block}/router_entropy"] = entropy[-1]
            mean = float(load_E.mean())
            out[f"routing/layer{block}/load_max_over_mean"] = (
                float(load_E.max()) / mean if mean > 0 else 0.0
            )
        if dropped:
            out["routing/dropped_fraction"] = float(np.mean(dropped))
            out["routing/router_entropy"] = float(np.mean(entropy))
        return out

    def global_load(self, all_reduce: AllReduce | None) -> list[np.ndarray]:
        """Every layer's accumulated load summed over all ranks (collective)."""
        return [load.numpy() for load in self.usage.totals(all_reduce).values()]

    def layer_names(self) -> list[str]:
        return [f"block {b}" for b in self.usage.blocks()]
