"""Routers and capacity policies: hand-computed cases and loop oracles."""

from __future__ import annotations

import math

import pytest
import torch

from moe.reference import reference_keep
from routing import (
    CapacityKind,
    RoutingConfig,
    SigmaRouter,
    TaskRouter,
    TopKRouter,
    apply_capacity,
    expert_capacity,
    keep_within_capacity,
    priority_order,
)
from routing.config import PriorityKind
from routing.routers import router_logits, softmax_topk_plan
from routing.topk import ARGMAX_MAX_K, topk_lowest_id

# Four tokens, two experts, two choices each; capacity 2 (C=0.5: 0.5*2*4/2 = 2).
IDS_TK = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
SCORES_TK = torch.tensor([[0.5, 0.3], [0.4, 0.3], [0.9, 0.05], [0.6, 0.35]])


def test_capacity_formula_rounds_half_up() -> None:
    assert expert_capacity(10, 4, 2, 1.25, 1) == 6  # 6.25
    assert expert_capacity(6, 4, 1, 1.0, 1) == 2  # 1.5 -> 2
    assert expert_capacity(4, 2, 2, 0.5, 1) == 2
    assert expert_capacity(3, 8, 1, 0.1, 1) == 1  # min_capacity
    assert expert_capacity(3, 8, 1, 0.1, 0) == 0


def test_vanilla_order_hand_computed() -> None:
    # First choices in token order: t0,t1 fill expert 0, t2's first choice is dropped,
    # t3 takes expert 1. Second choices: t0 fills expert 1; the rest find it full.
    keep = keep_within_capacity(IDS_TK, torch.arange(4), capacity=2)
    expected = torch.tensor([[True, True], [True, False], [False, False], [True, False]])
    assert torch.equal(keep, expected)


def test_priority_order_hand_computed() -> None:
    # By max score: t2 (0.9), t3 (0.6), t0 (0.5), t1 (0.4). First choices: t2 -> e0,
    # t3 -> e1, t0 -> e0, t1 dropped; second choices: t2 -> e1, the rest dropped.
    order = priority_order(SCORES_TK, PriorityKind.MAX)
    assert order.tolist() == [2, 3, 0, 1]
    keep = keep_within_capacity(IDS_TK, order, capacity=2)
    expected = torch.tensor([[True, False], [False, False], [True, True], [True, False]])
    assert torch.equal(keep, expected)
    # By sum: t3 (0.95) before t2 (0.95 - 0.01), then t0, t1.
    assert priority_order(SCORES_TK, PriorityKind.SUM).tolist() == [3, 2, 0, 1]


def test_priority_beats_vanilla_for_confident_tokens() -> None:
    config = RoutingConfig(capacity=CapacityKind.PRIORITY, capacity_factor=0.5)
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.45, 0.55], [0.95, 0.05], [0.05, 0.95]]))
    plan = apply_capacity(softmax_topk_plan(logits, config), config)
    # The two confident tokens (2 and 3) keep their first choice.
    assert bool(plan.keep_TK[2, 0]) and bool(plan.keep_TK[3, 0])


@pytest.mark.parametrize("seed", range(6))
def test_capacity_matches_loop_oracle(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    num_tokens, num_experts, top_k = 37, 5, 3
    ids = torch.stack(
        [torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)]
    )
    order = torch.randperm(num_tokens, generator=generator)
    for capacity in (0, 1, 4, 9, 40):
        keep = keep_within_capacity(ids, order, capacity)
        assert torch.equal(keep, reference_keep(ids, order.tolist(), capacity))


def test_dropless_keeps_everything_and_counts() -> None:
    config = RoutingConfig(capacity="dropless", top_k=2)
    router = TopKRouter(8, 4, config)
    plan = apply_capacity(router(torch.randn(50, 8)), config)
    assert bool(plan.keep_TK.all()) and plan.capacity is None
    assert int(plan.counts_E.sum()) == 100
    assert float(plan.stats.dropped_fraction) == 0.0


def test_fixed_capacity_stats() -> None:
    config = RoutingConfig(capacity="fixed", capacity_factor=0.5, top_k=1)
    router = TopKRouter(8, 4, config)
    plan = apply_capacity(router(torch.randn(64, 8)), config)
    assert plan.capacity == 8
    assert int(plan.counts_E.max()) <= 8
    kept = int(plan.keep_TK.sum())
    assert math.isclose(float(plan.stats.dropped_fraction), 1 - kept / 64, abs_tol=1e-6)
    assert torch.equal(plan.stats.tokens_per_expert_E, plan.counts_E.float())


def test_softmax_losses_match_formulas() -> None:
    config = RoutingConfig(top_k=2, aux_loss_weight=0.1, z_loss_weight=0.01)
    logits = torch.randn(30, 6, dtype=torch.float64)
    plan = softmax_topk_plan(logits, config)
    probs = torch.softmax(logits, -1)
    ids = probs.topk(2, -1).indices
    f = torch.stack([(ids == e).sum() for e in range(6)]).double() / ids.numel()
    balance = 6 * (f * probs.mean(0)).sum()
    z_loss = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(plan.losses["load_balance"], balance)
    torch.testing.assert_close(plan.losses["z_loss"], z_loss)
    torch.testing.assert_close(plan.aux_loss, 0.1 * balance + 0.01 * z_loss)
    torch.testing.assert_close(plan.weights_TK.sum(-1), torch.ones(30, dtype=torch.float64))
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(plan.stats.router_entropy, entropy)
    # Uniform routing gives a balance loss of exactly 1.
    uniform = softmax_topk_plan(torch.zeros(6, 6), RoutingConfig(top_k=1))
    assert float(uniform.losses["load_balance"]) == pytest.approx(1.0)


def test_unnormalized_weights_are_probabilities() -> None:
    config = RoutingConfig(top_k=2, normalize_weights=False)
    logits = torch.randn(10, 5)
    plan = softmax_topk_plan(logits, config)
    torch.testing.assert_close(plan.weights_TK, torch.softmax(logits, -1).topk(2, -1).values)


def test_top1_weight_is_its_probability_and_trains_the_router() -> None:
    # Switch: renormalising a single weight would make it 1 and cut the router off.
    router = TopKRouter(8, 4, RoutingConfig(top_k=1, normalize_weights=True))
    x = torch.randn(16, 8)
    plan = router(x)
    probs = torch.softmax(x @ router.gate.weight.T, -1)
    torch.testing.assert_close(plan.weights_TK[:, 0], probs.max(-1).values)
    assert bool((plan.weights_TK < 1).all())
    plan.weights_TK.sum().backward()
    assert router.gate.weight.grad is not None and bool(router.gate.weight.grad.abs().sum() > 0)


def test_jitter_only_in_training() -> None:
    router = TopKRouter(8, 4, RoutingConfig(jitter_noise=0.5))
    x = torch.randn(16, 8)
    router.eval()
    assert torch.equal(router(x).weights_TK, router(x).weights_TK)
    router.train()
    assert not torch.equal(router(x).weights_TK, router(x).weights_TK)


def test_sigma_router_selection_and_regularizer() -> None:
    config = RoutingConfig(router="sigma", top_k=2, entropy_weight=0.5)
    router = SigmaRouter(8, 6, config).double().eval()
    x = torch.randn(20, 8, dtype=torch.float64)
    plan = router(x)
    logits = x @ router.gate.weight.t()
    gates = torch.sigmoid(logits)
    torch.testing.assert_close(plan.weights_TK, gates.topk(2, -1).values)
    mean_probs = torch.softmax(logits, -1).mean(0)
    negative_entropy = (mean_probs * mean_probs.log()).sum()
    torch.testing.assert_close(plan.losses["entropy_reg"], negative_entropy)
    torch.testing.assert_close(plan.aux_loss, 0.5 * negative_entropy)
    # Rows of the router have equal norm.
    norms = router.gate.weight.norm(dim=1)
    torch.testing.assert_close(norms, norms.mean().expand_as(norms))


def test_sigma_expert_dropout_changes_selection_in_training_only() -> None:
    config = RoutingConfig(router="sigma", top_k=2, expert_dropout=0.5)
    router = SigmaRouter(8, 8, config)
    x = torch.randn(200, 8)
    router.eval()
    eval_ids = router(x).expert_ids_TK
    router.train()
    torch.manual_seed(0)
    train_plan = router(x)
    assert not torch.equal(train_plan.expert_ids_TK, eval_ids)
    gates = torch.sigmoid(x @ router.gate.weight.t())
    torch.testing.assert_close(train_plan.weights_TK, gates.gather(1, train_plan.expert_ids_TK))


def test_task_router_sends_a_task_to_its_experts() -> None:
    config = RoutingConfig(router="task", num_tasks=3, top_k=2)
    router = TaskRouter(8, 6, config)
    tasks = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    plan = router(torch.randn(8, 8), tasks)
    for task in range(3):
        rows = plan.expert_ids_TK[tasks == task]
        assert all(sorted(r) == router.experts_for_task(task) for r in rows.tolist())
    with pytest.raises(ValueError, match="task_ids"):
        router(torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        router(torch.randn(2, 8), torch.tensor([0, 3]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity_factor": 0.0}, "capacity_factor=0.0"),
        ({"capacity_factor": -1.0}, "capacity_factor=-1.0"),
        ({"top_k": 0}, "top_k=0"),
        ({"router": "softmax"}, "topk, sigma, task"),
        ({"capacity": "fixd"}, "fixed, priority, dropless"),
        ({"expert_dropout": 1.0}, "expert_dropout"),
        ({"router": "task"}, "num_tasks"),
    ],
)
def test_bad_config_is_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RoutingConfig(**kwargs)


def test_bad_tokens_are_named() -> None:
    router = TopKRouter(8, 4, RoutingConfig(top_k=2, check_finite=True))
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4"):
        TopKRouter(8, 4, RoutingConfig(top_k=5))
    with pytest.raises(ValueError, match=r"expected \[T, 8\]"):
        router(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"dtype torch\.int64"):
        router(torch.ones(4, 8, dtype=torch.int64))
    bad = torch.randn(4, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        router(bad)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_ties_choose_lowest_expert_ids(top_k: int) -> None:
    """All-equal router scores: every token gets experts 0..K-1, for every router."""
    num_tokens, num_experts = 9, 6
    x = torch.randn(num_tokens, 8)
    expected = torch.arange(top_k).expand(num_tokens, top_k)
    tasks = torch.tensor([0, 1, 2] * 3)
    topk = TopKRouter(8, num_experts, RoutingConfig(top_k=top_k))
    sigma = SigmaRouter(8, num_experts, RoutingConfig(router="sigma", top_k=top_k))
    task = TaskRouter(8, num_experts, RoutingConfig(router="task", num_tasks=3, top_k=top_k))
    with torch.no_grad():
        topk.gate.weight.zero_()
        sigma.gate.weight.zero_()
        task.task_logits.weight.fill_(0.25)
    for router, task_ids in ((topk, None), (sigma, None), (task, tasks)):
        plan = router.eval()(x, task_ids)
        assert torch.equal(plan.expert_ids_TK, expected), type(router).__name__
    assert all(task.experts_for_task(t) == list(range(top_k)) for t in range(3))
    # Ties between equal scores that are not all equal: the lower id still comes first.
    logits = torch.log(torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.3, 0.1, 0.3, 0.3]]))
    plan = softmax_topk_plan(logits, RoutingConfig(top_k=2))
    assert plan.expert_ids_TK.tolist() == [[1, 2], [0, 2]]


def _topk_by_loops(scores: list[float], k: int) -> list[int]:
    """The k best ids by hand: NaN above everything, then higher score, then lower id."""

    def rank(expert: int) -> tuple[int, float, int]:
        value = scores[expert]
        return (0, 0.0, expert) if math.isnan(value) else (1, -value, expert)

    return sorted(range(len(scores)), key=rank)[:k]


@pytest.mark.parametrize("seed", range(4))
def test_topk_lowest_id_matches_loops_with_ties_inf_and_nan(seed: int) -> None:
    """Both paths (argmax passes for small k, the sort above `ARGMAX_MAX_K`) on scores
    full of ties, -inf (whole rows of it: a restricted expert set) and NaN."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(60):
        num_tokens = int(torch.randint(1, 5, (1,), generator=gen))
        num_experts = int(torch.randint(1, 9, (1,), generator=gen))
        k = int(torch.randint(0, num_experts + 1, (1,), generator=gen))
        scores = torch.randint(-2, 3, (num_tokens, num_experts), generator=gen).double()
        draw = torch.rand(num_tokens, num_experts, generator=gen)
        scores[draw < 0.3] = float("-inf")
        scores[draw > 0.93] = float("nan")
        scores.requires_grad_()
        values, ids = topk_lowest_id(scores, k)
        expected = [_topk_by_loops(row, k) for row in scores.tolist()]
        assert ids.tolist() == expected, (scores, k)
        picked = [[scores[t, e].item() for e in row] for t, row in enumerate(expected)]
        assert torch.allclose(
            values.detach(), torch.tensor(picked).double().view(values.shape), equal_nan=True
        )
    # The values carry the gradient to the picked scores only.
    scores = torch.tensor([[0.1, 0.7, 0.2, 0.7]], requires_grad=True)
    values, ids = topk_lowest_id(scores, 2)
    assert ids.tolist() == [[1, 3]]
    values.sum().backward()
    assert scores.grad is not None and scores.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="top_k=5"):
        topk_lowest_id(scores, 5)


@pytest.mark.parametrize("seed", range(3))
def test_topk_lowest_id_above_argmax_k_matches_loops(seed: int) -> None:
    """k > `ARGMAX_MAX_K` (top-8 routing): `torch.topk` where the k-th score is strictly
    above the next, the sort otherwise. Continuous scores without ties (topk's own
    order), with ties planted inside the chosen set, at its boundary, and NaN; values
    and gradients against the loops."""
    gen = torch.Generator().manual_seed(seed)
    for trial in range(40):
        num_tokens, num_experts = 6, int(torch.randint(ARGMAX_MAX_K + 2, 20, (1,), generator=gen))
        k = int(torch.randint(ARGMAX_MAX_K + 1, num_experts, (1,), generator=gen))
        scores = torch.rand(num_tokens, num_experts, generator=gen, dtype=torch.float64)
        order = scores.argsort(dim=-1, descending=True)
        rows = torch.arange(num_tokens)
        if trial % 5:
            scores[rows, order[:, 1]] = scores[rows, order[:, 0]]  # a tie inside the set
        if trial % 3 == 1:  # a tie across the boundary in one row
            scores[0, order[0, k]] = scores[0, order[0, k - 1]]
        if trial % 4 == 2:
            scores[1, order[1, num_experts - 1]] = float("nan")
        scores.requires_grad_()
        values, ids = topk_lowest_id(scores, k)
        expected = [_topk_by_loops(row, k) for row in scores.tolist()]
        assert ids.tolist() == expected, (trial, k)
        picked = torch.tensor(
            [[scores[t, e].item() for e in row] for t, row in enumerate(expected)]
        ).double()
        assert torch.allclose(values.detach(), picked, equal_nan=True)
        (grad,) = torch.autograd.grad(values.nansum(), scores)
        chosen = torch.zeros_like(grad)
        chosen[rows.unsqueeze(1), torch.tensor(expected)] = 1.0
        chosen[scores.detach().isnan()] = 0.0  # nansum leaves NaN picks out
        assert torch.equal(grad, chosen)


# --- the router's matmul under autocast ---------------------------------------------


def test_router_logits_stay_fp32_under_autocast_and_backpropagate_in_bf16() -> None:
    """Under bf16 autocast the logits are the fp32 product (the choices are fp32's, bit
    for bit); the backward's matmuls take bf16 operands, as every other linear's do
    under autocast, and return fp32 gradients. Without autocast all of it is fp32."""
    generator = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(*shape, generator=generator) for shape in ((64, 32), (8, 32), (64, 8)))
    x_in, w_in = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router_logits(x_in, w_in)
    assert logits.dtype == torch.float32 and torch.equal(logits, x @ w.t())
    logits.backward(g)
    g_bf16 = g.to(torch.bfloat16)
    assert x_in.grad.dtype == torch.float32 and w_in.grad.dtype == torch.float32
    assert torch.equal(x_in.grad, (g_bf16 @ w.to(torch.bfloat16)).float())
    assert torch.equal(w_in.grad, (g_bf16.t() @ x.to(torch.bfloat16)).float())
    torch.testing.assert_close(x_in.grad, g @ w, rtol=2**-6, atol=0.05)
    torch.testing.assert_close(w_in.grad, g.t() @ x, rtol=2**-6, atol=0.2)
    x_in, w_in = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    router_logits(x_in, w_in).backward(g)
    torch.testing.assert_close(x_in.grad, g @ w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w_in.grad, g.t() @ x, rtol=1e-6, atol=1e-6)


def test_a_router_under_autocast_chooses_as_in_fp32_and_compiles() -> None:
    """The top-k router under bf16 autocast picks fp32's experts; compiled, it gives
    eager's plan and gradients."""
    torch.manual_seed(0)
    router = TopKRouter(32, 16, RoutingConfig(top_k=4))
    x = torch.randn(128, 32)

    def run(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_in = x.clone().requires_grad_(True)
        router.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plan = module(x_in)
        (plan.weights_TK.square().sum() + plan.aux_loss).backward()
        return plan.expert_ids_TK, x_in.grad, router.gate.weight.grad.clone()

    ids, dx, dw = run(router)
    assert torch.equal(ids, router(x).expert_ids_TK)
    ids_c, dx_c, dw_c = run(torch.compile(router, backend="aot_eager", fullgraph=False))
    assert torch.equal(ids_c, ids)
    torch.testing.assert_close(dx_c, dx)
    torch.testing.assert_close(dw_c, dw)
