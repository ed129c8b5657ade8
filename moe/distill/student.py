"""The dense student of an MoE teacher, built from the same expert code: its shape and
its initialisation from the teacher's experts (the loss is `moe.distill.loss`).

The student (`student_config`) is the teacher's transformer with every FFN an
`moe.experts.ExpertFFN` (one expert of the expert code, no router) of width W, by default
the teacher's active width `top_k * expert_hidden`. Its initialisation (`init`):

- `random`: the transformer's own initialisation (nothing copied);
- `top`: per MoE layer, the m = W / H most used experts (usage: slots routed to each
  expert on the measured batches, ties to the lower id), concatenated along the hidden
  dimension, most used first. The teacher combines its K experts with weights that sum
  to 1 per token (normalised top-k), while a concatenation sums them, so each expert's
  down-projection is scaled by its share of the chosen experts' usage (1 when m = 1:
  a one-expert teacher is reproduced exactly);
- `merge`: per MoE layer, the usage-weighted average of the teacher's experts (every
  weight matrix averaged with weights usage_e / sum usage). For m > 1 the experts are
  dealt by usage rank into m groups (rank r into group r mod m), each group is merged
  into one slice, and each slice's down-projection is scaled by its group's usage share.

- `checkpoint`: the student is not derived from the teacher at all: it is the model of
  another checkpoint (`train.init_from`), its shape and weights, an MoE student
  included. This is how a pruned MoE recovers from its unpruned self: the teacher is
  the unpruned checkpoint, the student the pruned one (`launch.prune`), whose masks the
  run keeps (`moe.pruning`).

Under `top` and `merge`, attention, embeddings, norms (and the output head) copy from the
teacher, as does the FFN of a teacher block that is dense when its shape fits the
student's. PR-MoE residual MLPs and shared experts (Qwen2-MoE) are not carried over.

Legend: D model width, H expert hidden width, E experts,
W student FFN width, m = W / H slices.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from moe.checkpoint.experts import CheckpointExperts
from moe.config import FFNKind, ModelConfig
from moe.experts import DenseMLP, ExpertFFN, Experts
from moe.transformer import MoETransformer
from routing import RoutingConfig


class StudentInit(str, Enum):
    """How the dense student starts (see the module docstring)."""

    RANDOM = "random"
    TOP = "top"
    MERGE = "merge"
    CHECKPOINT = "checkpoint"


# --- the student's shape -----------------------------------------------------------------


def default_width(teacher: ModelConfig, routing: RoutingConfig | None) -> int:
    """The teacher's active FFN width: top_k * expert_hidden (its ffn_hidden if dense)."""
    if routing is None or not teacher.moe_layer_indices():
        return teacher.ffn_hidden
    return routing.top_k * teacher.expert_hidden


def student_config(teacher: ModelConfig, routing: RoutingConfig | None, width: int) -> ModelConfig:
    """The dense student of `teacher`: the same transformer with every FFN an `ExpertFFN`
    of width `width` (0: `default_width`)."""
    if width < 0:
        raise ValueError(
            f"distill.width={width} is invalid; accepted: 0 (the teacher's active width) or a "
            "positive integer"
        )
    return dataclasses.replace(
        teacher,
        ffn_hidden=width or default_width(teacher, routing),
        moe_every=0,
        expert_schedule=[],
        residual_mlp=False,
        ffn_kind=FFNKind.EXPERT,
        shared_expert_hidden=0,
        dense_layers=[],
    )


def check_init(teacher: ModelConfig, width: int, init: StudentInit) -> None:
    """`top` and `merge` build the student's FFN from whole experts: its width must be a
    multiple m of expert_hidden, with m no more than the experts of any MoE layer."""
    if init in (StudentInit.RANDOM, StudentInit.CHECKPOINT) or not teacher.moe_layer_indices():
        return
    hidden = teacher.expert_hidden
    fewest = min(n for n in teacher.experts_per_block() if n)
    if width % hidden or not 1 <= width // hidden <= fewest:
        raise ValueError(
            f"distill.init={init.value} needs distill.width a multiple m of the teacher's "
            f"expert_hidden={hidden} with 1 <= m <= {fewest} (its fewest experts per layer); "
            f"got width {width}. Choose such a width or distill.init=random"
        )


# --- usage and initialisation ------------------------------------------------------------


def _shares(counts: Tensor) -> Tensor:
    total = float(counts.sum())
    if total <= 0:
        return torch.full_like(counts, 1.0 / len(counts))
    return counts / total


def usage_order(usage_E: Tensor) -> list[int]:
    """Expert positions by usage, most used first, ties to the lower position."""
    return sorted(range(len(usage_E)), key=lambda e: (-float(usage_E[e]), e))


def combine_experts(
    weights: dict[str, Tensor], usage_E: Tensor, init: StudentInit, slices: int
) -> dict[str, Tensor]:
    """The student FFN's tensors from one layer's experts.

    `weights`: the layer's expert tensors stacked over its E experts (`w1_EDH` [E, D, H],
    `w2_EHD` [E, H, D], `w3_EDH`); `usage_E`: their usage. Returns the same names shaped
    [1, D, m*H] / [1, m*H, D] (m = `slices`), as `top` or `merge` defines them (module
    docstring)."""
    num_experts = len(usage_E)
    if not 1 <= slices <= num_experts:
        raise ValueError(f"slices={slices} is invalid for {num_experts} experts")
    order = usage_order(usage_E)
    if init == StudentInit.TOP:
        groups = [[e] for e in order[:slices]]
        inner = [torch.ones(1, dtype=torch.float64) for _ in groups]
        outer = _shares(usage_E[order[:slices]])
    elif init == StudentInit.MERGE:
        groups = [order[g::slices] for g in range(slices)]
        inner = [_shares(usage_E[group]) for group in groups]
        outer = _shares(torch.stack([usage_E[group].sum() for group in groups]))
    else:
        raise ValueError(f"init={init!r} combines no experts; accepted: top, merge")
    out: dict[str, list[Tensor]] = {name: [] for name in weights}
    for group, inner_G, share in zip(groups, inner, outer):
        for name, stacked in weights.items():
            coefficients = inner_G.to(stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
            merged = (stacked[group] * coefficients).sum(0)
            if name.startswith("w2"):
                merged = merged * share.to(stacked.dtype)
            out[name].append(merged)
    # Up-projections concatenate along H (their last dim), the down-projection along its first.
    return {
        name: torch.cat(parts, dim=0 if name.startswith("w2") else 1).unsqueeze(0)
        for name, parts in out.items()
    }


def _dense_ffn_weights(ffn: Any) -> dict[str, Tensor] | None:
    """A teacher's dense FFN in expert layout ([1, D, H] / [1, H, D]), or None."""
    if isinstance(ffn, ExpertFFN) and isinstance(ffn.experts, Experts):
        return {k: v.detach() for k, v in ffn.experts.state_dict().items()}
    if isinstance(ffn, DenseMLP):
        out = {"w1_EDH": ffn.up.weight.t()[None], "w2_EHD": ffn.down.weight.t()[None]}
        if ffn.gate is not None:
            out["w3_EDH"] = ffn.gate.weight.t()[None]
        return {k: v.detach() for k, v in out.items()}
    return None


@torch.no_grad()
def initialise_student(
    student: MoETransformer,
    teacher: MoETransformer,
    init: StudentInit,
    usage: dict[int, Tensor],
    experts: CheckpointExperts,
) -> dict[int, str]:
    """Initialise `student` from `teacher` as `init` says (module docstring).

    `usage`: block -> the teacher's expert usage by global id (`moe.usage.ExpertUsage`,
    summed over the ranks); `experts`: the teacher's float experts. Only the experts
    `top` chooses are read. Returns, per block, what its FFN was initialised from."""
    if init in (StudentInit.RANDOM, StudentInit.CHECKPOINT):
        return {}
    teacher_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        if ".ffn." not in name:
            tensor.copy_(teacher_state[name])
    moe_blocks = dict(teacher.moe_layers())
    report: dict[int, str] = {}
    for block, student_block in enumerate(student.blocks):
        ffn = student_block.ffn
        assert isinstance(ffn, ExpertFFN), f"the student's block {block} FFN is {type(ffn)}"
        target = ffn.experts
        tensors: dict[str, Tensor] | None
        if block in moe_blocks:
            ids = experts.ids(block)
            usage_E = usage[block][ids] if block in usage else torch.zeros(len(ids))
            slices = target.d_hidden // moe_blocks[block].experts.d_hidden
            # `top` reads only its chosen experts (their usage in the same order).
            if init == StudentInit.TOP:
                ids = [ids[e] for e in usage_order(usage_E)[:slices]]
                usage_E = usage[block][ids] if block in usage else torch.zeros(len(ids))
                report[block] = f"top: experts {ids}"
            else:
                report[block] = f"merge: {len(ids)} experts into {slices} slice(s)"
            tensors = combine_experts(experts.read(block, ids), usage_E, init, slices)
        else:
            tensors = _dense_ffn_weights(teacher.blocks[block].ffn)
            state = target.state_dict()
            if tensors is None or any(
                k not in tensors or tensors[k].shape != v.shape for k, v in state.items()
            ):
                report[block] = "random (the teacher's dense FFN has another shape)"
                continue
            report[block] = "the teacher's dense FFN"
        for key, param in target.state_dict().items():
            param.copy_(tensors[key])
    return report
