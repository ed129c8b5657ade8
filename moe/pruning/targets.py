"""Which weights of a model pruning may touch, and along which dimension each one's
matmul reduces (where N:M groups lie).

- Experts (`prune.scope=experts`): the float projections of every sharded expert stack
  (`moe.experts.GroupedExperts`): `w1_EDH`, `w3_EDH` [E, D, H] and `w2_EHD` [E, H, D],
  used as x @ w[e], so each expert's matrix reduces over dimension 1 of the stack
  (D for w1/w3, H for w2). Every expert's projection is its own matrix.
- Dense (`prune.scope=dense`): the projections of attention (`qkv_proj`, `out_proj`)
  and of dense FFNs: `DenseMLP` (the dense blocks and PR-MoE's residual MLP; `nn.Linear`
  weights [out, in] reduce over dimension 1) and replicated expert stacks (`ExpertFFN`,
  the distillation student's FFN).
- Never: embeddings, the output head, norms, biases, routers and gates (PR-MoE's 2-way
  gate): they are a small share of the weights and decide where tokens go.

The hidden units of an FFN (`HiddenChannels`) can be permuted without changing its
function: they are the output channels of the up-projections (w1, w3 / up, gate) and
the reduction dimension of the down-projection (w2 / down). That is what the channel
permutation before N:M pruning reorders (`moe.pruning.permutation`).

Legend: E experts (local), D model width, H hidden width, K reduction width.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from moe.attention import CausalSelfAttention
from moe.experts import DenseMLP, GroupedExperts, expert_modules
from moe.pruning.config import PruneScope

EXPERT_PROJECTIONS = ("w1_EDH", "w2_EHD", "w3_EDH")


@dataclass(frozen=True)
class PrunableWeight:
    """One prunable parameter. `expert_ids`: for an expert stack, the global id of each
    row of the leading dimension (one matrix per expert); None: the tensor is one
    matrix. `reduction_dim`: the dimension its matmul sums over."""

    name: str
    param: Tensor  # the nn.Parameter itself
    reduction_dim: int
    expert_ids: tuple[int, ...] | None
    is_expert: bool
    # The expert layer's global expert count (for a stack; 1 otherwise).
    num_global_experts: int = 1

    @property
    def num_matrices(self) -> int:
        return 1 if self.expert_ids is None else len(self.expert_ids)

    def matrices(self, tensor: Tensor) -> Tensor:
        """`tensor` (shaped like the parameter) as [matrices, rows, K]: the reduction
        dimension last, one leading row per matrix (a view or a copy)."""
        if self.expert_ids is None:
            return tensor.movedim(self.reduction_dim, -1).unsqueeze(0)
        return tensor.movedim(self.reduction_dim, -1)

    def from_matrices(self, matrices: Tensor) -> Tensor:
        """Inverse of `matrices`: back to the parameter's shape."""
        if self.expert_ids is None:
            return matrices.squeeze(0).movedim(-1, self.reduction_dim)
        return matrices.movedim(-1, self.reduction_dim)


@dataclass(frozen=True)
class HiddenChannels:
    """An FFN's hidden units: `producers` (parameter, dimension of the hidden units) are
    the up-projections, `consumer` the down-projection, whose reduction dimension they
    are. `stacked`: an expert stack, one independent permutation per expert."""

    name: str
    producers: tuple[tuple[Tensor, int], ...]
    consumer: tuple[Tensor, int]
    consumer_name: str
    stacked: bool
    is_expert: bool


def _in_scope(is_expert: bool, scope: PruneScope) -> bool:
    return scope == PruneScope.ALL or (scope == PruneScope.EXPERTS) == is_expert


def prunable_weights(model: nn.Module, scope: PruneScope) -> list[PrunableWeight]:
    """Every parameter of `model` that `scope` prunes, in module order (module
    docstring). ValueError when expert stacks in scope are not float (int8: prune
    first, then quantize)."""
    weights: list[PrunableWeight] = []
    stacks = dict(expert_modules(model))
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if module_name in stacks:
            is_expert = not module.replicated  # type: ignore[union-attr]
            if not _in_scope(is_expert, scope):
                continue
            if not isinstance(module, GroupedExperts):
                raise ValueError(
                    f"{module_name} stores its experts as {module.quantization} "  # type: ignore[union-attr]
                    "(moe.experts.Experts); pruning needs float experts: prune the float "
                    "checkpoint, then quantize"
                )
            # The MoE layer holding the stack knows the global count (EP, subsets).
            owner = model.get_submodule(module_name.rpartition(".")[0])
            num_global = int(getattr(owner, "num_experts", module.num_experts))
            for key in EXPERT_PROJECTIONS:
                param = getattr(module, key)
                if param is not None:
                    weights.append(
                        PrunableWeight(
                            f"{prefix}{key}", param, 1, module.expert_ids, is_expert, num_global
                        )
                    )
        elif isinstance(module, CausalSelfAttention | DenseMLP) and _in_scope(False, scope):
            for child_name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    weights.append(
                        PrunableWeight(f"{prefix}{child_name}.weight", child.weight, 1, None, False)
                    )
    return weights


def hidden_channels(model: nn.Module, scope: PruneScope) -> list[HiddenChannels]:
    """The permutable FFN hidden dimensions of the FFNs `scope` prunes: float expert
    stacks (one permutation per expert) and `DenseMLP`s."""
    groups: list[HiddenChannels] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, GroupedExperts):
            is_expert = not module.replicated
            if not _in_scope(is_expert, scope):
                continue
            producers: list[tuple[Tensor, int]] = [(module.w1_EDH, 2)]
            if module.w3_EDH is not None:
                producers.append((module.w3_EDH, 2))
            groups.append(
                HiddenChannels(
                    name, tuple(producers), (module.w2_EHD, 1), f"{prefix}w2_EHD", True, is_expert
                )
            )
        elif isinstance(module, DenseMLP) and _in_scope(False, scope):
            producers = [(module.up.weight, 0)]
            if module.gate is not None:
                producers.append((module.gate.weight, 0))
            consumer = (module.down.weight, 1)
            groups.append(
                HiddenChannels(
                    name, tuple(producers), consumer, f"{prefix}down.weight", False, False
                )
            )
    return groups


def check_scope(weights: list[PrunableWeight], scope: PruneScope) -> None:
    """A scope with nothing to prune is a mistake (ValueError saying what would be)."""
    if not weights:
        other = {
            PruneScope.EXPERTS: "the model has no expert stack (a dense model); accepted: "
            "prune.scope=dense or all",
            PruneScope.DENSE: "the model has no attention or dense FFN weights; accepted: "
            "prune.scope=experts or all",
            PruneScope.ALL: "the model has no prunable weight",
        }[scope]
        raise ValueError(f"prune.scope={scope.value} has nothing to prune: {other}")
