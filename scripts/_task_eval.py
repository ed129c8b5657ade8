"""Bits per byte of a model on one task's validation windows, the evaluation that
`scripts/subset_report.py` (a task subset beside the full model) and
`scripts/distill_experiment.py` (the teacher and every student, per task) share.

The windows are the first `max_windows` of the task in `TokenDataset`'s fixed shuffled
validation sequence, in batches of `batch_size`; the model runs in eval mode with
dropless routing; the figure is the mean cross entropy over every target byte, in bits.
"""

from __future__ import annotations

import torch

from moe.data import TokenDataset
from moe.transformer import MoETransformer, bits_per_byte
from routing import CapacityOverride


@torch.no_grad()
def task_cross_entropy(
    model: MoETransformer, dataset: TokenDataset, task: int, max_windows: int, batch_size: int
) -> tuple[float, int]:
    """The summed cross entropy (nats) over every target byte of the first `max_windows`
    validation windows of `task`, and the number of those bytes (0: the task has none)."""
    windows_NT = dataset.task_validation_windows(task, max_windows)
    model.eval()
    total, count = 0.0, 0
    with model.capacity_override(CapacityOverride.DROPLESS):
        for begin in range(0, len(windows_NT), batch_size):
            tokens_BT = windows_NT[begin : begin + batch_size]
            task_ids_B = torch.full((len(tokens_BT),), task, dtype=torch.int64)
            logits_BTV = model(tokens_BT[:, :-1], task_ids_B).logits_BTV
            targets = tokens_BT[:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits_BTV.flatten(0, 1).float(), targets.flatten(), reduction="sum"
                )
            )
            count += targets.numel()
    return total, count


def task_val_bpb(
    model: MoETransformer, dataset: TokenDataset, task: int, max_windows: int, batch_size: int = 16
) -> float:
    """Bits per byte of `model` on the first `max_windows` validation windows of `task`;
    a task without a validation window is refused."""
    total, count = task_cross_entropy(model, dataset, task, max_windows, batch_size)
    if count == 0:
        raise ValueError(f"task {task} has no validation window of {dataset.seq_len + 1} bytes")
    return bits_per_byte(total / count)
