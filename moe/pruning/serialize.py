"""Per-weight pruning tensors (masks, SR-STE's dense weights) in checkpoints, keyed by
global expert id so that they reshard like the experts themselves.

An entry is `{"expert_ids": [...] | None, "value": tensor}`: for an expert stack the
rows of `value` are the experts `expert_ids` (global ids), otherwise `value` is shaped
like the parameter. Under expert parallelism each rank holds some experts; `gather_stacked`
assembles every expert's rows on every rank with one sum over the ranks, in which each
expert is contributed by the lowest rank holding it (a sum with zeros is exact, for
floats too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moe.pruning.targets import PrunableWeight
from routing import AllReduce


def gather_stacked(
    weight: PrunableWeight,
    tensor: Tensor,
    all_reduce: AllReduce | None,
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """The checkpoint entry of `tensor` (shaped like `weight.param`): this rank's rows,
    or with `all_reduce` every rank's rows of a sharded expert stack (collective)."""
    ids = None if weight.expert_ids is None else list(weight.expert_ids)
    local = tensor.detach().cpu().clone()
    if all_reduce is None or not weight.is_expert or ids is None:
        return {"expert_ids": ids, "value": local}
    num_global = weight.num_global_experts
    holders = torch.zeros(world_size, num_global, dtype=torch.int64)
    holders[rank, ids] = 1
    holders = all_reduce(holders)
    held = holders.sum(0) > 0
    first_holder = holders.argmax(0)  # the first rank with a 1 (ties: the first index)
    wire_dtype = torch.uint8 if local.dtype == torch.bool else local.dtype
    buffer = torch.zeros(num_global, *local.shape[1:], dtype=wire_dtype)
    for row, global_id in enumerate(ids):
        if int(first_holder[global_id]) == rank:
            buffer[global_id] = local[row].to(wire_dtype)
    buffer = all_reduce(buffer)
    gathered_ids = [int(i) for i in torch.nonzero(held).flatten()]
    value = buffer[gathered_ids].to(local.dtype)
    return {"expert_ids": gathered_ids, "value": value}


def read_stacked(weight: PrunableWeight, entry: dict[str, Any], name: str) -> Tensor:
    """This model's part of a checkpoint entry (its experts' rows), shaped like the
    parameter; ValueError when the entry lacks an expert or has another shape."""
    value = entry["value"]
    ids = entry.get("expert_ids")
    if weight.expert_ids is not None:
        if ids is None:
            raise ValueError(f"the checkpoint's pruning entry {name} is not by expert id")
        missing = sorted(set(weight.expert_ids) - set(ids))
        if missing:
            raise ValueError(
                f"the checkpoint's pruning entry {name} holds experts {ids}; this model "
                f"holds {list(weight.expert_ids)} (missing {missing})"
            )
        value = value[[ids.index(global_id) for global_id in weight.expert_ids]]
    if tuple(value.shape) != tuple(weight.param.shape):
        raise ValueError(
            f"the checkpoint's pruning entry {name} has shape {tuple(value.shape)}; the "
            f"model's weight has {tuple(weight.param.shape)}"
        )
    return value
