"""MoELayer against an end-to-end oracle that shares no code with routing/ or moe/.

The oracle reads only the layer's parameters and config. With plain Python loops over
tokens (docs/METHODS.md: "Capacity and token dropping", "Batch Priority Routing",
"Softmax top-k routers and their losses", "sigma-MoE", "PR-MoE") it computes the router
logits, the probabilities (softmax) or gates (sigmoid), the top-K choices (lowest expert
id first among equal scores), the slots each capacity policy keeps (fixed: choice-major,
every token's first choice before any second choice; priority/BPR: tokens by descending
max or sum score, ties in token order; capacity = round-half-up(C*K*T/E), at least
min_capacity; dropless keeps all), and the output as the weighted sum of the kept
experts' MLPs (plus the PR-MoE residual mix).
The layer's own plan (`layer.route`) is never read, so an error in the router or the
capacity code cannot cancel out.
"""

from __future__ import annotations

import itertools
import math
import zlib
from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch

import routing.capacity
from moe.layer import MoELayer
from routing import CapacityKind, PriorityKind, RouterKind, RoutingConfig

ROUTERS = ["topk", "sigma", "task"]
# (capacity policy, BPR priority)
CAPACITIES = [("fixed", "max"), ("priority", "max"), ("priority", "sum"), ("dropless", "max")]
NUM_TASKS = 3
ATOL, RTOL = 1e-10, 1e-9


# ----------------------------------------------------------------------------- oracle


def _activation(name: str, h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    if name == "swiglu":
        assert gate is not None
        return h * (1.0 / (1.0 + torch.exp(-h))) * gate
    if name == "gelu":  # exact (erf) GELU
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return torch.clamp(h, min=0.0)


def _capacity(num_tokens: int, num_experts: int, top_k: int, factor: float, minimum: int) -> int:
    exact = Decimal(repr(factor)) * top_k * num_tokens / num_experts
    return max(minimum, int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP)))


def oracle_plan(
    layer: MoELayer, x_TD: torch.Tensor, task_ids: list[int] | None
) -> tuple[list[list[int]], list[list[torch.Tensor]], list[list[bool]]]:
    """(choices[t][k], weights[t][k] (differentiable), keep[t][k]) from the weights alone."""
    config = layer.routing
    router_kind = str(config.router.value)
    num_tokens = x_TD.shape[0]
    num_experts, top_k = layer.num_experts, config.top_k
    params = dict(layer.named_parameters())
    choices: list[list[int]] = []
    weights: list[list[torch.Tensor]] = []
    scores: list[list[float]] = []
    for t in range(num_tokens):
        if router_kind == "task":
            assert task_ids is not None
            table = params["router.task_logits.weight"]
            logits = [table[task_ids[t], e] for e in range(num_experts)]
        else:
            gate = params["router.gate.weight"]  # [E, D]
            logits = [(gate[e] * x_TD[t]).sum() for e in range(num_experts)]
        if router_kind == "sigma":
            probs = [1.0 / (1.0 + torch.exp(-logit)) for logit in logits]
        else:
            top = max(float(logit.detach()) for logit in logits)
            exps = [torch.exp(logit - top) for logit in logits]
            total = sum(exps)
            probs = [value / total for value in exps]
        ranked = sorted(range(num_experts), key=lambda e: (-float(probs[e].detach()), e))[:top_k]
        chosen = [probs[e] for e in ranked]
        if router_kind != "sigma" and config.normalize_weights and top_k > 1:
            chosen_sum = sum(chosen)
            chosen = [value / chosen_sum for value in chosen]
        choices.append(ranked)
        weights.append(chosen)
        scores.append([float(probs[e].detach()) for e in ranked])

    capacity_kind = str(config.capacity.value)
    if capacity_kind == "dropless":
        return choices, weights, [[True] * top_k for _ in range(num_tokens)]
    capacity = _capacity(
        num_tokens, num_experts, top_k, config.capacity_factor, config.min_capacity
    )
    if capacity_kind == "priority":
        if str(config.priority.value) == "max":
            priority = [max(row) for row in scores]
        else:
            priority = [sum(row) for row in scores]
        visit = sorted(range(num_tokens), key=lambda t: (-priority[t], t))
    else:
        visit = list(range(num_tokens))
    used = [0] * num_experts
    keep = [[False] * top_k for _ in range(num_tokens)]
    for k in range(top_k):  # choice-major: all first choices before any second choice
        for t in visit:
            expert = choices[t][k]
            if used[expert] < capacity:
                used[expert] += 1
                keep[t][k] = True
    return choices, weights, keep


def oracle_forward(
    layer: MoELayer, x_TD: torch.Tensor, task_ids: list[int] | None
) -> tuple[torch.Tensor, list[list[bool]]]:
    """The layer output, one token at a time, and the kept slots."""
    choices, weights, keep = oracle_plan(layer, x_TD, task_ids)
    params = dict(layer.named_parameters())
    activation = str(layer.experts.activation.value)
    w1, w2 = params["experts.w1_EDH"], params["experts.w2_EHD"]
    w3 = params.get("experts.w3_EDH")
    rows = []
    for t in range(x_TD.shape[0]):
        x_D = x_TD[t]
        y_D = torch.zeros_like(x_D)
        for k, expert in enumerate(choices[t]):
            if not keep[t][k]:
                continue
            h_H = x_D @ w1[expert]
            gate_H = x_D @ w3[expert] if w3 is not None else None
            y_D = y_D + weights[t][k] * (_activation(activation, h_H, gate_H) @ w2[expert])
        if "residual_gate.weight" in params:  # PR-MoE: softmax-mixed dense residual MLP
            mix = params["residual_gate.weight"] @ x_D + params["residual_gate.bias"]
            mix = torch.exp(mix - mix.max())
            mix = mix / mix.sum()
            h_H = params["residual.up.weight"] @ x_D
            residual_gate = params.get("residual.gate.weight")
            gate_H = residual_gate @ x_D if residual_gate is not None else None
            residual_D = params["residual.down.weight"] @ _activation(activation, h_H, gate_H)
            y_D = y_D * mix[0] + residual_D * mix[1]
        rows.append(y_D)
    return torch.stack(rows), keep


# ----------------------------------------------------------------------------- checks


def _layer(
    router: str,
    capacity: str,
    priority: str,
    capacity_factor: float = 0.5,
    min_capacity: int = 1,
    **kwargs: object,
) -> MoELayer:
    config = RoutingConfig(
        router=RouterKind(router),
        capacity=CapacityKind(capacity),
        priority=PriorityKind(priority),
        capacity_factor=capacity_factor,
        min_capacity=min_capacity,
        top_k=2,
        num_tasks=NUM_TASKS,
    )
    return MoELayer(6, 7, 4, config, **kwargs).double().eval()  # type: ignore[arg-type]


def check_against_oracle(layer: MoELayer, num_tokens: int, seed: int) -> list[list[bool]]:
    """Output, input gradient and every parameter gradient of the layer against the
    oracle on fresh random float64 input; returns the oracle's kept slots."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, layer.d_model, dtype=torch.float64, generator=generator)
    tasks = None
    if layer.routing.needs_task_ids:
        tasks = torch.randint(0, NUM_TASKS, (num_tokens,), generator=generator)
    dy = torch.randn(num_tokens, layer.d_model, dtype=torch.float64, generator=generator)
    params = [p for p in layer.parameters() if p.requires_grad]
    names = [n for n, p in layer.named_parameters() if p.requires_grad]

    x_layer = x.clone().requires_grad_()
    y_layer = layer(x_layer, tasks).y
    got = torch.autograd.grad((y_layer * dy).sum(), [x_layer, *params], allow_unused=True)

    x_oracle = x.clone().requires_grad_()
    y_oracle, keep = oracle_forward(layer, x_oracle, None if tasks is None else tasks.tolist())
    want = torch.autograd.grad((y_oracle * dy).sum(), [x_oracle, *params], allow_unused=True)

    torch.testing.assert_close(y_layer, y_oracle, atol=ATOL, rtol=RTOL)
    for name, g, w in zip(["x", *names], got, want):
        if w is None:
            assert g is None or not bool(g.any()), name
            continue
        assert g is not None, name
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL, msg=f"grad {name} differs")
    return keep


@pytest.mark.parametrize(
    ("router", "capacity", "priority"),
    [(r, c, p) for r, (c, p) in itertools.product(ROUTERS, CAPACITIES)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_matches_oracle(router: str, capacity: str, priority: str, seed: int) -> None:
    torch.manual_seed(zlib.crc32(f"{router}-{capacity}-{priority}-{seed}".encode()))
    layer = _layer(router, capacity, priority)
    # C*K*T/E = 0.5*2*10/4 = 2.5: round half up gives 3 (Python's round would give 2).
    keep = check_against_oracle(layer, num_tokens=10, seed=seed)
    dropped = sum(not kept for row in keep for kept in row)
    assert (dropped > 0) == (capacity != "dropless")


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize(("activation", "residual"), [("relu", True), ("swiglu", False)])
def test_activations_residual_and_min_capacity(
    router: str, activation: str, residual: bool
) -> None:
    torch.manual_seed(zlib.crc32(f"{router}-{activation}".encode()))
    # C*K*T/E = 0.05*2*9/4 = 0.225 -> 0; min_capacity 2 decides.
    layer = _layer(
        router,
        "priority",
        "sum",
        capacity_factor=0.05,
        min_capacity=2,
        activation=activation,
        residual_mlp=residual,
    )
    keep = check_against_oracle(layer, num_tokens=9, seed=3)
    assert sum(kept for row in keep for kept in row) <= 2 * layer.num_experts


def test_equal_scores_route_to_lowest_ids_like_the_oracle() -> None:
    layer = _layer("topk", "fixed", "max", capacity_factor=1.0)
    with torch.no_grad():
        dict(layer.named_parameters())["router.gate.weight"].zero_()
    keep = check_against_oracle(layer, num_tokens=8, seed=4)
    # Experts 0 and 1 take everything they can; 2 and 3 get nothing.
    assert sum(keep[t][0] for t in range(8)) == 4 and sum(keep[t][1] for t in range(8)) == 4


# ----------------------------------------------------------------------------- mutations


@pytest.mark.parametrize("priority", ["max", "sum"])
def test_oracle_catches_bpr_in_token_order(priority: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replacing the BPR visiting order with token order must break the agreement."""
    torch.manual_seed(11)
    layer = _layer("topk", "priority", priority)
    check_against_oracle(layer, num_tokens=10, seed=0)  # the real code agrees
    monkeypatch.setattr(
        routing.capacity,
        "priority_order",
        lambda scores_TK, kind: torch.arange(scores_TK.shape[0], device=scores_TK.device),
    )
    with pytest.raises(AssertionError):
        check_against_oracle(layer, num_tokens=10, seed=0)


def test_oracle_catches_bankers_rounding_of_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(12)
    layer = _layer("topk", "fixed", "max")
    check_against_oracle(layer, num_tokens=10, seed=0)
    monkeypatch.setattr(
        routing.capacity,
        "expert_capacity",
        lambda t, e, k, c, m: max(m, round(c * k * t / e)),  # 2.5 -> 2
    )
    with pytest.raises(AssertionError):
        check_against_oracle(layer, num_tokens=10, seed=0)


def test_oracle_catches_token_major_filling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Filling each token's choices before the next token's (not choice-major) fails."""
    torch.manual_seed(13)
    layer = _layer("topk", "fixed", "max")
    check_against_oracle(layer, num_tokens=10, seed=0)

    def token_major(
        expert_ids_TK: torch.Tensor, order_T: torch.Tensor, capacity: int
    ) -> torch.Tensor:
        used: dict[int, int] = {}
        keep = torch.zeros_like(expert_ids_TK, dtype=torch.bool)
        for t in order_T.tolist():
            for k in range(expert_ids_TK.shape[1]):
                e = int(expert_ids_TK[t, k])
                if used.get(e, 0) < capacity:
                    used[e] = used.get(e, 0) + 1
                    keep[t, k] = True
        return keep

    monkeypatch.setattr(routing.capacity, "keep_within_capacity", token_major)
    with pytest.raises(AssertionError):
        check_against_oracle(layer, num_tokens=10, seed=0)
