"""One-shot pruning of a model (what `launch.prune` does): optionally permute the FFN
hidden channels (Pool & Yu), compute the masks by magnitude (unstructured or N:M),
zero the pruned weights, and report what was kept and what it would take in memory.

The report (`PruneReport.as_dict`, kept in the checkpoint's meta.json):
- per weight: shape, reduction dimension, sparsity, magnitude kept, whether N:M holds;
- with `prune.permute`: per FFN the magnitude N:M keeps of its down-projection without
  and with the permutation found, and the totals over the scope with and without it
  (the up-projections reduce over the model width, which the permutation leaves alone);
- the experts' memory: dense float, int8 (per-output-channel scales), and for N:M the
  packed formats (`moe.pruning.semi_structured.packed_nm_bytes`: float, bf16 as the CUDA
  path runs it, and int8); for unstructured sparsity a kept-values-plus-bitmap format.

Legend: E experts, R rows, C channels (reduction dimension), H hidden width.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moe.pruning.config import Granularity, PruneConfig, PruneMethod
from moe.pruning.masks import (
    check_nm_fits,
    magnitude_kept,
    nm_masks,
    satisfies_nm,
    unstructured_masks,
)
from moe.pruning.permutation import search_permutation
from moe.pruning.semi_structured import packed_nm_bytes
from moe.pruning.targets import (
    HiddenChannels,
    PrunableWeight,
    check_scope,
    hidden_channels,
    prunable_weights,
)


@dataclass
class PruneReport:
    """What `prune_model` did (module docstring); `as_dict` is plain JSON."""

    weights: list[dict[str, Any]] = field(default_factory=list)
    permutation: list[dict[str, Any]] = field(default_factory=list)
    kept_without_permutation: float | None = None
    kept: float = 0.0
    sparsity: float = 0.0
    memory: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "magnitude_kept": self.kept,
            "magnitude_kept_without_permutation": self.kept_without_permutation,
            "weights": self.weights,
            "permutation": self.permutation,
            "expert_memory_bytes": self.memory,
        }


@torch.no_grad()
def permute_hidden(group: HiddenChannels, permutations: list[Tensor]) -> None:
    """Reorder an FFN's hidden units: position i takes unit `permutations[m][i]` of
    matrix m (one per expert of a stack, one for a dense FFN), in the up-projections'
    outputs and the down-projection's inputs alike: the FFN computes the same."""
    for param, dim in (*group.producers, group.consumer):
        if group.stacked:
            for expert, permutation in enumerate(permutations):
                param[expert] = param[expert].index_select(dim - 1, permutation)
        else:
            param.copy_(param.index_select(dim, permutations[0]))


def _consumer_matrices(group: HiddenChannels) -> list[Tensor]:
    """|w| of the down-projection as [R, C] matrices, C the hidden units."""
    param, dim = group.consumer
    moved = param.detach().abs().movedim(dim, -1)
    return list(moved) if group.stacked else [moved]


def search_and_permute(groups: list[HiddenChannels], config: PruneConfig) -> list[dict[str, Any]]:
    """Pool & Yu's search on every group's down-projection (each expert on its own),
    applied to the model; returns what each search kept, per FFN."""
    nm = config.nm
    assert nm is not None
    records = []
    for group in groups:
        permutations, kept_identity, kept, total, swaps = [], 0.0, 0.0, 0.0, 0
        for index, magnitude_RC in enumerate(_consumer_matrices(group)):
            seed = zlib.crc32(f"{config.seed}:{group.name}:{index}".encode())
            result = search_permutation(
                magnitude_RC, nm, seconds=config.permute_seconds,
                escapes=config.permute_escapes, generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip
            permutations.append(result.permutation_C.to(magnitude_RC.device))
            kept_identity += result.kept_identity
            kept += result.kept
            total += result.total
            swaps += result.swaps
        permute_hidden(group, permutations)
        records.append({
            "ffn": group.name, "weight": group.consumer_name, "matrices": len(permutations),
            "magnitude_kept_without": kept_identity / total, "magnitude_kept_with": kept / total,
            "swaps": swaps,
        })  # fmt: skip
    return records


def _int8_bytes(weight: PrunableWeight) -> int:
    """int8 values plus one fp32 scale per output channel of every matrix."""
    shape = weight.param.shape
    rows = weight.param.numel() // shape[weight.reduction_dim]
    return weight.param.numel() + 4 * rows


def expert_memory(weights: list[PrunableWeight], config: PruneConfig) -> dict[str, int]:
    """Bytes of the pruned expert weights in each format (module docstring)."""
    experts = [w for w in weights if w.is_expert]
    if not experts:
        return {}
    numel = sum(w.param.numel() for w in experts)
    itemsize = experts[0].param.element_size()
    scales = sum(_int8_bytes(w) - w.param.numel() for w in experts)
    memory = {"dense": numel * itemsize, "int8": numel + scales}
    nm = config.nm
    if nm is not None:
        memory[f"packed_{nm.n}_{nm.m}"] = packed_nm_bytes(numel, nm, itemsize)
        memory[f"packed_{nm.n}_{nm.m}_bf16"] = packed_nm_bytes(numel, nm, 2)
        memory[f"packed_{nm.n}_{nm.m}_int8"] = packed_nm_bytes(numel, nm, 1) + scales
    else:
        zeros = sum(int((w.param == 0).sum()) for w in experts)
        bitmap = (numel + 7) // 8
        memory["values_and_bitmap"] = (numel - zeros) * itemsize + bitmap
        memory["values_and_bitmap_int8"] = (numel - zeros) + bitmap + scales
    return memory


@torch.no_grad()
def prune_model(
    model: nn.Module, config: PruneConfig, alive: dict[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], PruneReport]:
    """Prune `model` in place as `config` says (one shot: `prune.method=magnitude`).
    `alive`: masks the model already has (a pruned checkpoint pruned further), by
    parameter name: what they pruned stays pruned. Returns the keep-masks by parameter
    name and the report. ValueError for another method, a scope with nothing to prune,
    an N:M pattern that does not fit, or a permutation of an already pruned model."""
    if config.method != PruneMethod.MAGNITUDE:
        raise ValueError(
            f"prune.method={config.method.value} is not a one-shot method; launch.prune "
            "takes prune.method=magnitude (gradual and sr_ste prune while training: "
            "launch.train or launch.distill)"
        )
    weights = prunable_weights(model, config.scope)
    check_scope(weights, config.scope)
    nm = config.nm
    if nm is not None:
        for weight in weights:
            check_nm_fits(weight, nm)
    alive = alive or {}
    report = PruneReport()
    gain_by_weight: dict[str, float] = {}
    if config.permute and alive:
        raise ValueError(
            "prune.permute=true on a checkpoint that is already pruned: its masks would "
            "have to move with the hidden units; permute and prune its unpruned source"
        )
    if config.permute:
        groups = hidden_channels(model, config.scope)
        report.permutation = search_and_permute(groups, config)
        for group, record in zip(groups, report.permutation):
            total = float(group.consumer[0].detach().abs().double().sum())
            gain = record["magnitude_kept_with"] - record["magnitude_kept_without"]
            gain_by_weight[group.consumer_name] = gain * total
    values = [weight.param for weight in weights]
    current = [alive.get(weight.name) for weight in weights]
    if nm is not None:
        masks = nm_masks(weights, values, current, nm)
    else:
        sparsity = config.target_sparsity
        global_threshold = config.granularity == Granularity.GLOBAL
        masks = unstructured_masks(weights, values, current, sparsity, global_threshold)
    kept_sum = total_sum = 0.0
    zeros = 0
    for weight, mask in zip(weights, masks):
        kept, total = magnitude_kept(weight.param, mask)
        weight.param.masked_fill_(~mask, 0.0)
        kept_sum, total_sum = kept_sum + kept, total_sum + total
        zeros += int((~mask).sum())
        report.weights.append({
            "name": weight.name, "shape": list(weight.param.shape),
            "reduction_dim": weight.reduction_dim, "expert": weight.is_expert,
            "sparsity": float((~mask).double().mean()), "magnitude_kept": kept / total,
            "nm_ok": None if nm is None else satisfies_nm(weight.param, weight.reduction_dim, nm),
        })  # fmt: skip
    report.kept = kept_sum / total_sum
    report.sparsity = zeros / sum(w.param.numel() for w in weights)
    if config.permute:
        report.kept_without_permutation = (kept_sum - sum(gain_by_weight.values())) / total_sum
    report.memory = expert_memory(weights, config)
    return {weight.name: mask for weight, mask in zip(weights, masks)}, report


def pruning_record(
    config: PruneConfig, masks: dict[str, Tensor], weights: list[PrunableWeight]
) -> dict[str, Any]:
    """The `pruning` state of a one-shot pruned checkpoint, in the form
    `moe.pruning.build_pruning` reads (masks by parameter name and global expert id)."""
    by_name = {weight.name: weight for weight in weights}
    return {
        "method": config.method.value,
        "pattern": config.pattern,
        "scope": config.scope.value,
        "rules": {name: "fixed" for name in masks},
        "masks": {
            name: {"expert_ids": _ids(by_name[name]), "value": mask.cpu()}
            for name, mask in masks.items()
        },
    }


def _ids(weight: PrunableWeight) -> list[int] | None:
    return None if weight.expert_ids is None else list(weight.expert_ids)
