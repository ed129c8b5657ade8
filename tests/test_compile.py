"""The compiled step (`train.compile=true`, launch.training.compile) and the fast paths it relies on.

- The MoE layer compiles with `fullgraph=True` (no graph break) at EP=1 for every router
  kind, and the compiled layer gives the eager outputs and gradients.
- Training compiled and eager gives the same loss over 20 steps (fp32 tolerance).
- `CompiledStep` counts compilations and keyed rebuilds; config validation.
- The batched (`bmm`) grouped matmul of balanced / capacity-padded loads and the
  capacity-padded permutation, against per-row loops that share no code with them,
  outputs and gradients on fresh random inputs; the oracle is seen to fail on broken
  copies.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from torch import Tensor

from launch.config import TrainConfig
from launch.training.compile import CompiledStep
from moe.layer import MoELayer
from moe.ops import grouped_mm, grouped_mm_torch
from moe.permute import Permutation, capacity_padded_permutation, permute, unpermute
from routing import RoutingConfig, apply_capacity, build_router

# One cache directory for every run of this test on the machine: the first run compiles
# (minutes on 2 busy cores), later ones load the kernels from inductor's caches.
CACHE_DIR = Path(tempfile.gettempdir()) / "moe-test-inductor-cache"

ROUTINGS = {
    "topk": {"router": "topk", "capacity": "fixed", "capacity_factor": 1.25},
    "bpr": {"router": "topk", "capacity": "priority", "capacity_factor": 1.0},
    "sigma": {"router": "sigma", "capacity": "dropless", "normalize_weights": False},
    "task": {"router": "task", "capacity": "dropless", "num_tasks": 3},
    "dropless": {"router": "topk", "capacity": "dropless"},
    "dynamic": {"router": "topk", "capacity": "dynamic"},
    # The assignment cache is host-side and eager only: compiled, it must not break the graph.
    "dynamic_cached": {"router": "topk", "capacity": "dynamic", "cache_max_entries": 16},
}


def _layer(kind: str) -> MoELayer:
    routing = RoutingConfig(top_k=2, aux_loss_weight=0.01, z_loss_weight=0.001, **ROUTINGS[kind])
    return MoELayer(16, 24, 4, routing)


@pytest.mark.parametrize("kind", list(ROUTINGS))
def test_moe_layer_compiles_without_graph_breaks(kind: str) -> None:
    torch.manual_seed(0)
    layer = _layer(kind)
    x = torch.randn(2, 10, 16)
    tasks = torch.randint(0, 3, (2, 10)) if kind == "task" else None
    if kind == "dynamic_cached":
        assert layer.capacity_state is not None and layer.capacity_state.cache is not None
        layer.capacity_state.sample_ids = [0, 1]  # the two sequences of x
    torch._dynamo.reset()
    # Without fullgraph (as the trainer compiles), a data-dependent op is a graph break;
    # fullgraph=True would capture it with unbacked sizes instead, so count the breaks.
    explanation = torch._dynamo.explain(layer)(x, tasks)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [
        reason.reason for reason in explanation.break_reasons
    ]
    torch._dynamo.reset()
    # fullgraph=True raises on any graph break; aot_eager runs the fake impls and
    # AOTAutograd's joint graph (what inductor gets) without inductor's compile time.
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)
    outs = []
    for fn in (compiled, layer):
        xi = x.clone().requires_grad_()
        out = fn(xi, tasks)
        (out.y.square().sum() + out.aux_loss).backward()
        grads = [xi.grad] + [p.grad for p in layer.parameters()]
        outs.append((out.y.detach(), [None if g is None else g.clone() for g in grads]))
        layer.zero_grad(set_to_none=True)
    if kind.startswith("dynamic"):
        # Later calls with the same bucket vector reuse the graph: the layer's own
        # bookkeeping (row counts, demand) must not be guarded on.
        counter = torch._dynamo.utils.counters
        frames = counter["stats"]["unique_graphs"]
        for _ in range(3):
            compiled(x.clone().requires_grad_(), tasks)
        assert counter["stats"]["unique_graphs"] == frames, "recompiled on an unchanged key"
    (y_c, g_c), (y_e, g_e) = outs
    torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
    for got, want in zip(g_c, g_e):
        if want is None:
            assert got is None or not bool(got.any())
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dynamic_reshuffle_reuses_the_graph_and_a_rebuild_recompiles() -> None:
    # E=4, K=2, T=20: 40 slots, fair 10; granule ceil(.25 * 10) = 3, floor ceil(.5 * 10)
    # = 5, ceiling 20; window 1, no rate limit, shrink margin 0.5.
    routing = RoutingConfig(top_k=2, capacity="dynamic", dynamic_window=1,
                            dynamic_min_factor=0.5, dynamic_shrink_margin=0.5,
                            dynamic_rebuild_interval=1)  # fmt: skip
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 4, routing)
    assert layer.capacity_state is not None
    controller = layer.capacity_state.controller
    controller.start(20)
    assert controller.bucket_vector == (12, 12, 12, 12)
    x = torch.randn(2, 10, 16)
    torch._dynamo.reset()
    counter = torch._dynamo.utils.counters
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)
    steps = [
        # demand -> vector, new graphs: needs 18 9 9 9 = 45 <= P = 48 (and > 24): a
        # reshuffle (the 3 spare rows to experts 0, 1, 2), no new graph; then needs
        # 21 -> the ceiling 20: 20 20 6 6 = 52 > 48: a rebuild, one new graph.
        (None, (12, 12, 12, 12), 1),
        ((16, 8, 8, 8), (19, 10, 10, 9), 0),
        ((19, 19, 1, 1), (20, 20, 6, 6), 1),
    ]
    for demand, vector, new_graphs in steps:
        if demand is not None:
            controller.observe(demand, 20)
        assert controller.bucket_vector == vector
        before = counter["stats"]["unique_graphs"]
        got = compiled(x)
        assert counter["stats"]["unique_graphs"] - before == new_graphs, demand
        torch.testing.assert_close(got.y, layer(x).y, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_moe_transformer_is_one_graph() -> None:
    from test_train import tiny_config

    from moe.transformer import MoETransformer

    config = tiny_config(Path("/tmp/unused"))
    model = MoETransformer(config.model, config.routing, seed=0)
    tokens = torch.randint(0, 256, (2, 16))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(tokens, torch.zeros(2, dtype=torch.long))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [
        reason.reason for reason in explanation.break_reasons
    ]
    torch._dynamo.reset()


def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    from test_train import tiny_config

    from launch.training.loop import train

    common = (
        "train.steps=20", "train.eval_every=20", "train.eval_batches=1",
        "train.checkpoint_every=0", "train.log_every=10",
    )  # fmt: skip
    eager = train(tiny_config(tmp_path / "eager", *common))
    torch._dynamo.reset()
    compiled = train(
        tiny_config(
            tmp_path / "compiled",
            *common,
            "train.compile=true",
            f"train.compile_cache_dir={CACHE_DIR}",
        )
    )
    assert len(compiled.losses) == len(eager.losses) == 20
    torch.testing.assert_close(
        torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=2e-4, atol=2e-4
    )
    assert any(CACHE_DIR.iterdir()), "inductor wrote nothing to the cache dir"
    record = json.loads((tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["compile/compilations"] >= 1 and record["compile/time_s"] > 0


def test_compiled_step_counts_compilations_and_keyed_rebuilds() -> None:
    torch._dynamo.reset()
    module = torch.nn.Linear(3, 2)
    key = [(4,)]
    step = CompiledStep(module, key_fn=lambda: key[0], backend="aot_eager")
    step(torch.randn(4, 3)).sum().backward()
    step(torch.randn(4, 3))
    assert (step.compilations, step.rebuilds) == (1, 0)
    key[0] = (5,)  # a new bucket vector: new shapes, one rebuild
    step(torch.randn(5, 3))
    assert (step.compilations, step.rebuilds) == (2, 1)
    key[0] = (4,)  # back to a key seen before: its graph is reused
    step(torch.randn(4, 3))
    assert (step.compilations, step.rebuilds) == (2, 1)
    step.rebuild()
    step(torch.randn(4, 3))
    assert (step.compilations, step.rebuilds) == (3, 2)
    assert set(step.scalars()) >= {"compile/time_s", "compile/compilations", "compile/rebuilds"}
    torch._dynamo.reset()


def test_compile_options_are_validated() -> None:
    assert TrainConfig().compile is False
    with pytest.raises(ValueError, match=r"train\.compile=true needs train\.engine=torch"):
        TrainConfig(compile=True, engine="deepspeed")
    with pytest.raises(ValueError, match=r"train\.compile_cache_dir"):
        TrainConfig(compile_cache_dir="/tmp/x")
    with pytest.raises(ValueError, match="max_keys"):
        CompiledStep(torch.nn.Linear(2, 2), max_keys=0)


# --- fast paths against per-row loops -----------------------------------------------


def _loop_grouped_mm(x_RD: Tensor, w_EDH: Tensor, counts: list[int]) -> Tensor:
    """Row by row: row r of expert e times w[e] (Python loops, no shared code)."""
    rows, expert, left = [], 0, counts[0]
    for r in range(x_RD.shape[0]):
        while left == 0:
            expert += 1
            left = counts[expert]
        rows.append(x_RD[r] @ w_EDH[expert])
        left -= 1
    return torch.stack(rows)


def _check_grouped_mm(fn, experts: int, rows: int) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(experts * rows, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(experts, 5, 7, dtype=torch.float64, requires_grad=True)
    counts = torch.full((experts,), rows, dtype=torch.int64)
    dy = torch.randn(experts * rows, 7, dtype=torch.float64)
    got = fn(x, w, counts)
    want = _loop_grouped_mm(x, w, [rows] * experts)
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad((got * dy).sum(), [x, w])
    want_grads = torch.autograd.grad((want * dy).sum(), [x, w])
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r)


def test_batched_grouped_mm_matches_row_loop() -> None:
    torch.manual_seed(1)
    _check_grouped_mm(grouped_mm, experts=4, rows=3)  # uniform counts: the bmm path
    _check_grouped_mm(grouped_mm, experts=1, rows=6)


def test_grouped_mm_oracle_catches_broken_bmm() -> None:
    def wrong_expert(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
        return grouped_mm_torch(x, w.roll(1, dims=0), counts)

    def wrong_layout(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
        experts = counts.shape[0]  # rows taken expert-minor instead of expert-major
        x_ECD = x.view(-1, experts, x.shape[1]).transpose(0, 1)
        return torch.bmm(x_ECD, w).transpose(0, 1).reshape(x.shape[0], -1)

    for broken in (wrong_expert, wrong_layout):
        with pytest.raises(AssertionError):
            _check_grouped_mm(broken, experts=4, rows=3)


def _loop_capacity_layer(
    x_TD: Tensor, expert_ids: list[list[int]], keep: list[list[bool]], weights_TK: Tensor, w_EDH
) -> Tensor:  # type: ignore[no-untyped-def]
    """y[t] = sum over t's kept slots of weight * x[t] @ w[e] (per-token loop)."""
    out = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(w_EDH.shape[2], dtype=x_TD.dtype)
        for k, expert in enumerate(expert_ids[t]):
            if keep[t][k]:
                acc = acc + weights_TK[t, k] * (x_TD[t] @ w_EDH[expert])
        out.append(acc)
    return torch.stack(out)


def _padded_path(x_TD, plan, w_EDH, slots, permutation_fn=capacity_padded_permutation):  # type: ignore[no-untyped-def]
    permutation = permutation_fn(plan, slots)
    assert permutation.token_index_R.shape[0] == sum(slots)
    y_RD = grouped_mm(permute(x_TD, permutation), w_EDH, permutation.counts_E)
    return unpermute(y_RD, permutation, plan.weights_TK)


@pytest.mark.parametrize("capacity", ["fixed", "priority"])
def test_capacity_padded_path_matches_token_loop(capacity: str) -> None:
    torch.manual_seed(2)
    config = RoutingConfig(router="topk", capacity=capacity, capacity_factor=0.8, top_k=2)
    router = build_router(6, 4, config).double()
    x = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, 6, dtype=torch.float64, requires_grad=True)
    plan = apply_capacity(router(x), config)
    assert not bool(plan.keep_TK.all()), "the case must drop slots"
    slots = [plan.capacity] * 4
    got = _padded_path(x, plan, w, slots)
    ids, keep = plan.expert_ids_TK.tolist(), plan.keep_TK.tolist()
    want = _loop_capacity_layer(x, ids, keep, plan.weights_TK, w)
    torch.testing.assert_close(got, want)
    dy = torch.randn_like(got)
    params = [x, w, router.gate.weight]
    got_g = torch.autograd.grad((got * dy).sum(), params, retain_graph=True)
    want_g = torch.autograd.grad((want * dy).sum(), params)
    for g, r in zip(got_g, want_g):
        torch.testing.assert_close(g, r)
    # Uneven per-expert capacities (DynaMoE's buckets) take the block path, same result.
    uneven = [plan.capacity + 2, plan.capacity, plan.capacity + 1, plan.capacity + 3]
    torch.testing.assert_close(_padded_path(x, plan, w, uneven), want)


def test_padded_oracle_catches_a_broken_permutation() -> None:
    torch.manual_seed(3)
    config = RoutingConfig(router="topk", capacity="fixed", capacity_factor=0.8, top_k=2)
    router = build_router(6, 4, config).double()
    x = torch.randn(11, 6, dtype=torch.float64)
    w = torch.randn(4, 6, 6, dtype=torch.float64)
    plan = apply_capacity(router(x), config)
    ids, keep = plan.expert_ids_TK.tolist(), plan.keep_TK.tolist()
    want = _loop_capacity_layer(x, ids, keep, plan.weights_TK, w)
    slots = [plan.capacity] * 4

    def neighbour_rows(plan, slots):  # type: ignore[no-untyped-def]
        permutation = capacity_padded_permutation(plan, slots)
        index_R = (permutation.token_index_R + 1) % x.shape[0]
        return Permutation(index_R, permutation.row_of_slot_TK, permutation.counts_E)

    def rows_off_by_one(plan, slots):  # type: ignore[no-untyped-def]
        permutation = capacity_padded_permutation(plan, slots)
        rows_TK = torch.where(
            permutation.row_of_slot_TK >= 0, (permutation.row_of_slot_TK + 1) % sum(slots), -1
        )
        return Permutation(permutation.token_index_R, rows_TK, permutation.counts_E)

    torch.testing.assert_close(_padded_path(x, plan, w, slots), want)
    for broken in (neighbour_rows, rows_off_by_one):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(_padded_path(x, plan, w, slots, broken), want)


@pytest.mark.parametrize("kind", ["topk", "dropless"])
def test_moe_layer_under_bf16_autocast_compiles_without_graph_breaks(kind: str) -> None:
    """The ops' autocast rules trace (torch.compile's Python dispatcher sees them): one
    graph, bf16 rows, and compiled equals eager."""
    torch.manual_seed(0)
    layer = _layer(kind)
    x = torch.randn(2, 10, 16)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            return out.y.float().square().sum() + out.aux_loss

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(forward)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [
        reason.reason for reason in explanation.break_reasons
    ]
    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager", dynamic=False)
    results = []
    for fn in (compiled, forward):
        xi = x.clone().requires_grad_()
        loss = fn(xi)
        loss.backward()
        results.append((loss.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
        layer.zero_grad(set_to_none=True)
    (loss_c, dx_c, grads_c), (loss_e, dx_e, grads_e) = results
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(dx_c, dx_e)
    for got, want in zip(grads_c, grads_e):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()
