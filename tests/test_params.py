"""Parameter counting against hand counts, and the dense model at equal active params."""

from __future__ import annotations

from moe.config import ModelConfig, dense_equivalent
from moe.params import count_parameters
from moe.transformer import MoETransformer
from routing import RoutingConfig


def test_hand_count_gelu_dense_and_moe_blocks() -> None:
    # V=256, D=8, 2 blocks (block 0 dense, block 1 MoE: E=4 experts of H=4, K=2),
    # 2 query heads and 1 kv head of width 4, untied output head.
    config = ModelConfig(
        vocab_size=256,
        d_model=8,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        ffn_hidden=12,
        expert_hidden=4,
        num_experts=4,
        moe_every=2,
        tie_embeddings=False,
    )
    count = count_parameters(MoETransformer(config, RoutingConfig(top_k=2)))
    embedding = 256 * 8 + 8 * 256
    attention = 8 * (2 + 2 * 1) * 4 + 8 * 8  # qkv_proj + out_proj
    norms = 2 * 8  # attn_norm + ffn_norm
    dense_ffn = 8 * 12 + 12 * 8
    router = 8 * 4
    per_expert = 8 * 4 + 4 * 8
    final_norm = 8
    dense = 2 * (attention + norms) + dense_ffn + router + final_norm
    assert count.embedding == embedding
    assert count.expert == 4 * per_expert
    assert count.total == embedding + dense + 4 * per_expert
    assert count.active == dense + 2 * per_expert
    assert count.non_embedding == count.total - embedding
    assert count.active_with_embedding == count.active + embedding


def test_hand_count_swiglu_residual_schedule_tied() -> None:
    # Two MoE blocks with 2 and 4 swiglu experts (H=4), a residual swiglu MLP of width H
    # and a 2-way gate (with bias) in each, top-1, tied embeddings, multi-head attention.
    config = ModelConfig(
        vocab_size=256,
        d_model=8,
        n_layers=2,
        n_heads=2,
        n_kv_heads=2,
        expert_hidden=4,
        expert_schedule=[2, 4],
        moe_every=1,
        residual_mlp=True,
        activation="swiglu",
        tie_embeddings=True,
    )
    model = MoETransformer(config, RoutingConfig(top_k=1))
    count = count_parameters(model)
    attention = 8 * 24 + 8 * 8
    norms = 2 * 8
    per_expert = 3 * 8 * 4
    residual = 3 * 8 * 4 + (8 * 2 + 2)
    routers = 8 * 2 + 8 * 4
    dense = 2 * (attention + norms + residual) + routers + 8
    assert count.embedding == 256 * 8
    assert count.expert == (2 + 4) * per_expert
    assert count.total == 256 * 8 + dense + 6 * per_expert
    assert count.total == sum(p.numel() for p in model.parameters())
    assert count.active == dense + 2 * per_expert


def test_dense_equivalent_has_the_active_parameters() -> None:
    moe_config = ModelConfig(
        d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, expert_hidden=8, num_experts=8
    )
    routing = RoutingConfig(top_k=2)
    moe_count = count_parameters(MoETransformer(moe_config, routing))
    dense_config = dense_equivalent(moe_config, routing.top_k)
    dense_count = count_parameters(MoETransformer(dense_config))
    routers = 3 * 16 * 8  # no dense counterpart
    assert dense_config.ffn_hidden == 2 * 8
    assert dense_count.expert == 0
    assert dense_count.active == dense_count.non_embedding == moe_count.active - routers
    assert dense_count.embedding == moe_count.embedding
