"""Validation loss and bits per byte, routing statistics, and the end-of-run sample.

Every function here is collective when the model is expert-parallel: every rank must
call it, in the same order, with batches of the same shape (the MoE layers exchange
rows at every forward).

Legend: B batch rows, T positions, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from moe.data import ByteDataset
from moe.transformer import MoETransformer, bits_per_byte, lm_loss


@dataclass(frozen=True)
class Evaluation:
    val_loss: float  # mean next-byte cross entropy in nats over the validation batches
    val_bpb: float


def all_reduce_mean(values: list[float], world_size: int, device: torch.device) -> list[float]:
    """Mean of each value over all ranks (identity in a one-process run)."""
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / world_size).tolist()


@torch.no_grad()
def evaluate(
    model: MoETransformer,
    dataset: ByteDataset,
    batch_size: int,
    max_batches: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> Evaluation:
    """Mean cross entropy over the first `max_batches` fixed validation batches (global
    `batch_size` rows each, split over the ranks), in eval mode."""
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
    (mean_loss,) = all_reduce_mean([total / max(count, 1)], world_size, device)
    return Evaluation(val_loss=mean_loss, val_bpb=bits_per_byte(mean_loss))


@dataclass
class RoutingMonitor:
    """Accumulates, over training steps, each MoE layer's kept slots per expert (this
    rank's tokens), on the device: observing a step costs no host sync."""

    load_per_layer: dict[int, Tensor] = field(default_factory=dict)

    def observe(self, model: MoETransformer) -> None:
        for block, stats in model.routing_stats().items():
            load_E = stats.tokens_per_expert_E.detach().to(torch.float64, copy=True)
            previous = self.load_per_layer.get(block)
            self.load_per_layer[block] = load_E if previous is None else previous + load_E

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

    def global_load(self, world_size: int, device: torch.device) -> list[np.ndarray]:
        """Every layer's accumulated load summed over all ranks (collective)."""
        blocks = sorted(self.load_per_layer)
        loads = [self.load_per_layer[b].to(device) for b in blocks]
        if world_size > 1 and loads:
            flat = torch.cat(loads)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            loads = list(flat.split([len(load) for load in loads]))
        return [load.cpu().numpy() for load in loads]

    def layer_names(self) -> list[str]:
        return [f"block {b}" for b in sorted(self.load_per_layer)]
