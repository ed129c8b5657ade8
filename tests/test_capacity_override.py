"""One switch for the capacity policy outside training (`MoETransformer.capacity_override`,
`CapacityOverride`): under `dropless` no slot is dropped, whatever the router and the
trained capacity policy (DynaMoE included), so a request's output does not depend on its
batch neighbours; the inference engine holds that override while it lives."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from moe.config import ModelConfig
from moe.inference import InferenceEngine, SamplingParams
from moe.transformer import MoETransformer
from routing import CapacityOverride, RoutingConfig

ROUTERS = ("topk", "sigma", "task")
CAPACITIES = ("fixed", "priority", "dropless", "dynamic")
PROMPTS = [b"In the beginning", b"And God said", b"Let there be", b"x", b"The earth was", b"!?"]


def _model(router: str, capacity: str) -> MoETransformer:
    config = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48,
                         ffn_hidden=64, expert_hidden=32, num_experts=4, init_std=0.5)  # fmt: skip
    routing = RoutingConfig(router=router, top_k=2, capacity=capacity, capacity_factor=0.5,
                            num_tasks=3 if router == "task" else 0,
                            dynamic_min_factor=0.25, dynamic_max_factor=1.0)  # fmt: skip
    model = MoETransformer(config, routing, seed=7).eval()
    for _, layer in model.moe_layers():
        state: Any = layer.capacity_state
        if state is not None:  # DynaMoE: capacities learnt from a skewed load
            state.controller.observe(torch.tensor([97, 1, 1, 1]), 64)
    return model


def _dropped(model: MoETransformer) -> list[float]:
    return [float(s.dropped_fraction) for s in model.routing_stats().values()]


def _tasks(router: str, batch: int) -> torch.Tensor | None:
    return torch.arange(batch) % 3 if router == "task" else None


@pytest.mark.parametrize(("router", "capacity"), list(itertools.product(ROUTERS, CAPACITIES)))
def test_dropless_override_keeps_every_slot_and_batched_equals_alone(
    router: str, capacity: str
) -> None:
    model = _model(router, capacity)
    tokens_BT = torch.randint(0, 256, (6, 40), generator=torch.Generator().manual_seed(1))
    tasks_B = _tasks(router, 6)
    with torch.no_grad():
        trained = model(tokens_BT, tasks_B).logits_BTV
        trained_dropped = _dropped(model)
        with model.capacity_override(CapacityOverride.DROPLESS):
            batched = model(tokens_BT, tasks_B).logits_BTV
            assert max(_dropped(model)) == 0.0
            alone = torch.cat([
                model(tokens_BT[i : i + 1], None if tasks_B is None else tasks_B[i : i + 1])
                .logits_BTV for i in range(6)
            ])  # fmt: skip
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
        # The trained policy is back afterwards (and it did drop: the case is a real one).
        again = model(tokens_BT, tasks_B).logits_BTV
    torch.testing.assert_close(again, trained)
    assert _dropped(model) == trained_dropped
    if capacity != "dropless":
        assert max(trained_dropped) > 0.0, "the trained policy dropped nothing: no test"


@pytest.mark.parametrize("capacity", ["fixed", "dynamic"])
def test_engine_routes_dropless_and_batched_equals_alone(capacity: str) -> None:
    """The engine (default routing) over six requests at once gives each the text it
    gets alone, and no MoE layer drops a slot in any of its model calls."""
    model = _model("topk", capacity)
    dropped: list[float] = []
    hooks = [
        layer.register_forward_hook(
            lambda m, a, o: dropped.append(float(m.last_stats.dropped_fraction))
        )
        for _, layer in model.moe_layers()
    ]
    params = SamplingParams(max_tokens=12, temperature=0.0)

    def run(prompts: list[bytes]) -> list[tuple[int, ...]]:
        engine = InferenceEngine(model, max_batch=8)
        try:
            ids = [engine.submit(p, params) for p in prompts]
            done = {c.request_id: c.token_ids for c in engine.run()}
        finally:
            engine.restore()
        return [done[i] for i in ids]

    batched = run(PROMPTS)
    alone = [run([p])[0] for p in PROMPTS]
    for hook in hooks:
        hook.remove()
    assert dropped and max(dropped) == 0.0
    assert batched == alone
    # restore() gave the trained policy back: it drops again.
    with torch.no_grad():
        model(torch.randint(0, 256, (6, 40), generator=torch.Generator().manual_seed(1)))
    assert max(_dropped(model)) > 0.0


def test_bad_override_is_named() -> None:
    model = _model("topk", "fixed")
    with pytest.raises(ValueError, match="capacity override='lossy' is not one of: dropless"):
        model.override_capacity("lossy")
