"""Pruning masks by weight magnitude: unstructured (per matrix or over a whole scope)
and N:M along the reduction dimension. A mask is a bool tensor shaped like its weight,
True where the weight is kept.

Every mask here is monotone in `alive` (the weight's current mask): a weight already
pruned stays pruned, and among the alive weights the smallest |w| go first. Ties are
broken by position (the lower index is pruned first, resp. kept first in an N:M group),
so a mask is a pure function of the weights and `alive`: a resumed run recomputes
exactly the masks of the uninterrupted one.

Legend: B matrices, R rows, K reduction width, G = K / M groups per row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from moe.pruning.config import NMPattern
from moe.pruning.targets import PrunableWeight

# Below every |w|: a pruned weight ranks first to be pruned and last to be kept.
_PRUNED_SCORE = -1.0


def scores(weight: Tensor, alive: Tensor | None) -> Tensor:
    """|w| in float32, `_PRUNED_SCORE` where `alive` is False."""
    magnitude = weight.detach().abs().float()
    if alive is None:
        return magnitude
    return torch.where(alive, magnitude, torch.full_like(magnitude, _PRUNED_SCORE))


def count_to_prune(sparsity: float, numel: int) -> int:
    """round(sparsity * numel), halves up: the zeros a target sparsity asks for."""
    return min(numel, math.floor(sparsity * numel + 0.5))


def prune_smallest(scores_BN: Tensor, k_B: Tensor) -> Tensor:
    """Keep-mask [B, N]: in each row b the k_B[b] smallest scores are pruned, ties
    to the lower index."""
    B, N = scores_BN.shape
    keep = torch.ones(B, N, dtype=torch.bool, device=scores_BN.device)
    rows = torch.nonzero(k_B > 0).flatten()
    if rows.numel() == 0:
        return keep
    sub = scores_BN[rows]
    k = k_B[rows].to(torch.int64)
    # The k-th smallest value: everything below it goes, then the first ties by index.
    sorted_values = torch.sort(sub, dim=1).values
    threshold = sorted_values.gather(1, (k - 1).unsqueeze(1))
    below = sub < threshold
    ties = sub == threshold
    remaining = k.unsqueeze(1) - below.sum(1, keepdim=True)
    tie_pruned = ties & (ties.cumsum(1) <= remaining)
    keep[rows] = ~(below | tie_pruned)
    return keep


def unstructured_masks(
    weights: Sequence[PrunableWeight],
    values: Sequence[Tensor],
    alive: Sequence[Tensor | None],
    sparsity: float,
    global_threshold: bool,
) -> list[Tensor]:
    """Keep-masks giving `sparsity` zeros in every matrix (each expert's projection is
    one) or, with `global_threshold`, over all the weights together (one ranking).
    `values[i]` is weight i's tensor (shaped like its parameter), `alive[i]` its current
    mask. A target below the zeros already there keeps them (the masks only grow)."""
    masks: list[Tensor] = []
    if global_threshold:
        flat = torch.cat([scores(v, a).flatten() for v, a in zip(values, alive)])
        k = torch.tensor([count_to_prune(sparsity, flat.numel())])
        keep = prune_smallest(flat.unsqueeze(0), k).squeeze(0)
        offset = 0
        for value, current in zip(values, alive):
            mask = keep[offset : offset + value.numel()].view(value.shape)
            offset += value.numel()
            masks.append(mask if current is None else mask & current)
        return masks
    for weight, value, current in zip(weights, values, alive):
        matrices_BRK = weight.matrices(scores(value, current))
        flat_BN = matrices_BRK.reshape(matrices_BRK.shape[0], -1)
        k_B = torch.full((flat_BN.shape[0],), count_to_prune(sparsity, flat_BN.shape[1]))
        keep = weight.from_matrices(prune_smallest(flat_BN, k_B).view(matrices_BRK.shape))
        masks.append(keep if current is None else keep & current)
    return masks


def check_nm_fits(weight: PrunableWeight, pattern: NMPattern) -> None:
    """ValueError naming the weight and its shape when M does not divide its reduction
    dimension."""
    width = weight.param.shape[weight.reduction_dim]
    if width % pattern.m:
        raise ValueError(
            f"prune.pattern={pattern} needs M={pattern.m} to divide the reduction dimension "
            f"of every pruned weight; {weight.name} has shape {tuple(weight.param.shape)}, "
            f"whose reduction dimension {weight.reduction_dim} has {width} entries. Choose "
            f"an M that divides {width}, or a prune.scope without it"
        )


def nm_keep_RK(scores_RK: Tensor, pattern: NMPattern) -> Tensor:
    """Keep-mask of [..., K] scores: in every group of M consecutive entries of the last
    dimension the N largest are kept (ties to the lower index); K % M == 0."""
    *lead, K = scores_RK.shape
    groups = scores_RK.reshape(*lead, K // pattern.m, pattern.m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : pattern.n], True)
    return keep.reshape(*lead, K)


def nm_masks(
    weights: Sequence[PrunableWeight],
    values: Sequence[Tensor],
    alive: Sequence[Tensor | None],
    pattern: NMPattern,
) -> list[Tensor]:
    """N:M keep-masks along each weight's reduction dimension (a pruned weight is never
    kept: a group with fewer than N alive keeps only those)."""
    masks = []
    for weight, value, current in zip(weights, values, alive):
        check_nm_fits(weight, pattern)
        keep = weight.from_matrices(nm_keep_RK(weight.matrices(scores(value, current)), pattern))
        masks.append(keep if current is None else keep & current)
    return masks


def satisfies_nm(tensor: Tensor, reduction_dim: int, pattern: NMPattern) -> bool:
    """Whether every group of M consecutive entries along `reduction_dim` holds at most
    N non-zeros."""
    moved = tensor.detach().movedim(reduction_dim, -1)
    K = moved.shape[-1]
    if K % pattern.m:
        return False
    groups = moved.reshape(*moved.shape[:-1], K // pattern.m, pattern.m)
    return bool(((groups != 0).sum(-1) <= pattern.n).all())


def magnitude_kept(value: Tensor, mask: Tensor) -> tuple[float, float]:
    """(sum of |w| kept by `mask`, sum of |w|), in float64."""
    magnitude = value.detach().abs().double()
    return float(magnitude[mask].sum()), float(magnitude.sum())
