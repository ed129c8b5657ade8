"""The MoE layer: router -> capacity policy -> permute -> (all-to-all) -> experts ->
(all-to-all back) -> unpermute and weighted combine, plus the optional dense residual
MLP of PR-MoE (DeepSpeed-MoE: out = expert_out * c0 + mlp_out * c1 with c = softmax of a
learned 2-way projection of x), and the optional shared expert (Qwen2-MoE: out =
expert_out + sigmoid(x w_g) * shared_mlp(x), or without the gate expert_out +
shared_mlp(x)). The shared expert is a dense MLP of the layer, replicated like every dense
weight (not sharded over the expert-parallel group), computed on its own: as S/H extra
experts inside the routed pass (SGLang's shared-experts fusion) it measured 1.08-1.25x
slower in training and no faster in decode-sized forwards on CPU
(`scripts/bench_folded_ops.py --shared-expert`, docs/BENCHMARKS.md).

Two layouts of the expert computation when every slot is kept (dropless) and the
experts are local (`ExpertLayout`): `compact`, the routed rows sorted by expert (T*K
rows, the grouped matmul over the experts that got rows), and `padded`, every held
expert's block padded to all T tokens (one batched matmul over E*T rows, each token's
output the sum over its experts with the routing weights, zero for the experts it was
not routed to). Padded reads every held expert and multiplies E/K times the rows, but
is plain batched products with no host-side row counts: the static shape of a compiled
decode step, where the rows are few and the per-op host cost dominates
(`moe.inference.decode`). Elsewhere (capacity-limited plans, expert parallelism) the
layer runs its usual layouts whatever the setting.

Shapes: T tokens, D model width, H expert hidden width, E experts, K slots per token,
R routed rows, L local experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn

from moe.dispatchers import Dispatcher, LocalDispatcher
from moe.experts import Activation, DenseMLP, Experts, GroupedExperts
from moe.permute import (
    Permutation,
    capacity_padded_permutation,
    permute,
    sort_by_expert,
    unpermute,
)
from moe.precision import compute_dtype
from routing import (
    CapacityOverride,
    CapacityState,
    RoutingConfig,
    RoutingPlan,
    RoutingStats,
    apply_capacity,
    build_capacity_state,
    build_router,
)


class ExpertLayout(str, Enum):
    """How a dropless layer with local experts lays out its expert rows (see the module
    docstring); set with `MoETransformer.expert_layout`."""

    COMPACT = "compact"  # T*K rows sorted by expert, the grouped matmul
    PADDED = "padded"  # every held expert on all T tokens, one batched matmul


# The experts fold the permute into their matmuls from this top-k on: the [T*K, D] row
# passes it saves grow with K. bench_layer, fp32, 2 threads, 2026-12-05, folded /
# unfolded: top-8 (E=64, 128, 256) 0.86-0.92 (faster), top-4 (E=64) 0.79, top-2 E=64
# 1.01 and E=8 0.93-1.16 (as fast or slower, by the host's state).
FOLD_MIN_TOP_K = 4


@dataclass(frozen=True)
class MoEOutput:
    """y: the layer output, shaped like the input; aux_loss: the weighted routing loss."""

    y: Tensor
    aux_loss: Tensor


class MoELayer(nn.Module):
    """A mixture-of-experts FFN. With a dispatcher from `moe.dispatchers` the experts are
    sharded over an expert-parallel group; without one all experts are local. `experts`
    is any `moe.experts.Experts` (inference swaps in int8 ones)."""

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        routing: RoutingConfig,
        activation: Activation | str = Activation.GELU,
        residual_mlp: bool = False,
        dispatcher: Dispatcher | None = None,
        shared_expert_hidden: int = 0,
        shared_expert_gate: bool = True,
    ) -> None:
        super().__init__()
        routing.validate_for(num_experts)
        self.d_model = d_model
        self.num_experts = num_experts
        self.routing = routing
        self.router = build_router(d_model, num_experts, routing)
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher(num_experts)
        if self.dispatcher.num_experts != num_experts:
            raise ValueError(
                f"dispatcher routes {self.dispatcher.num_experts} experts but the layer has "
                f"num_experts={num_experts}"
            )
        self.experts: Experts = GroupedExperts(
            self.dispatcher.num_local_experts,
            d_model,
            d_hidden,
            activation,
            expert_ids=self.dispatcher.expert_ids,
            down_std=self.router.expert_down_std(d_hidden),
        )
        self.residual: DenseMLP | None = None
        self.residual_gate: nn.Linear | None = None
        if residual_mlp:
            self.residual = DenseMLP(d_model, d_hidden, activation)
            self.residual_gate = nn.Linear(d_model, 2)
        self.shared_expert: DenseMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if shared_expert_hidden:
            self.shared_expert = DenseMLP(d_model, shared_expert_hidden, activation)
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(d_model, 1, bias=False)
                nn.init.normal_(self.shared_expert_gate.weight, std=d_model**-0.5)
        self.last_stats: RoutingStats | None = None
        # The last forward's chosen experts (global ids), for those who report them.
        self.last_expert_ids_TK: Tensor | None = None
        # A stateful capacity policy's per-layer state (DynaMoE), None for the others.
        self.capacity_state: CapacityState | None = build_capacity_state(num_experts, routing)
        # `MoETransformer.override_capacity` sets it: DROPLESS bypasses the policy.
        self.capacity_override = CapacityOverride.TRAINED
        # `MoETransformer.expert_layout` sets it (the compiled decode step: PADDED).
        self.expert_layout = ExpertLayout.COMPACT
        # Let experts that can (`Experts.folds_permute`) compute on the token rows with
        # the permute and the weighted combine folded into their matmuls, where all
        # experts are local, the layout is compact and top-k >= FOLD_MIN_TOP_K. False:
        # always permute, run the experts on the routed rows, unpermute (kept to
        # measure one against the other).
        self.fold_permute = True

    def route(
        self, x_TD: Tensor, task_ids_T: Tensor | None = None, num_samples: int = 1
    ) -> RoutingPlan:
        """The capacity-applied routing plan of x_TD (no expert computation);
        `num_samples`: the sequences x_TD is made of (a stateful policy's rows). Under
        `CapacityOverride.DROPLESS` every choice is kept, whatever the trained policy
        (its state, if any, is neither read nor updated)."""
        plan = self.router(x_TD, task_ids_T)
        if self.capacity_override == CapacityOverride.DROPLESS:
            return plan
        if self.capacity_state is not None:
            return self.capacity_state.route(plan, num_samples, self.training)
        return apply_capacity(plan, self.routing)

    def _pad_to_capacity(self, plan: RoutingPlan) -> bool:
        """Whether a fixed-capacity plan runs its experts on the capacity-padded layout.

        Always under `torch.compile` (static shapes). Eagerly only at EP=1 when the
        padded rows are at most the routed slots (C <= 1): the layout needs no host sync,
        the experts multiply only its filled rows (one `bmm` when none was dropped), and
        gathering the padding costs little. Above it (C=1.25 pads 25% more rows than
        there are slots) the compact layout moves only the kept rows (bench_layer E=64,
        2026-11-25, before the experts skipped padding: padded C=1.25 1.71x the dense
        floor, compact 1.34x; docs/BENCHMARKS.md). Never eagerly under EP: the
        dispatcher exchanges the counts anyway, and the compact layout sends only the
        kept rows over the network."""
        assert plan.capacity is not None
        if torch.compiler.is_compiling():
            return True
        if self.dispatcher.exchanges_rows:
            return False
        num_slots = plan.expert_ids_TK.numel()
        return plan.capacity * self.num_experts <= num_slots

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> MoEOutput:
        """x: [..., D]; task_ids: [...] (one id per token) or None."""
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"MoELayer input has shape {tuple(x.shape)}; expected [..., {self.d_model}]"
            )
        x_TD = x.reshape(-1, self.d_model)
        task_ids_T = None
        if task_ids is not None:
            if task_ids.shape != x.shape[:-1]:
                raise ValueError(
                    f"task_ids have shape {tuple(task_ids.shape)}; expected {tuple(x.shape[:-1])}"
                )
            task_ids_T = task_ids.reshape(-1)
        plan = self.route(x_TD, task_ids_T, x.shape[0] if x.dim() > 2 else 1)
        if (
            self.expert_layout == ExpertLayout.PADDED
            and plan.capacity is None
            and plan.capacity_E is None
            and not self.dispatcher.exchanges_rows
        ):
            y_TD = self._padded_experts(x_TD, plan)
            return self._finish(x, x_TD, y_TD, plan)
        # Per-expert capacities (a stateful policy's): rows padded to them.
        padded = plan.capacity_E is not None
        if padded:
            assert plan.capacity_E is not None and plan.padded_rows is not None
            permutation = capacity_padded_permutation(plan, plan.capacity_E, plan.padded_rows)
        elif plan.capacity is not None and self._pad_to_capacity(plan):
            # Fixed capacity: each expert's rows padded to the capacity: static shapes
            # (no host sync, no graph break) and one bmm per grouped matmul (moe.ops).
            # A task subset (moe.inference.subset) holds some experts only; its
            # restricted router never picks the others, which get no rows.
            # (Under EP every expert gets its slots: rows go to each expert's owner.)
            held = set(range(self.num_experts))
            if not self.dispatcher.exchanges_rows:
                held = set(self.dispatcher.expert_ids)
            slots_E = [plan.capacity if e in held else 0 for e in range(self.num_experts)]
            permutation = capacity_padded_permutation(plan, slots_E)
        else:
            permutation = sort_by_expert(plan)
        if self._folds_permute(permutation):
            assert permutation.slot_index_R is not None
            weight_R = plan.weights_TK.reshape(-1).index_select(0, permutation.slot_index_R)
            y_TD = self.experts.forward_tokens(
                x_TD.to(compute_dtype(x_TD)),
                permutation.token_index_R,
                weight_R,
                permutation.counts_E,
            )
        else:
            y_TD = self._permuted_forward(x_TD, plan, permutation, padded)
        return self._finish(x, x_TD, y_TD, plan)

    def _folds_permute(self, permutation: Permutation) -> bool:
        """Whether the experts compute on the token rows (`Experts.forward_tokens`): a
        compact layout, every expert local and held here, top-k >= `FOLD_MIN_TOP_K`.
        Under expert parallelism there is nothing to fold: the send buffer of the
        all-to-all is the gathered rows, the experts' rank receives them contiguous per
        expert, and the weighted combine runs on the tokens' rank after the exchange
        back, not beside the last expert matmul."""
        return (
            self.fold_permute
            and permutation.row_of_slot_TK.shape[1] >= FOLD_MIN_TOP_K
            and self.experts.folds_permute
            and permutation.slot_index_R is not None
            and not self.dispatcher.exchanges_rows
            and self.dispatcher.num_local_experts == self.num_experts
        )

    def _permuted_forward(
        self, x_TD: Tensor, plan: RoutingPlan, permutation: Permutation, padded: bool
    ) -> Tensor:
        """Permute, (dispatch,) the experts on the routed rows, (combine,) unpermute."""
        # The routed rows travel and are multiplied in the compute dtype (bf16 under
        # autocast: half the bytes through the permute and the all-to-all); the router
        # above read x_TD as it came (fp32 logits, `routing.routers.router_logits`).
        x_RD = permute(x_TD.to(compute_dtype(x_TD)), permutation)
        dispatch, combine = self.dispatcher.dispatch, self.dispatcher.combine
        if self.dispatcher.exchanges_rows:
            # The EP all-to-all runs eagerly between compiled graphs (launch.training.compile):
            # host-side split sizes and gloo collectives have no place in the graph.
            dispatch, combine = torch.compiler.disable(dispatch), torch.compiler.disable(combine)
        # A padded layout: the experts multiply only the filled rows where the dispatcher
        # can tell them apart (always at EP=1; under EP when the counts are exchanged).
        x_local, counts_local, filled_local, context = dispatch(
            x_RD, permutation.counts_E, uniform_counts=padded, filled_E=permutation.filled_E
        )
        y_local = self.experts(x_local, counts_local, filled_local)
        y_RD = combine(y_local, context)
        return unpermute(y_RD, permutation, plan.weights_TK)

    def _padded_experts(self, x_TD: Tensor, plan: RoutingPlan) -> Tensor:
        """y_TD = sum over the held experts l of weight[t, l] * expert_l(x_t), the weight
        zero where t was not routed to l (`ExpertLayout.PADDED`). Every slot is kept and
        the router chooses only held experts (a subset's router is restricted)."""
        num_tokens = x_TD.shape[0]
        weights_TE = x_TD.new_zeros(num_tokens, self.num_experts)
        weights_TE.scatter_add_(1, plan.expert_ids_TK, plan.weights_TK.to(x_TD.dtype))
        held = self.dispatcher.expert_ids
        weights_TL = weights_TE if len(held) == self.num_experts else weights_TE[:, list(held)]
        y_LTD = self.experts.forward_every(x_TD)
        return torch.einsum("tl,ltd->td", weights_TL, y_LTD)

    def _finish(self, x: Tensor, x_TD: Tensor, y_TD: Tensor, plan: RoutingPlan) -> MoEOutput:
        """The residual MLP (PR-MoE), the stats, the output in x's shape."""
        if self.residual is not None and self.residual_gate is not None:
            gate_T2 = self.residual_gate(x_TD)
            # In at least fp32 (autocast would leave a bf16 softmax; float64 stays float64).
            dtype = torch.promote_types(gate_T2.dtype, torch.float32)
            coefficients_T2 = nn.functional.softmax(gate_T2, dim=-1, dtype=dtype)
            y_TD = y_TD * coefficients_T2[:, :1] + self.residual(x_TD) * coefficients_T2[:, 1:]
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        self.last_stats = plan.stats
        self.last_expert_ids_TK = plan.expert_ids_TK
        return MoEOutput(y=y_TD.reshape(x.shape), aux_loss=plan.aux_loss)
