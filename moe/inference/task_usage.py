"""Which experts a task uses: the measurement and selection behind task expert subsets
(`moe.inference.subset`).

- `task_experts_task_routing`: with task-level routing (`routing.router=task`), exactly
  the K experts of the task in every MoE layer (`TaskRouter.experts_for_task`).
- `measure_task_usage`: with token-level routing, the routed token-slots per expert of
  every MoE layer on a sample of the task's windows (`task_training_windows`: bounded,
  seeded), counted under dropless routing (`MoETransformer.capacity_override`).
- `experts_for_coverage`: the smallest set of experts that carries a share `coverage` of
  those slots.

Shapes: B windows, T positions, E experts of a layer (global), K experts per token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from moe.data import TaskCorpus
from moe.transformer import MoETransformer
from routing import CapacityOverride

# A bounded measurement: this many training windows of the task, drawn with this seed.
DEFAULT_MAX_WINDOWS = 256
DEFAULT_SEED = 0


def task_experts_task_routing(model: MoETransformer, task: int) -> dict[int, list[int]]:
    """Block index -> the K experts (sorted global ids) that task `task` is routed to,
    for a model with task-level routing."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("the model has no MoE layer; a task subset needs one")
    experts: dict[int, list[int]] = {}
    for block, layer in layers:
        if not layer.router.routes_by_task:
            raise ValueError(
                f"block {block} routes with routing.router={layer.routing.router.value}; "
                "task_experts_task_routing needs routing.router=task"
            )
        num_tasks = layer.router.config.num_tasks
        if not 0 <= task < num_tasks:
            raise ValueError(
                f"task={task} is not a task of this model; accepted: 0..{num_tasks - 1} "
                f"(routing.num_tasks={num_tasks})"
            )
        experts[block] = layer.router.experts_for_task(task)
    return experts


@torch.no_grad()
def measure_task_usage(
    model: MoETransformer, tokens_BT: Tensor, task: int, batch_size: int = 16
) -> dict[int, Tensor]:
    """Routed token-slots per expert of every MoE layer on `tokens_BT` (int [B, T], the
    model's input; every position is routed) with task id `task`: block index ->
    int64 counts_E (summing to B * T * K). Dropless routing, eval mode, no gradient; the
    model's mode and capacity policies are restored afterwards. Read from a forward
    hook on each router (its plan keeps every slot)."""
    if tokens_BT.dim() != 2 or tokens_BT.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"tokens have shape {tuple(tokens_BT.shape)} and dtype {tokens_BT.dtype}; "
            "expected an integer tensor [windows, seq_len]"
        )
    if tokens_BT.shape[0] == 0:
        raise ValueError("tokens_BT holds no window; accepted: at least one")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid; accepted: >= 1")
    layers = model.moe_layers()
    if not layers:
        raise ValueError("the model has no MoE layer; there is no expert use to measure")
    counts = {block: torch.zeros(layer.num_experts, dtype=torch.int64) for block, layer in layers}

    def hook_for(block: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, plan: Any) -> None:
            counts[block] += plan.counts_E.detach().to("cpu", torch.int64)

        return hook

    handles = [layer.router.register_forward_hook(hook_for(block)) for block, layer in layers]
    was_training = model.training
    device = model.embed.weight.device
    try:
        model.eval()
        with model.capacity_override(CapacityOverride.DROPLESS):
            for start in range(0, tokens_BT.shape[0], batch_size):
                batch_BT = tokens_BT[start : start + batch_size].to(device, torch.int64)
                task_ids_B = torch.full((batch_BT.shape[0],), task, dtype=torch.int64)
                model(batch_BT, task_ids_B.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counts


def experts_for_coverage(counts_E: Tensor, coverage: float, top_k: int) -> list[int]:
    """The smallest set of experts whose counts reach `coverage` of the total, as sorted
    global ids. Greedy: experts by count (highest first, ties by lower id) until the
    cumulative count reaches coverage * total; then topped up in the same order to at
    least `top_k` experts (a restricted top-k router needs K candidates).
    `coverage=1.0` keeps exactly the experts with a nonzero count (or top_k)."""
    if not isinstance(coverage, int | float) or not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage={coverage!r} is invalid; accepted: a number in (0, 1]")
    if counts_E.dim() != 1 or counts_E.numel() == 0:
        raise ValueError(f"counts_E has shape {tuple(counts_E.shape)}; expected [E] with E >= 1")
    num_experts = counts_E.numel()
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} is invalid; accepted: 1..{num_experts} (E)")
    counts = [int(c) for c in counts_E.tolist()]
    if any(c < 0 for c in counts):
        raise ValueError(f"counts_E={counts} has a negative count; accepted: counts >= 0")
    total = sum(counts)
    if total == 0:
        raise ValueError("counts_E sums to 0: no token-slot was measured, nothing to cover")
    order = sorted(range(num_experts), key=lambda e: (-counts[e], e))
    chosen: list[int] = []
    covered = 0
    for expert in order:
        # The slack absorbs float rounding (0.07 * 100 = 7.000000000000001) and is far
        # below one count, so coverage 1.0 still needs every used expert.
        if covered + 1e-9 * total >= coverage * total:
            break
        chosen.append(expert)
        covered += counts[expert]
    for expert in order:
        if len(chosen) >= top_k:
            break
        if expert not in chosen:
            chosen.append(expert)
    return sorted(chosen)


def task_training_windows(
    corpus: TaskCorpus,
    task: int,
    seq_len: int,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    seed: int = DEFAULT_SEED,
) -> Tensor:
    """Up to `max_windows` non-overlapping windows [B, seq_len] (int64) of task `task`'s
    training stream: all of them when there are few, else a seeded sample in stream order."""
    if not 0 <= task < corpus.num_tasks:
        raise ValueError(
            f"task={task} is not a task of corpus {corpus.name!r}; accepted: "
            f"0..{corpus.num_tasks - 1} ({', '.join(corpus.task_names)})"
        )
    if seq_len < 1 or max_windows < 1:
        raise ValueError(
            f"seq_len={seq_len}, max_windows={max_windows} are invalid; accepted: both >= 1"
        )
    stream_N = corpus.train_N[task]
    count = len(stream_N) // seq_len
    if count == 0:
        raise ValueError(
            f"task {task} of corpus {corpus.name!r} has {len(stream_N)} training bytes, fewer "
            f"than seq_len={seq_len}"
        )
    indices = np.arange(count)
    if count > max_windows:
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(count, size=max_windows, replace=False))
    starts_B = torch.from_numpy(indices * seq_len)
    return stream_N[starts_B[:, None] + torch.arange(seq_len)].to(torch.int64)
