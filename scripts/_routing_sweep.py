"""The variants of `scripts/compare_routing.py`, their cost counted from the model config,
and the curve arithmetic of the equal-token and equal-seconds comparisons.

Every variant is a set of Hydra overrides of `python -m launch.train` (on top of the sweep's
shared data and training settings). The top-1 variants (Switch, PR-MoE) weight the chosen
expert by its softmax probability, as Switch and DeepSpeed-MoE do: renormalising one weight
makes it 1, and the router then gets no gradient from the language-model loss. `dynamic`
(dynamic capacity, DynaMoE) joins the default variants by itself once
`conf/routing/dynamic.yaml` exists.

Costs are counted from the composed `ModelConfig` and `RoutingConfig` alone (no model
is built; `tests/test_compare_routing.py` checks the counts against `moe.params` on the
built models and against a hand count):

- parameters: `total` (embedding included) and `active` (non-embedding parameters one
  token uses: attention, norms, dense FFNs, routers, PR-MoE residual MLP and gate, and
  `top_k` experts of every MoE layer), the definitions of `moe.params`;
- FFN FLOPs per token (forward): 2 per multiply-accumulate of the FFN matmuls a token
  passes: a dense FFN `2 * m * D * F`; an MoE layer `K * 2 * m * D * H` for its experts,
  `2 * D * E` for a softmax or sigmoid router (a task router is a table lookup: 0), and
  `2 * m * D * H + 2 * D * 2` for the PR-MoE residual MLP and its gate, where m = 3 for
  SwiGLU and 2 otherwise. It is the nominal cost of K choices: a dropped slot saves its
  expert FLOPs, which the dropped fraction tells.
"""

from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe.config import ModelConfig
from moe.experts import Activation
from routing import RoutingConfig
from routing.config import RouterKind

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]
    description: str


VARIANTS: tuple[Variant, ...] = (
    Variant(
        "dense_active",
        ("model=dense",),
        "dense, FFN width K*H = 256: the active parameters of the top-2 MoE",
    ),
    Variant(
        "dense_total",
        ("model=dense", "model.ffn_hidden=1024"),
        "dense, FFN width E*H = 1024: the total parameters of the MoE (and of sigma-MoE)",
    ),
    Variant(
        "switch_top1",
        ("model=small", "routing=topk", "routing.top_k=1", "routing.normalize_weights=false"),
        "Switch: softmax top-1 weighted by its probability, 8 experts of 128, C=1.25",
    ),
    Variant(
        "top2",
        ("model=small", "routing=topk"),
        "GShard: softmax top-2, 8 experts of 128, C=1.25 in token order",
    ),
    Variant(
        "sigma_moe",
        (
            "model=small",
            "model.num_experts=16",
            "model.expert_hidden=64",
            "model.activation=relu",
            "routing=sigma",
            "routing.top_k=4",
        ),
        "sigma-MoE: 16 ReLU experts of 64 (E*H = 1024, parameter-equal with dense_total), "
        "K=4 (a quarter of its FFN), sigmoid gates, dropless",
    ),
    Variant(
        "vanilla_c1.0",
        ("model=small", "routing=topk", "routing.capacity_factor=1.0"),
        "top-2, C=1.0 filled in token order",
    ),
    Variant(
        "bpr_c1.0",
        ("model=small", "routing=bpr", "routing.capacity_factor=1.0"),
        "top-2, C=1.0 filled by Batch Priority Routing (max score first)",
    ),
    Variant(
        "vanilla_c0.5",
        ("model=small", "routing=topk", "routing.capacity_factor=0.5"),
        "top-2, C=0.5 filled in token order",
    ),
    Variant(
        "bpr_c0.5",
        ("model=small", "routing=bpr", "routing.capacity_factor=0.5"),
        "top-2, C=0.5 filled by Batch Priority Routing (max score first)",
    ),
    Variant(
        "task",
        ("model=small", "routing=task"),
        "task-level: the book group picks 2 of 8 experts per layer, dropless",
    ),
    Variant(
        "prmoe",
        ("model=prmoe", "routing=topk", "routing.top_k=1", "routing.normalize_weights=false"),
        "PR-MoE: experts [4, 4, 8, 8], top-1 expert + residual MLP of 128, C=1.25",
    ),
    Variant(
        "dynamic",
        ("model=small", "routing=dynamic"),
        "top-2 with dynamic capacity (DynaMoE; conf/routing/dynamic.yaml)",
    ),
)
BY_NAME = {variant.name: variant for variant in VARIANTS}


def default_variants() -> list[str]:
    """Every variant whose routing preset exists (`dynamic` waits for its YAML)."""
    present = [v.name for v in VARIANTS if v.name != "dynamic"]
    if (ROOT / "conf" / "routing" / "dynamic.yaml").is_file():
        present.append("dynamic")
    return present


@dataclass(frozen=True)
class Cost:
    params_total: int
    params_active: int
    params_embedding: int
    ffn_flops_per_token: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def count_cost(model: ModelConfig, routing: RoutingConfig | None) -> Cost:
    """Parameters and FFN FLOPs per token of `model` (see the module docstring)."""
    d, h = model.d_model, model.expert_hidden
    mats = 3 if model.activation == Activation.SWIGLU else 2
    embedding = model.vocab_size * d * (1 if model.tie_embeddings else 2)
    attention = d * (model.n_heads + 2 * model.n_kv_heads) * model.head_dim
    attention += model.n_heads * model.head_dim * d
    shared = model.n_layers * (attention + 2 * d) + d  # + the two norms per block, final norm
    total, active, flops = embedding + shared, shared, 0
    for num_experts in model.experts_per_block():
        if num_experts == 0:
            ffn = mats * d * model.ffn_hidden
            total, active, flops = total + ffn, active + ffn, flops + 2 * ffn
            continue
        assert routing is not None, "an MoE layer needs a routing config"
        expert = mats * d * h
        if routing.router == RouterKind.TASK:
            router, router_flops = routing.num_tasks * num_experts, 0
        else:
            router, router_flops = d * num_experts, 2 * d * num_experts
        residual = mats * d * h + d * 2 + 2 if model.residual_mlp else 0
        residual_flops = 2 * (mats * d * h + d * 2) if model.residual_mlp else 0
        total += num_experts * expert + router + residual
        active += routing.top_k * expert + router + residual
        flops += 2 * routing.top_k * expert + router_flops + residual_flops
    return Cost(total, active, embedding, flops)


def cumulative_seconds(records: list[dict[str, float]], tokens_per_step: int) -> list[float]:
    """Training seconds at each evaluation record: the sum over the evaluation windows of
    window tokens / the window's tokens/s (evaluation time excluded)."""
    seconds, previous_step, total = [], 0, 0.0
    for record in records:
        total += (record["step"] - previous_step) * tokens_per_step / record["tokens_per_s"]
        seconds.append(total)
        previous_step = record["step"]
    return seconds


def read_at(xs: list[float], ys: list[float], x: float) -> float | None:
    """y at `x` by linear interpolation of the points (xs increasing); None outside them."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    index = bisect.bisect_left(xs, x)
    if xs[index] == x or index == 0:
        return ys[index]
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def measure_throughput(
    configs: dict[str, Any], batch_size: int, seq_len: int, rounds: int, steps: int
) -> dict[str, float]:
    """Training tokens/s of each variant's model (`configs`: variant -> its `RunConfig`),
    measured side by side in this process: `rounds` rounds, each timing `steps` AdamW steps
    of every variant in turn on one fixed random batch; the median round per variant.
    Interleaving keeps the ratios fair on a machine whose load changes over the sweep."""
    import time

    import torch

    from moe.transformer import MoETransformer, lm_loss

    generator = torch.Generator().manual_seed(0)
    tokens_BT = torch.randint(0, 256, (batch_size, seq_len + 1), generator=generator)
    task_ids_B = torch.arange(batch_size) % 6
    setups = {}
    for name, config in configs.items():
        routing = config.routing if config.model.moe_layer_indices() else None
        model = MoETransformer(config.model, routing, seed=0).train()
        setups[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds + 1):  # the first round warms up and is not counted
        for name, (model, optimizer) in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                loss = lm_loss(model(tokens_BT[:, :-1], task_ids_B), tokens_BT[:, 1:]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {
        name: steps * batch_size * seq_len / statistics.median(rounds_s[1:])
        for name, rounds_s in times.items()
    }
