"""What pruning offers the training loop: the `PruningState` protocol, and the state of a
run whose weights are pruned (`MaskedTraining`), built by `build_pruning`.

The loop's calls, in order, every step: `begin_step(step)` before the step's first
forward (the schedule prunes here: `moe.pruning.schedule`); the forwards and backwards;
`before_update(grad_scale)` after the last backward, before the optimizer engine reduces,
clips and applies the gradients (`grad_scale`: the factor the gradients carry then, the
loss scale under fp16, 1 otherwise); the engine's step; `after_update()`. With checkpoints:
`state_dict(all_reduce)` (collective: every rank calls it) and, when a run resumes or
starts from a checkpoint, `build_pruning(config, model, saved_state)`. `scalars()` when
it logs. The loop names no method.

Each constrained weight follows one rule:
- `fixed`: a mask inherited from the checkpoint the run starts from (a pruned
  checkpoint of `launch.prune`, or a weight outside this run's `prune.scope`);
- `schedule`: pruned by magnitude when the schedule says (`magnitude` once at
  `prune.start`, `gradual` on Zhu & Gupta's steps), the masks only growing;
- `sr_ste`: SR-STE (Zhou & Ma et al. 2021). The parameter holds the N:M-sparse weights
  W~ = W * mask(W) between steps, so forwards, evaluations and checkpoints see the
  sparse model; the dense W is kept here. `before_update` adds the sparse-refined term
  `sr_ste_decay * (1 - mask) * W` to the gradient (which autograd computed at W~: the
  straight-through estimator; times `grad_scale`, so that the term is the same after
  the engine unscales an fp16 run's gradients) and puts W back into the parameter, so the optimizer
  updates the dense weights (AdamW's decoupled decay included); `after_update` keeps the
  updated W, recomputes the N:M mask from it, and writes W~ back.

For `fixed` and `schedule`, `before_update` zeroes the masked gradients (no update, and
they do not count in the clipped norm) and `after_update` zeroes the masked weights
again (AdamW's moments from before the pruning would move them otherwise): a pruned
weight stays exactly zero.

Checkpoints: `state_dict` holds every mask (and SR-STE's dense weights) by parameter
name; an expert stack's by global expert id, gathered over the ranks, so a run resumes
at another expert-parallel size. Masks are a pure function of the weights and the
previous masks (`moe.pruning.masks`), so a resumed run prunes exactly as the
uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from moe.pruning.config import Granularity, PruneConfig, PruneMethod, PruneScope
from moe.pruning.masks import check_nm_fits, nm_masks, unstructured_masks
from moe.pruning.schedule import pruning_sparsity
from moe.pruning.serialize import gather_stacked, read_stacked
from moe.pruning.targets import PrunableWeight, check_scope, prunable_weights
from routing import AllReduce


class PruningState(Protocol):
    """A run's pruning, as the training loop sees it (module docstring). `active`:
    whether it constrains any weight."""

    active: bool

    def begin_step(self, step: int) -> None: ...

    def before_update(self, grad_scale: float | Tensor = 1.0) -> None: ...

    def after_update(self) -> None: ...

    def scalars(self) -> dict[str, float]: ...

    def state_dict(self, all_reduce: AllReduce | None) -> dict[str, Any]:
        """What a checkpoint keeps (collective under expert parallelism)."""
        ...

    def describe(self) -> str:
        """One line for the run's log ("" when there is nothing to say)."""
        ...


class NoPruning:
    """A run without pruning: every call does nothing."""

    active = False

    def begin_step(self, step: int) -> None:
        return None

    def before_update(self, grad_scale: float | Tensor = 1.0) -> None:
        return None

    def after_update(self) -> None:
        return None

    def scalars(self) -> dict[str, float]:
        return {}

    def state_dict(self, all_reduce: AllReduce | None) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return ""


class Rule(str, Enum):
    """How a constrained weight is kept sparse (module docstring)."""

    FIXED = "fixed"
    SCHEDULE = "schedule"
    SR_STE = "sr_ste"


@dataclass
class Constrained:
    """One pruned weight: its rule (module docstring), its keep-mask (None: not pruned
    yet) and, under SR-STE, its dense weights."""

    weight: PrunableWeight
    rule: Rule
    mask: Tensor | None = None
    dense: Tensor | None = None


class MaskedTraining:
    """The pruning state of a run (module docstring). `rank`, `world_size`: this
    process's place, for gathering expert masks in `state_dict`."""

    active = True

    def __init__(
        self,
        config: PruneConfig,
        constrained: list[Constrained],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.config = config
        self.constrained = constrained
        self.rank = rank
        self.world_size = world_size
        for item in constrained:
            item.rule = Rule(item.rule)
            if item.rule == Rule.SR_STE:
                if item.dense is None:
                    item.dense = item.weight.param.detach().clone()
                self._sparsify(item)
            else:
                self._apply(item)

    # --- the loop's calls ------------------------------------------------------------

    @torch.no_grad()
    def begin_step(self, step: int) -> None:
        target = pruning_sparsity(step, self.config)
        scheduled = [item for item in self.constrained if item.rule == Rule.SCHEDULE]
        if target is None or not scheduled:
            return
        weights = [item.weight for item in scheduled]
        values = [item.weight.param for item in scheduled]
        alive = [item.mask for item in scheduled]
        nm = self.config.nm
        if nm is not None:
            masks = nm_masks(weights, values, alive, nm)
        else:
            global_threshold = self.config.granularity == Granularity.GLOBAL
            masks = unstructured_masks(weights, values, alive, target, global_threshold)
        for item, mask in zip(scheduled, masks):
            item.mask = mask
            self._apply(item)

    @torch.no_grad()
    def before_update(self, grad_scale: float | Tensor = 1.0) -> None:
        for item in self.constrained:
            param, mask = item.weight.param, item.mask
            if mask is None:
                continue
            if item.rule == Rule.SR_STE:
                assert item.dense is not None
                if param.grad is not None:
                    decay = self.config.sr_ste_decay
                    term = torch.where(mask, 0.0, item.dense * decay)
                    param.grad.add_(term * grad_scale)  # exact: the scale is a power of 2
                # Also without a gradient: `after_update` reads the dense weights back.
                param.copy_(item.dense)
            elif param.grad is not None:
                param.grad.masked_fill_(~mask, 0.0)

    @torch.no_grad()
    def after_update(self) -> None:
        for item in self.constrained:
            if item.rule == Rule.SR_STE:
                assert item.dense is not None
                item.dense.copy_(item.weight.param)
                self._sparsify(item)
            else:
                self._apply(item)

    def scalars(self) -> dict[str, float]:
        """`prune/sparsity`: the share of the constrained weights that are masked."""
        zeros = total = 0
        for item in self.constrained:
            if item.mask is not None:
                zeros += int((~item.mask).sum())
            total += item.weight.param.numel()
        return {"prune/sparsity": zeros / max(total, 1)}

    def state_dict(self, all_reduce: AllReduce | None) -> dict[str, Any]:
        masks: dict[str, Any] = {}
        dense: dict[str, Any] = {}
        for item in self.constrained:
            weight = item.weight
            if item.mask is not None:
                masks[weight.name] = gather_stacked(
                    weight, item.mask, all_reduce, self.rank, self.world_size
                )
            if item.dense is not None:
                dense[weight.name] = gather_stacked(
                    weight, item.dense, all_reduce, self.rank, self.world_size
                )
        state: dict[str, Any] = {
            "method": self.config.method.value,
            "pattern": self.config.pattern,
            "scope": self.config.scope.value,
            "rules": {item.weight.name: item.rule.value for item in self.constrained},
            "masks": masks,
        }
        if dense:
            state["dense"] = dense
        return state

    def describe(self) -> str:
        rules: dict[str, int] = {}
        for item in self.constrained:
            rules[item.rule.value] = rules.get(item.rule.value, 0) + 1
        parts = ", ".join(f"{count} {rule}" for rule, count in sorted(rules.items()))
        config = self.config
        if not config.active:
            return f"pruning: the starting checkpoint's masks, kept ({parts} weights)"
        how = config.method.value
        if config.nm is not None:
            how += f" {config.pattern}"
        else:
            how += f" to sparsity {config.target_sparsity:g} ({config.granularity.value})"
        return f"pruning: {how}, scope {config.scope.value}; constrained weights: {parts}"

    # --- helpers -----------------------------------------------------------------------

    @staticmethod
    def _apply(item: Constrained) -> None:
        if item.mask is not None:
            item.weight.param.data.masked_fill_(~item.mask, 0.0)

    def _sparsify(self, item: Constrained) -> None:
        nm = self.config.nm
        assert nm is not None and item.dense is not None
        (item.mask,) = nm_masks([item.weight], [item.dense], [None], nm)
        param = item.weight.param.data
        param.copy_(item.dense)
        param.masked_fill_(~item.mask, 0.0)


def build_pruning(
    config: PruneConfig,
    model: nn.Module,
    saved: dict[str, Any] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> PruningState:
    """The pruning state of a run of `model` under `config`, continuing `saved` (the
    `pruning` state of the checkpoint the run resumes or starts from: its masks are
    kept, its SR-STE dense weights continue). Weights in `config.scope` follow the
    config's method; weights that `saved` masks outside it keep their masks fixed. A
    run with `prune.method=none` and nothing saved gets `NoPruning`. ValueError for a
    scope with nothing to prune or an N:M pattern that does not fit a weight."""
    saved = saved or {}
    saved_masks: dict[str, Any] = saved.get("masks", {})
    saved_dense: dict[str, Any] = saved.get("dense", {})
    if not config.active and not saved_masks:
        return NoPruning()
    every = {weight.name: weight for weight in prunable_weights(model, PruneScope.ALL)}
    unknown = sorted(set(saved_masks) - set(every))
    if unknown:
        raise ValueError(
            f"the checkpoint's pruning masks name {unknown}, which this model does not "
            "have as prunable weights; start from a checkpoint of the same model"
        )
    in_scope: list[PrunableWeight] = []
    if config.active:
        in_scope = prunable_weights(model, config.scope)
        check_scope(in_scope, config.scope)
        if config.nm is not None:
            for weight in in_scope:
                check_nm_fits(weight, config.nm)
        sharded = [w.name for w in in_scope if w.num_matrices < w.num_global_experts]
        if config.granularity == Granularity.GLOBAL and config.active and sharded:
            raise ValueError(
                f"prune.granularity=global ranks every weight of the scope together, but "
                f"this process holds only some experts of {sharded[0]} (expert parallelism "
                "or a subset); accepted: prune.granularity=matrix, or prune at EP=1"
            )
    rule = Rule.SR_STE if config.method == PruneMethod.SR_STE else Rule.SCHEDULE
    constrained: list[Constrained] = []
    scoped = {weight.name for weight in in_scope}
    for name, weight in every.items():
        mask = read_stacked(weight, saved_masks[name], name) if name in saved_masks else None
        if mask is not None:
            mask = mask.to(device=weight.param.device, dtype=torch.bool)
        if name in scoped:
            dense = None
            if rule == Rule.SR_STE and name in saved_dense:
                dense = read_stacked(weight, saved_dense[name], name).to(weight.param)
            constrained.append(Constrained(weight, rule, mask, dense))
        elif mask is not None:
            constrained.append(Constrained(weight, Rule.FIXED, mask))
    return MaskedTraining(config, constrained, rank, world_size)
