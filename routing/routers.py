"""Routers: token (or task) -> RoutingPlan with every slot kept.

- `TopKRouter`: softmax over x W_r, top-k (Switch k=1, GShard k=2), balance loss,
  z-loss, optional multiplicative jitter on the router input during training.
- `SigmaRouter`: sigma-MoE (Csordas et al. 2023): sigmoid gates, top-k by gate value,
  each expert weighted by its own gate (no renormalisation), batch-entropy
  regulariser, expert dropout before the top-k.
- `TaskRouter`: task-level MoE (Kudugunta et al. 2021): a learned logit table indexed by
  the task id, so all tokens of a task go to the same K experts.

Every router can be restricted to a subset of its experts (`Router.restrict`, used by
task expert subsets at inference): the other experts' logits are masked to -inf before
the selection, so the softmax renormalises over the allowed ones and top-k never picks a
missing expert. Expert ids in the plan stay global.

Shapes: T tokens, D model width, E experts, K experts per token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from routing.config import RouterKind, RoutingConfig
from routing.losses import (
    batch_entropy_regularizer,
    load_balancing_loss,
    mean_entropy,
    router_z_loss,
)
from routing.plan import RoutingPlan, count_per_expert
from routing.topk import topk_lowest_id


def validate_tokens(x_TD: Tensor, d_model: int, check_finite: bool) -> None:
    """Raise ValueError for input a router cannot take."""
    if not isinstance(x_TD, Tensor):
        raise ValueError(f"expected a torch.Tensor of tokens, got {type(x_TD).__name__}")
    if x_TD.dim() != 2 or x_TD.shape[1] != d_model:
        raise ValueError(
            f"tokens have shape {tuple(x_TD.shape)}; expected [T, {d_model}] (T tokens, d_model)"
        )
    if not x_TD.is_floating_point():
        raise ValueError(f"tokens have dtype {x_TD.dtype}; expected a floating-point dtype")
    if check_finite and not bool(torch.isfinite(x_TD).all()):
        raise ValueError("tokens contain NaN or Inf (routing.check_finite=true)")


def _router_dtype(x_TD: Tensor) -> torch.dtype:
    # Routing decisions in at least fp32: bf16 logits flip top-k choices.
    return torch.promote_types(x_TD.dtype, torch.float32)


def router_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """logits_TE = x W^T in at least fp32, under `torch.autocast` too (which would run
    the linear in bf16): the softmax/sigmoid, the top-k choice and the aux and z losses
    all read these logits.

    Under autocast the backward's two matmuls (dx = dlogits W, dW = dlogits^T x) take
    autocast's dtype, as every other linear's backward in the step does: the choice
    needs fp32 logits, the gradients do not need more than the rest of the model gets.
    At top-8 of 128 experts (T=4096, D=512, 2 threads, AMD EPYC with avx512_bf16) the
    fp32 forward and backward took 9.6 ms of a 100 ms bf16 layer step; the bf16
    backward saves about 3.5 of them."""
    dtype = _router_dtype(x_TD)
    device_type = x_TD.device.type
    if torch.is_autocast_enabled(device_type):
        grad_dtype = torch.get_autocast_dtype(device_type)
        if grad_dtype != dtype:
            return _ExactLogits.apply(x_TD, weight_ED, dtype, grad_dtype)
    with torch.autocast(device_type, enabled=False):
        return nn.functional.linear(x_TD.to(dtype), weight_ED.to(dtype))


class _ExactLogits(torch.autograd.Function):
    """x W^T in `dtype`, its gradients computed in `grad_dtype` (returned in x's and W's
    own dtypes)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x_TD: Tensor,
        weight_ED: Tensor,
        dtype: torch.dtype,
        grad_dtype: torch.dtype,
    ) -> Tensor:
        ctx.save_for_backward(x_TD, weight_ED)
        ctx.grad_dtype = grad_dtype  # type: ignore[attr-defined]
        with torch.autocast(x_TD.device.type, enabled=False):
            return nn.functional.linear(x_TD.to(dtype), weight_ED.to(dtype))

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dlogits_TE: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        x_TD, weight_ED = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_dtype = ctx.grad_dtype  # type: ignore[attr-defined]
        needs_x, needs_w = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        g_TE = dlogits_TE.to(grad_dtype)
        dx_TD = dw_ED = None
        with torch.autocast(x_TD.device.type, enabled=False):
            if needs_x:
                dx_TD = (g_TE @ weight_ED.to(grad_dtype)).to(x_TD.dtype)
            if needs_w:
                dw_ED = (g_TE.t() @ x_TD.to(grad_dtype)).to(weight_ED.dtype)
        return dx_TD, dw_ED, None, None


class Router(nn.Module):
    """What every router shares: its expert count, config, and an optional restriction
    to a subset of experts (`allowed_E`, a bool buffer; None = all)."""

    allowed_E: Tensor | None

    def __init__(self, d_model: int, num_experts: int, config: RoutingConfig) -> None:
        super().__init__()
        config.validate_for(num_experts)
        self.d_model = d_model
        self.num_experts = num_experts
        self.config = config
        self.register_buffer("allowed_E", None, persistent=False)

    def restrict(self, expert_ids: list[int] | None) -> None:
        """Route only to `expert_ids` from now on (None lifts the restriction)."""
        if expert_ids is None:
            self.allowed_E = None
            return
        ids = sorted(set(expert_ids))
        if len(ids) < self.config.top_k or ids[0] < 0 or ids[-1] >= self.num_experts:
            raise ValueError(
                f"expert_ids={list(expert_ids)} cannot restrict a top-{self.config.top_k} router "
                f"over {self.num_experts} experts; accepted: at least top_k distinct ids in "
                f"[0, {self.num_experts - 1}]"
            )
        allowed_E = torch.zeros(self.num_experts, dtype=torch.bool)
        allowed_E[ids] = True
        self.allowed_E = allowed_E

    def mask(self, logits_TE: Tensor) -> Tensor:
        """Logits with the experts outside the restriction at -inf."""
        if self.allowed_E is None:
            return logits_TE
        return logits_TE.masked_fill(~self.allowed_E.to(logits_TE.device), float("-inf"))

    def expert_down_std(self, d_hidden: int) -> float | None:
        """The std the experts' down-projection should start with under this router
        (None: the experts' own default)."""
        return None

    @property
    def routes_by_task(self) -> bool:
        """Whether the task id alone picks the experts (then `experts_for_task` says
        which, without looking at any token)."""
        return False

    def experts_for_task(self, task_id: int) -> list[int]:
        """The K experts every token of `task_id` is sent to (sorted); only a router
        that `routes_by_task` knows them without data."""
        raise ValueError(
            f"routing.router={self.config.router.value} routes each token by its content: "
            "the experts of a task must be measured on its data, not read off the router"
        )


def softmax_topk_plan(logits_TE: Tensor, config: RoutingConfig) -> RoutingPlan:
    """Softmax top-k selection with balance and z losses; every slot kept. Logits at
    -inf (a restricted router) get probability 0 and are never selected."""
    num_experts = logits_TE.shape[1]
    probs_TE = torch.softmax(logits_TE, dim=-1)
    scores_TK, expert_ids_TK = topk_lowest_id(probs_TE, config.top_k)
    weights_TK = scores_TK
    # Top-1 keeps its probability (Switch): renormalised it would be 1, and the router
    # would get no gradient from the output (unless the config asks: the HF families).
    if config.normalize_weights and (config.top_k > 1 or config.normalize_top1):
        weights_TK = scores_TK / scores_TK.sum(dim=-1, keepdim=True)
    balance = load_balancing_loss(probs_TE, expert_ids_TK)
    z_loss = router_z_loss(logits_TE)
    aux = config.aux_loss_weight * balance + config.z_loss_weight * z_loss
    return _kept_plan(
        expert_ids_TK,
        weights_TK,
        scores_TK.detach(),
        aux,
        mean_entropy(probs_TE.detach()),
        {"load_balance": balance.detach(), "z_loss": z_loss.detach()},
        num_experts,
        probs_TE,
    )


def _kept_plan(
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    scores_TK: Tensor,
    aux_loss: Tensor,
    entropy: Tensor,
    losses: dict[str, Tensor],
    num_experts: int,
    probs_TE: Tensor | None = None,
) -> RoutingPlan:
    return RoutingPlan(
        expert_ids_TK=expert_ids_TK,
        weights_TK=weights_TK,
        scores_TK=scores_TK,
        keep_TK=torch.ones_like(expert_ids_TK, dtype=torch.bool),
        counts_E=count_per_expert(expert_ids_TK, torch.ones_like(expert_ids_TK), num_experts),
        aux_loss=aux_loss,
        router_entropy=entropy,
        losses=losses,
        capacity=None,
        probs_TE=probs_TE,
    )


class TopKRouter(Router):
    """Softmax top-k router (Shazeer 2017; GShard; Switch)."""

    def __init__(self, d_model: int, num_experts: int, config: RoutingConfig) -> None:
        super().__init__(d_model, num_experts, config)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x_TD: Tensor, task_ids_T: Tensor | None = None) -> RoutingPlan:
        validate_tokens(x_TD, self.d_model, self.config.check_finite)
        if self.training and self.config.jitter_noise > 0:
            # Switch Transformer: multiplicative noise on the router input.
            eps = self.config.jitter_noise
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = router_logits(x_TD, self.gate.weight)
        return softmax_topk_plan(self.mask(logits_TE), self.config)


class SigmaRouter(Router):
    """Sigma-MoE router: s = sigmoid(x W_r); top-k by s; weight = s (no renormalisation).

    Expert dropout follows the authors' reference layer: in training each (token, expert)
    gate is removed from selection with probability `expert_dropout` before the top-k,
    but a chosen expert is weighted by its undropped gate. A restriction removes experts
    from selection the same way (gates are per expert: nothing to renormalise).
    """

    def __init__(self, d_model: int, num_experts: int, config: RoutingConfig) -> None:
        super().__init__(d_model, num_experts, config)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rows normalised to equal norm, keeping the matrix's overall std."""
        with torch.no_grad():
            weight = self.gate.weight
            nn.init.normal_(weight, std=self.d_model**-0.5)
            std = weight.std()
            weight.div_(weight.norm(dim=1, keepdim=True))
            weight.mul_(std / weight.std())

    def expert_down_std(self, d_hidden: int) -> float:
        """sigma-MoE: the down-projection as a dense FFN of width E*H, std (E*H)^-1/2."""
        return 1.0 / math.sqrt(self.num_experts * d_hidden)

    def forward(self, x_TD: Tensor, task_ids_T: Tensor | None = None) -> RoutingPlan:
        validate_tokens(x_TD, self.d_model, self.config.check_finite)
        logits_TE = router_logits(x_TD, self.gate.weight)
        gates_TE = torch.sigmoid(logits_TE)
        selection_TE = self.mask(gates_TE.detach())
        if self.training and self.config.expert_dropout > 0:
            dropped = torch.rand_like(selection_TE) < self.config.expert_dropout
            selection_TE = selection_TE.masked_fill(dropped, float("-inf"))
        expert_ids_TK = topk_lowest_id(selection_TE, self.config.top_k)[1]
        weights_TK = gates_TE.gather(1, expert_ids_TK)
        entropy_reg = batch_entropy_regularizer(logits_TE)
        probs_TE = torch.softmax(logits_TE.detach(), dim=-1)
        return _kept_plan(
            expert_ids_TK,
            weights_TK,
            weights_TK.detach(),
            self.config.entropy_weight * entropy_reg,
            mean_entropy(probs_TE),
            {"entropy_reg": entropy_reg.detach()},
            self.num_experts,
            gates_TE,
        )


class TaskRouter(Router):
    """Task-level router: logits_E = table[task_id]; softmax top-k as `TopKRouter`.

    The table is an embedding of the task id projected to E logits (one learned
    [num_tasks, E] matrix, the product of the two folded together).
    """

    def __init__(self, d_model: int, num_experts: int, config: RoutingConfig) -> None:
        super().__init__(d_model, num_experts, config)
        self.task_logits = nn.Embedding(config.num_tasks, num_experts)
        nn.init.normal_(self.task_logits.weight, std=1.0)

    def forward(self, x_TD: Tensor, task_ids_T: Tensor | None = None) -> RoutingPlan:
        validate_tokens(x_TD, self.d_model, self.config.check_finite)
        if task_ids_T is None:
            raise ValueError("routing.router=task needs task_ids for every token; got None")
        if task_ids_T.shape != x_TD.shape[:1]:
            raise ValueError(
                f"task_ids have shape {tuple(task_ids_T.shape)}; expected [{x_TD.shape[0]}]"
            )
        # Under torch.compile the range check would need the ids on the host (a graph
        # break); the compiled step relies on the embedding's own bounds check.
        if (
            task_ids_T.numel()
            and not torch.compiler.is_compiling()
            and (int(task_ids_T.min()) < 0 or int(task_ids_T.max()) >= self.config.num_tasks)
        ):
            raise ValueError(
                f"task ids must lie in [0, {self.config.num_tasks - 1}] "
                f"(routing.num_tasks={self.config.num_tasks}); "
                f"got min {int(task_ids_T.min())}, max {int(task_ids_T.max())}"
            )
        dtype = _router_dtype(x_TD)
        logits_TE = self.task_logits(task_ids_T).to(dtype)
        return softmax_topk_plan(self.mask(logits_TE), self.config)

    @property
    def routes_by_task(self) -> bool:
        return True

    def experts_for_task(self, task_id: int) -> list[int]:
        """The K experts every token of `task_id` is sent to (sorted)."""
        if not 0 <= task_id < self.config.num_tasks:
            raise ValueError(
                f"task id {task_id} is outside [0, {self.config.num_tasks - 1}] "
                f"(routing.num_tasks={self.config.num_tasks})"
            )
        logits_E = self.mask(self.task_logits.weight[task_id])
        return sorted(topk_lowest_id(logits_E, self.config.top_k)[1].tolist())


def build_router(d_model: int, num_experts: int, config: RoutingConfig) -> Router:
    """The router the config names."""
    kinds: dict[RouterKind, type[Router]] = {
        RouterKind.TOPK: TopKRouter,
        RouterKind.SIGMA: SigmaRouter,
        RouterKind.TASK: TaskRouter,
    }
    return kinds[RouterKind(config.router)](d_model, num_experts, config)
