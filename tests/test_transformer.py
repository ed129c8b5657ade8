"""The MoE transformer LM: config validation, attention against a naive reference,
causality, KV-cache decoding against full forwards, determinism, training, sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moe.attention import CausalSelfAttention
from moe.config import ModelConfig, dense_equivalent, pyramid_schedule
from moe.dispatchers import LocalDispatcher
from moe.experts import Activation
from moe.transformer import MoETransformer, bits_per_byte, lm_loss
from routing import CapacityKind, RouterKind, RoutingConfig

torch.set_num_threads(1)


def tiny_config(**overrides: object) -> ModelConfig:
    fields: dict[str, object] = dict(
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=32,
        ffn_hidden=48,
        expert_hidden=16,
        num_experts=4,
    )
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


DROPLESS = RoutingConfig(top_k=2, capacity=CapacityKind.DROPLESS)


# --- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(n_kv_heads=0), "n_kv_heads"),
        (dict(d_model=30, n_heads=4), "n_heads"),
        (dict(d_model=12, n_heads=4, n_kv_heads=4), "d_model"),
        (dict(moe_every=-1), "moe_every"),
        (dict(moe_every=3, n_layers=2), "moe_every"),
        (dict(expert_schedule=[4, 8, 8]), "expert_schedule"),
        (dict(expert_schedule=[4, 0]), "expert_schedule"),
        (dict(activation="tanh"), "activation"),
        (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(moe_every=0, residual_mlp=True), "residual_mlp"),
        (dict(rope_theta=0.0), "rope_theta"),
    ],
)
def test_bad_config_names_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=rf"ModelConfig\.{key}="):
        tiny_config(**overrides)


def test_moe_layer_pattern_and_schedule() -> None:
    assert tiny_config(n_layers=6, moe_every=1).moe_layer_indices() == [0, 1, 2, 3, 4, 5]
    assert tiny_config(n_layers=6, moe_every=2).moe_layer_indices() == [1, 3, 5]
    assert tiny_config(n_layers=6, moe_every=3).moe_layer_indices() == [2, 5]
    assert tiny_config(n_layers=6, moe_every=0).moe_layer_indices() == []
    config = tiny_config(n_layers=4, moe_every=2, expert_schedule=[2, 8])
    assert config.experts_per_block() == [0, 2, 0, 8]
    assert pyramid_schedule(5, 4, 8) == [4, 4, 8, 8, 8]
    with pytest.raises(ValueError, match="first"):
        pyramid_schedule(4, 8, 4)


def test_config_is_a_structured_config() -> None:
    schema = OmegaConf.structured(ModelConfig)
    # OmegaConf parses enums by member *name*; launch.schema maps the lowercase values.
    overrides = {"activation": Activation.SWIGLU.name, "n_layers": 2, "expert_schedule": [2, 4]}
    merged = OmegaConf.merge(schema, overrides)
    config = OmegaConf.to_object(merged)
    assert isinstance(config, ModelConfig)
    assert config.activation is Activation.SWIGLU and config.expert_schedule == [2, 4]
    with pytest.raises(ValueError, match="activation"):
        OmegaConf.merge(schema, {"activation": "tanh"})
    with pytest.raises(ValueError, match="expert_schedule"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"expert_schedule": [2]}))


def test_dense_equivalent_config() -> None:
    moe = tiny_config(moe_every=1, expert_hidden=16, activation="swiglu")
    dense = dense_equivalent(moe, top_k=2)
    assert dense.moe_every == 0 and dense.ffn_hidden == 32
    assert dense.activation is Activation.SWIGLU and dense.d_model == moe.d_model
    residual = dense_equivalent(tiny_config(residual_mlp=True), top_k=1)
    assert residual.ffn_hidden == 16 + 16
    mixed = dense_equivalent(tiny_config(n_layers=2, moe_every=2, ffn_hidden=48), top_k=2)
    assert mixed.ffn_hidden == (48 + 32) // 2


# --- attention ------------------------------------------------------------------------


def reference_attention(attn: CausalSelfAttention, x_BTD: torch.Tensor) -> torch.Tensor:
    """Multi-head attention with key/value heads repeated, RoPE as complex rotations,
    an explicit causal mask and softmax."""
    B, T, _ = x_BTD.shape
    N, G, C = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w = attn.qkv_proj.weight
    q = (x_BTD @ w[: N * C].T).view(B, T, N, C)
    k = (x_BTD @ w[N * C : (N + G) * C].T).view(B, T, G, C)
    v = (x_BTD @ w[(N + G) * C :].T).view(B, T, G, C)
    k = k.repeat_interleave(N // G, dim=2)
    v = v.repeat_interleave(N // G, dim=2)
    freqs = attn.rope_theta ** (-torch.arange(C // 2, dtype=torch.float64) * 2 / C)
    rotation = torch.polar(
        torch.ones(T, C // 2, dtype=torch.float64), torch.arange(T)[:, None] * freqs
    )

    def rope(t: torch.Tensor) -> torch.Tensor:
        z = torch.complex(t[..., : C // 2].double(), t[..., C // 2 :].double())
        z = z * rotation[None, :, None, :]
        return torch.cat([z.real, z.imag], dim=-1).to(t.dtype)

    q, k = rope(q), rope(k)
    scores = torch.einsum("btnc,bsnc->bnts", q, k) / math.sqrt(C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    y = torch.einsum("bnts,bsnc->btnc", scores.softmax(dim=-1), v).reshape(B, T, N * C)
    return attn.out_proj(y)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_matches_reference(n_kv_heads: int) -> None:
    torch.manual_seed(n_kv_heads)
    attn = CausalSelfAttention(32, 4, n_kv_heads, rope_theta=100.0)
    x = torch.randn(2, 7, 32, requires_grad=True)
    y = attn(x)
    y_ref = reference_attention(attn, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, attn.qkv_proj.weight], dy)
    grads_ref = torch.autograd.grad(y_ref, [x, attn.qkv_proj.weight], dy)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


# --- the model ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [dict(moe_every=0), dict(moe_every=1), dict(n_layers=3, moe_every=2, activation="swiglu")],
)
def test_shapes_and_moe_layers(overrides: dict[str, object]) -> None:
    config = tiny_config(**overrides)
    model = MoETransformer(config, DROPLESS)
    out = model(torch.randint(0, 256, (3, 10)))
    assert out.logits_BTV.shape == (3, 10, 256)
    assert out.aux_loss.shape == ()
    indices = [i for i, _ in model.moe_layers()]
    assert indices == config.moe_layer_indices()
    assert sorted(model.routing_stats()) == indices


def test_aux_loss_is_the_sum_of_the_layers() -> None:
    model = MoETransformer(tiny_config(n_layers=3), RoutingConfig(aux_loss_weight=0.1))
    seen: list[torch.Tensor] = []
    for _, layer in model.moe_layers():
        layer.register_forward_hook(lambda _m, _a, out: seen.append(out.aux_loss))
    out = model(torch.randint(0, 256, (2, 12)))
    assert len(seen) == 3
    torch.testing.assert_close(out.aux_loss, torch.stack(seen).sum())
    assert out.aux_loss > 0


def test_causality() -> None:
    for config in (tiny_config(moe_every=0), tiny_config(moe_every=1)):
        model = MoETransformer(config, DROPLESS, seed=3)
        tokens = torch.randint(0, 256, (2, 16))
        changed = tokens.clone()
        changed[:, 9] = (tokens[:, 9] + 1) % 256
        a, b = model(tokens).logits_BTV, model(changed).logits_BTV
        torch.testing.assert_close(a[:, :9], b[:, :9], atol=0, rtol=0)
        assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("moe_every", [0, 1])
def test_kv_cache_decoding_equals_full_forward(moe_every: int) -> None:
    model = MoETransformer(tiny_config(moe_every=moe_every), DROPLESS, seed=1).eval()
    tokens = torch.randint(0, 256, (2, 12))
    task_ids = torch.tensor([0, 1])
    full = model(tokens, task_ids).logits_BTV
    caches = model.init_caches(2)
    prefill = model(tokens[:, :5], task_ids, caches).logits_BTV  # empty cache, causal
    chunk = model(tokens[:, 5:8], task_ids, caches).logits_BTV  # cached prefix, masked
    steps = [model(tokens[:, t : t + 1], task_ids, caches).logits_BTV for t in range(8, 12)]
    incremental = torch.cat([prefill, chunk, *steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(torch.zeros(2, 21, dtype=torch.long), None, caches)


def test_task_ids_broadcast_to_every_token() -> None:
    routing = RoutingConfig(router=RouterKind.TASK, num_tasks=3, top_k=1, capacity="dropless")
    model = MoETransformer(tiny_config(), routing)
    seen: list[torch.Tensor] = []
    for _, layer in model.moe_layers():
        layer.register_forward_hook(lambda _m, args, _out: seen.append(args[1]))
    task_ids = torch.tensor([2, 0])
    model(torch.randint(0, 256, (2, 6)), task_ids)
    assert len(seen) == 2
    for task_ids_BT in seen:
        assert torch.equal(task_ids_BT, task_ids[:, None].expand(2, 6))
    with pytest.raises(ValueError, match="task_ids"):
        model(torch.randint(0, 256, (2, 6)), torch.tensor([[2, 0]]))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="RoutingConfig"):
        MoETransformer(tiny_config(moe_every=1), None)
    model = MoETransformer(tiny_config(moe_every=0))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))


def test_dispatcher_factory_gets_each_layers_expert_count() -> None:
    config = tiny_config(n_layers=2, expert_schedule=[2, 4])
    built: list[int] = []

    def factory(block: int, num_experts: int) -> LocalDispatcher:
        built.append(num_experts)
        return LocalDispatcher(num_experts)

    model = MoETransformer(config, DROPLESS, factory, seed=5)
    assert built == [2, 4]
    assert [layer.experts.num_experts for _, layer in model.moe_layers()] == [2, 4]
    default = MoETransformer(config, DROPLESS, seed=5)
    tokens = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(model(tokens).logits_BTV, default(tokens).logits_BTV)


def test_seed_makes_construction_deterministic() -> None:
    config = tiny_config(residual_mlp=True, tie_embeddings=False)
    rng_before = torch.get_rng_state()
    a = MoETransformer(config, DROPLESS, seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.manual_seed(123)  # the global RNG must not matter
    b = MoETransformer(config, DROPLESS, seed=7).state_dict()
    c = MoETransformer(config, DROPLESS, seed=8).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    differing = [name for name in a if not torch.equal(a[name], c[name])]
    assert "embed.weight" in differing and "blocks.1.ffn.experts.w1_EDH" in differing
    # Dense weights do not depend on the expert count of the MoE layers.
    d = MoETransformer(
        tiny_config(residual_mlp=True, tie_embeddings=False, num_experts=2), DROPLESS, seed=7
    )
    for name, value in d.state_dict().items():
        if ".ffn." not in name:
            assert torch.equal(value, a[name]), name


def _head_logits_and_embedding_grad(
    model: MoETransformer, tokens_BT: torch.Tensor, probe: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, final hidden states, embed.weight.grad) after backpropagating the sum of
    the logits of token `probe` alone."""
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    hook = model.final_norm.register_forward_hook(
        lambda _module, _inputs, output: captured.update(h=output)
    )
    try:
        model.zero_grad(set_to_none=True)
        logits_BTV = model(tokens_BT).logits_BTV
    finally:
        hook.remove()
    logits_BTV[..., probe].sum().backward()
    grad = model.embed.weight.grad
    return logits_BTV.detach(), captured["h"].detach(), torch.zeros(0) if grad is None else grad


def test_tied_and_untied_embeddings() -> None:
    tokens = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    probe = 200  # never an input token: its embedding row is reached only through the head
    unused = [row for row in range(128, 256) if row != probe]

    tied = MoETransformer(tiny_config(moe_every=0), seed=0)
    assert tied.lm_head is None and "lm_head.weight" not in tied.state_dict()
    logits, h, grad = _head_logits_and_embedding_grad(tied, tokens, probe)
    torch.testing.assert_close(logits, F.linear(h, tied.embed.weight))
    # One matrix, both uses: the head loss reaches the probe row and the input rows.
    assert grad[probe].abs().sum() > 0
    assert grad[tokens.unique()].abs().sum() > 0
    assert torch.count_nonzero(grad[unused]) == 0

    untied = MoETransformer(tiny_config(moe_every=0, tie_embeddings=False), seed=0)
    assert untied.lm_head is not None and "lm_head.weight" in untied.state_dict()
    # Even with the head a copy of the embedding (same logits), the checks above tell a
    # separate head apart: the head loss never reaches the embedding's probe row.
    with torch.no_grad():
        untied.lm_head.weight.copy_(untied.embed.weight)
    logits, h, grad = _head_logits_and_embedding_grad(untied, tokens, probe)
    torch.testing.assert_close(logits, F.linear(h, untied.embed.weight))
    assert grad[probe].abs().sum() == 0
    assert grad[tokens.unique()].abs().sum() > 0


def test_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    config = tiny_config(n_layers=2, moe_every=1, residual_mlp=False)
    model = MoETransformer(config, RoutingConfig(top_k=2, capacity_factor=2.0), seed=0)
    tokens = torch.randint(0, 256, (4, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = lm_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
        losses.append(loss.ce.item())
    assert losses[0] > math.log(256) - 0.5
    assert losses[-1] < losses[0] - 2.0, losses


def test_lm_loss_and_bits_per_byte() -> None:
    model = MoETransformer(tiny_config(), RoutingConfig(aux_loss_weight=0.5))
    tokens = torch.randint(0, 256, (2, 9))
    out = model(tokens[:, :-1])
    loss = lm_loss(out, tokens[:, 1:])
    ce = F.cross_entropy(out.logits_BTV.reshape(-1, 256), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss.ce, ce)
    torch.testing.assert_close(loss.loss, ce + out.aux_loss)
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert bits_per_byte(math.log(256)) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="targets"):
        lm_loss(out, tokens)
