"""Distillation of an MoE teacher into a dense student built from the same expert code.

The loss (Hinton et al. 2015; METHODS.md), over the N = B*T positions of a batch:

    L = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + alpha * CE(y, z_student)

with the KL summed over the vocabulary and averaged over positions; the temperature
divides both sides' logits, and T^2 keeps the soft term's gradients at the scale of the
hard one as T changes.

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

Unless `random`, attention, embeddings, norms (and the output head) copy from the
teacher, as does the FFN of a teacher block that is dense when its shape fits the
student's. PR-MoE residual MLPs are not carried over.

Legend: N positions, V vocabulary, D model width, H expert hidden width, E experts,
W student FFN width, m = W / H slices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe.checkpoint.files import expert_file, load_tensors
from moe.config import FFNKind, ModelConfig
from moe.experts import DenseMLP, ExpertFFN, Experts
from moe.transformer import MoETransformer
from routing import RoutingConfig
from routing.config import parse_enum


class StudentInit(str, Enum):
    """How the dense student starts (see the module docstring)."""

    RANDOM = "random"
    TOP = "top"
    MERGE = "merge"


class TeacherRouting(str, Enum):
    """How the frozen teacher routes during distillation."""

    DROPLESS = "dropless"  # every choice kept: a token's targets do not depend on its batch
    TRAINED = "trained"  # the capacity policy the teacher was trained with


@dataclass
class DistillConfig:
    """The `distill` group: the loss (`temperature` T > 0, `alpha` >= 0 the weight of the
    hard-label cross entropy), the student's FFN `width` (0: the teacher's active width
    top_k * expert_hidden), its initialisation `init`, the number of training batches
    `usage_batches` on which the teacher's expert usage is measured for `top`/`merge`
    (the run's first global batches), and the teacher's routing."""

    temperature: float = 2.0
    alpha: float = 0.5
    width: int = 0
    init: StudentInit = StudentInit.TOP
    usage_batches: int = 8
    teacher_routing: TeacherRouting = TeacherRouting.DROPLESS

    def __post_init__(self) -> None:
        self.init = parse_enum(StudentInit, self.init, "distill.init")
        self.teacher_routing = parse_enum(
            TeacherRouting, self.teacher_routing, "distill.teacher_routing"
        )
        if not self.temperature > 0:
            raise ValueError(f"distill.temperature={self.temperature} is invalid; accepted: > 0")
        if not self.alpha >= 0:
            raise ValueError(f"distill.alpha={self.alpha} is invalid; accepted: >= 0")
        if not isinstance(self.width, int) or self.width < 0:
            raise ValueError(
                f"distill.width={self.width} is invalid; accepted: 0 (the teacher's active "
                "width top_k * expert_hidden) or a positive integer"
            )
        if self.usage_batches < 1:
            raise ValueError(
                f"distill.usage_batches={self.usage_batches} is invalid; accepted: >= 1"
            )


# --- the loss ----------------------------------------------------------------------------


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T)).

    Logits [..., V] (any leading shape, the same on both sides); computed in float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; the vocabularies must match"
        )
    vocab = student_logits.shape[-1]
    log_q_NV = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    log_p_NV = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(log_q_NV, log_p_NV, reduction="batchmean", log_target=True)
    return temperature**2 * kl


@dataclass(frozen=True)
class DistillLoss:
    """loss = kd + alpha * ce; kd: the T^2-scaled KL term; ce: the student's next-token
    cross entropy against the labels (nats)."""

    loss: Tensor
    kd: Tensor
    ce: Tensor


def distillation_loss(
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    targets_BT: Tensor,
    temperature: float,
    alpha: float,
) -> DistillLoss:
    """Hinton et al.'s loss (module docstring); the teacher's logits carry no gradient."""
    kd = kd_loss(student_logits_BTV, teacher_logits_BTV.detach(), temperature)
    ce = F.cross_entropy(student_logits_BTV.flatten(0, 1).float(), targets_BT.flatten())
    return DistillLoss(loss=kd + alpha * ce, kd=kd, ce=ce)


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
    )


def check_init(teacher: ModelConfig, width: int, init: StudentInit) -> None:
    """`top` and `merge` build the student's FFN from whole experts: its width must be a
    multiple m of expert_hidden, with m no more than the experts of any MoE layer."""
    if init == StudentInit.RANDOM or not teacher.moe_layer_indices():
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


@torch.no_grad()
def measure_expert_usage(
    teacher: MoETransformer, batches: Iterable[tuple[Tensor, Tensor | None]]
) -> dict[int, Tensor]:
    """Block index -> slots routed to each (global) expert, float64 [E], summed over the
    `(tokens_BT, task_ids_B)` batches (this process's tokens; expert-parallel teachers:
    every rank must call this with batches of the same shapes)."""
    usage: dict[int, Tensor] = {}
    for tokens_BT, task_ids_B in batches:
        teacher(tokens_BT, task_ids_B)
        for block, stats in teacher.routing_stats().items():
            load_E = stats.tokens_per_expert_E.detach().to("cpu", torch.float64)
            usage[block] = usage[block] + load_E if block in usage else load_E
    return usage


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


class CheckpointExperts:
    """A teacher's float experts, read (sha256-checked) from its checkpoint files: an
    expert-parallel teacher holds only its own experts, the files hold them all."""

    def __init__(self, checkpoint: str | Path, meta: dict[str, Any]) -> None:
        self.checkpoint = Path(checkpoint)
        self.meta = meta
        self.layers = {layer["module"]: layer for layer in meta["moe_layers"]}

    def _layer(self, block: int) -> dict[str, Any]:
        module = f"blocks.{block}.ffn.experts"
        if module not in self.layers:
            raise ValueError(f"teacher checkpoint {self.checkpoint} has no expert stack {module}")
        layer = self.layers[module]
        if layer["quantization"] != "none":
            raise ValueError(
                f"teacher checkpoint {self.checkpoint} stores {module} as "
                f"{layer['quantization']}; distill.init=top or merge needs float experts "
                "(use distill.init=random)"
            )
        return layer

    def ids(self, block: int) -> list[int]:
        """The global ids of the experts the checkpoint holds in block `block`."""
        return list(self._layer(block)["expert_ids"])

    def read(self, block: int, expert_ids: list[int]) -> dict[str, Tensor]:
        """Block `block`'s expert tensors for `expert_ids`, stacked in that order."""
        layer = self._layer(block)
        parts = [
            load_tensors(self.checkpoint, expert_file(layer["index"], i), self.meta)
            for i in expert_ids
        ]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


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

    `usage`: block -> the teacher's expert usage by global id (`measure_expert_usage`,
    summed over the ranks); `experts`: the teacher's float experts. Only the experts
    `top` chooses are read. Returns, per block, what its FFN was initialised from."""
    if init == StudentInit.RANDOM:
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
