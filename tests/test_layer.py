"""MoELayer against the per-token loop reference: outputs and every gradient, each
router, capacity policy and activation, fp32 and fp64, with and without the residual MLP.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import moe.layer
from moe.layer import MoELayer
from moe.reference import reference_layer_output
from routing import RoutingConfig

ROUTERS = ["topk", "sigma", "task"]
CAPACITIES = ["fixed", "priority", "dropless"]


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}


def _layer(router: str, capacity: str, capacity_factor: float = 0.75, **kwargs: object) -> MoELayer:
    routing = RoutingConfig(
        router=router,
        capacity=capacity,
        capacity_factor=capacity_factor,  # 0.75 forces drops
        top_k=2,
        num_tasks=3,
        aux_loss_weight=0.01,
        z_loss_weight=0.001,
    )
    return MoELayer(12, 20, 5, routing, **kwargs)  # type: ignore[arg-type]


def _compare(layer: MoELayer, x: torch.Tensor, tasks: torch.Tensor | None) -> None:
    dtype = x.dtype
    out = layer(x, tasks)
    x_ref = x.detach().clone().requires_grad_()
    plan = layer.route(x_ref, tasks)
    y_ref = reference_layer_output(layer, x_ref, plan)
    torch.testing.assert_close(out.y, y_ref, **_tolerance(dtype))
    torch.testing.assert_close(out.aux_loss, plan.aux_loss, **_tolerance(dtype))

    params = [p for p in layer.parameters() if p.requires_grad]
    dy = torch.randn_like(out.y)
    got = torch.autograd.grad((out.y * dy).sum() + out.aux_loss, [x, *params], allow_unused=True)
    want = torch.autograd.grad(
        (y_ref * dy).sum() + plan.aux_loss, [x_ref, *params], allow_unused=True
    )
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None or not bool(g.any()), name
            continue
        torch.testing.assert_close(g, w, **_tolerance(dtype), msg=lambda m, n=name: f"{n}: {m}")


def _set_folding(layer: MoELayer, fold: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fold`: the experts fold the permute wherever the layout allows it, top-2 included
    (`moe.layer.FOLD_MIN_TOP_K`); else never."""
    layer.fold_permute = fold
    monkeypatch.setattr(moe.layer, "FOLD_MIN_TOP_K", 1)


@pytest.mark.parametrize(
    ("router", "capacity", "dtype"),
    list(itertools.product(ROUTERS, CAPACITIES, [torch.float32, torch.float64])),
)
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_layer_matches_reference(
    router: str, capacity: str, dtype: torch.dtype, fold: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fold`: the experts fold the permute into their matmuls where the layout is
    compact (`MoELayer.fold_permute`), or always compute on the permuted rows."""
    torch.manual_seed(zlib.crc32(f"{router}-{capacity}".encode()))
    layer = _layer(router, capacity).to(dtype).eval()
    _set_folding(layer, fold, monkeypatch)
    x = torch.randn(23, 12, dtype=dtype, requires_grad=True)
    tasks = torch.randint(0, 3, (23,)) if router == "task" else None
    _compare(layer, x, tasks)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_fixed_capacity_above_one_uses_compact_rows(
    router: str, fold: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C > 1 runs eagerly on the compact layout (only kept rows; C <= 1 pads to the
    capacity): the same reference, and the experts see exactly the kept slots (as
    permuted rows, or as row indices into the tokens when they fold the permute)."""
    torch.manual_seed(zlib.crc32(f"compact-{router}".encode()))
    layer = _layer(router, "fixed", capacity_factor=1.3).eval()
    _set_folding(layer, fold, monkeypatch)
    x = torch.randn(23, 12, requires_grad=True)
    tasks = torch.randint(0, 3, (23,)) if router == "task" else None
    seen: list[int] = []
    hook = layer.experts.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    forward_tokens = layer.experts.forward_tokens

    def spy(x_TD: torch.Tensor, token_index_R: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        seen.append(token_index_R.shape[0])
        return forward_tokens(x_TD, token_index_R, *rest)

    layer.experts.forward_tokens = spy  # type: ignore[method-assign]
    _compare(layer, x, tasks)
    hook.remove()
    kept = int(layer.route(x.detach(), tasks).keep_TK.sum())
    assert seen == [kept], (seen, kept)


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
@pytest.mark.parametrize("residual", [False, True])
def test_activations_and_residual(activation: str, residual: bool) -> None:
    torch.manual_seed(7)
    layer = _layer("topk", "priority", activation=activation, residual_mlp=residual).double()
    x = torch.randn(17, 12, dtype=torch.float64, requires_grad=True)
    _compare(layer.eval(), x, None)


def test_training_mode_randomness_is_the_plan() -> None:
    """Jitter and expert dropout only change the plan; the reference on the same plan agrees."""
    routing = RoutingConfig(router="sigma", top_k=2, expert_dropout=0.3, capacity="dropless")
    layer = MoELayer(12, 16, 6, routing).double().train()
    x = torch.randn(15, 12, dtype=torch.float64)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    plan = layer.route(x)
    torch.testing.assert_close(out.y, reference_layer_output(layer, x, plan))


def test_dropped_tokens_get_nothing_or_only_the_residual() -> None:
    torch.manual_seed(0)
    routing = RoutingConfig(top_k=1, capacity="fixed", capacity_factor=0.25)
    layer = MoELayer(8, 16, 2, routing).eval()
    x = torch.randn(16, 8)
    plan = layer.route(x)
    dropped = ~plan.keep_TK.any(dim=1)
    assert bool(dropped.any())
    y = layer(x).y
    assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))
    assert bool((y[~dropped].abs().sum(-1) > 0).all())

    residual_layer = MoELayer(8, 16, 2, routing, residual_mlp=True).eval()
    assert residual_layer.residual is not None and residual_layer.residual_gate is not None
    plan = residual_layer.route(x)
    dropped = ~plan.keep_TK.any(dim=1)
    y = residual_layer(x).y
    coefficients = torch.softmax(residual_layer.residual_gate(x), dim=-1)
    mlp_only = residual_layer.residual(x) * coefficients[:, 1:]
    torch.testing.assert_close(y[dropped], mlp_only[dropped])


def test_gradcheck_layer_float64() -> None:
    torch.manual_seed(1)
    routing = RoutingConfig(top_k=2, capacity="fixed", capacity_factor=1.0)
    layer = MoELayer(4, 6, 3, routing, residual_mlp=True).double().eval()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def fn(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = layer(inp)
        return out.y, out.aux_loss

    # Top-k choice is piecewise constant; the check is local, away from ties.
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


def test_batched_input_shape_and_stats() -> None:
    routing = RoutingConfig(router="task", num_tasks=2, top_k=1, capacity="dropless")
    layer = MoELayer(8, 8, 4, routing)
    x = torch.randn(3, 5, 8)
    tasks = torch.tensor([0, 1, 1]).unsqueeze(1).expand(3, 5)
    out = layer(x, tasks)
    assert out.y.shape == x.shape
    assert layer.last_stats is not None
    assert float(layer.last_stats.tokens_per_expert_E.sum()) == 15.0
    assert not layer.last_stats.tokens_per_expert_E.requires_grad


def test_layer_bad_input() -> None:
    layer = MoELayer(8, 8, 4, RoutingConfig(top_k=2, check_finite=True))
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 8\]"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="task_ids have shape"):
        layer(torch.randn(3, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.full((2, 8), float("nan")))
    with pytest.raises(ValueError, match="top_k=3 exceeds num_experts=2"):
        MoELayer(8, 8, 2, RoutingConfig(top_k=3))
    with pytest.raises(ValueError, match="activation='tanh'"):
        MoELayer(8, 8, 2, RoutingConfig(top_k=1), activation="tanh")
