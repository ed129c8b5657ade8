"""Pruning without training: masks against plain-Python references (N:M along the
reduction dimension, unstructured per matrix and global), the channel permutation
(function unchanged, never worse than the identity, optimal on a case small enough to
enumerate), Zhu & Gupta's schedule against the formula, SR-STE's update by hand, the
packed-size formula against torch's own 2:4 conversion, and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from moe.config import ModelConfig
from moe.dispatchers import LocalDispatcher
from moe.experts import DenseMLP, GroupedExperts
from moe.pruning import (
    MaskedTraining,
    NMPattern,
    PruneConfig,
    PruneScope,
    build_pruning,
    gmp_sparsity,
    hidden_channels,
    prunable_weights,
    prune_model,
    pruning_sparsity,
)
from moe.pruning.masks import nm_masks, satisfies_nm, unstructured_masks
from moe.pruning.oneshot import permute_hidden
from moe.pruning.permutation import _StripeScores, kept_magnitude, search_permutation
from moe.pruning.semi_structured import (
    SemiStructuredExperts,
    packed_nm_bytes,
    semi_structured_available,
    use_semi_structured,
)
from moe.pruning.state import Constrained, Rule
from moe.pruning.targets import PrunableWeight
from moe.transformer import MoETransformer
from routing import RoutingConfig


def small_model(activation: str = "swiglu", moe_every: int = 2, seed: int = 0) -> MoETransformer:
    config = ModelConfig(
        d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16, ffn_hidden=32,
        expert_hidden=16, num_experts=4, activation=activation, moe_every=moe_every,
    )  # fmt: skip
    routing = RoutingConfig(top_k=2, capacity="dropless") if moe_every else None
    return MoETransformer(config, routing, seed=seed)


def _reference_nm_keep(row: list[float], n: int, m: int) -> list[bool]:
    """Keep the n largest |w| of every m consecutive entries; ties to the lower index."""
    keep = []
    for start in range(0, len(row), m):
        group = row[start : start + m]
        order = sorted(range(m), key=lambda i: (-abs(group[i]), i))
        keep += [i in order[:n] for i in range(m)]
    return keep


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(3, 8)])
def test_nm_masks_follow_the_reduction_dimension(pattern: NMPattern) -> None:
    model = small_model()
    weights = prunable_weights(model, PruneScope.ALL)
    values = [w.param.detach().clone() for w in weights]
    masks = nm_masks(weights, values, [None] * len(weights), pattern)
    checked_expert = checked_linear = False
    for weight, value, mask in zip(weights, values, masks):
        if weight.expert_ids is not None:  # [E, K, N]: x @ w[e] sums over K (dim 1)
            checked_expert = True
            for e, k_column in itertools.product(range(value.shape[0]), range(value.shape[2])):
                row = value[e, :, k_column].tolist()
                want = _reference_nm_keep(row, pattern.n, pattern.m)
                assert mask[e, :, k_column].tolist() == want, (weight.name, e, k_column)
        else:  # nn.Linear [out, in]: sums over in (dim 1)
            checked_linear = True
            for out in range(value.shape[0]):
                want = _reference_nm_keep(value[out].tolist(), pattern.n, pattern.m)
                assert mask[out].tolist() == want, (weight.name, out)
        pruned = value.masked_fill(~mask, 0.0)
        assert satisfies_nm(pruned, weight.reduction_dim, pattern)
        assert int(mask.sum()) == value.numel() * pattern.n // pattern.m
    assert checked_expert and checked_linear
    # Along the other dimension the pattern does not hold: the direction matters.
    w1 = next(w for w in weights if w.name.endswith("w1_EDH"))
    w1_pruned = w1.param.detach().masked_fill(~masks[weights.index(w1)], 0.0)
    assert not satisfies_nm(w1_pruned, 2, pattern)


def test_nm_mask_keeps_pruned_weights_pruned() -> None:
    weight = PrunableWeight("w", nn.Parameter(torch.tensor([[4.0, 3.0, 2.0, 1.0]])), 1, None, False)
    alive = torch.tensor([[False, True, True, True]])
    (mask,) = nm_masks([weight], [weight.param], [alive], NMPattern(2, 4))
    assert mask.tolist() == [[False, True, True, False]]  # 4.0 was pruned before: it stays
    (mask,) = nm_masks(
        [weight], [weight.param], [torch.tensor([[0, 0, 0, 1]]).bool()], NMPattern(2, 4)
    )
    assert mask.tolist() == [[False, False, False, True]]  # fewer than N alive: only those


def test_unstructured_masks_per_matrix_and_global() -> None:
    model = small_model()
    weights = prunable_weights(model, PruneScope.ALL)
    values = [w.param.detach().clone() for w in weights]
    masks = unstructured_masks(weights, values, [None] * len(weights), 0.3, False)
    for weight, value, mask in zip(weights, values, masks):
        matrices = [value] if weight.expert_ids is None else list(value)
        mask_matrices = [mask] if weight.expert_ids is None else list(mask)
        for matrix, keep in zip(matrices, mask_matrices):
            flat = matrix.abs().flatten().tolist()
            k = math.floor(0.3 * len(flat) + 0.5)
            pruned = sorted(range(len(flat)), key=lambda i: (flat[i], i))[:k]
            want = [i not in set(pruned) for i in range(len(flat))]
            assert keep.flatten().tolist() == want, weight.name
    global_masks = unstructured_masks(weights, values, [None] * len(weights), 0.3, True)
    kept = torch.cat([v.abs()[m] for v, m in zip(values, global_masks)])
    dropped = torch.cat([v.abs()[~m] for v, m in zip(values, global_masks)])
    total = sum(v.numel() for v in values)
    assert dropped.numel() == math.floor(0.3 * total + 0.5)
    assert float(kept.min()) >= float(dropped.max())
    # Attention weights (std 0.02) are smaller than the experts' (std D^-1/2): a global
    # threshold prunes them much more than 30%, the experts much less.
    by_name = {w.name: float((~m).float().mean()) for w, m in zip(weights, global_masks)}
    assert (
        by_name["blocks.0.attn.qkv_proj.weight"]
        > 0.5
        > 0.3
        > by_name["blocks.1.ffn.experts.w1_EDH"]
    )


def test_ties_go_to_the_lower_index() -> None:
    weight = PrunableWeight("w", nn.Parameter(torch.ones(1, 8)), 1, None, False)
    (mask,) = unstructured_masks([weight], [weight.param], [None], 0.5, False)
    assert mask.tolist() == [[False] * 4 + [True] * 4]  # the first four go
    (mask,) = nm_masks([weight], [weight.param], [None], NMPattern(2, 4))
    assert mask.tolist() == [[True, True, False, False] * 2]  # the first two stay


def test_unstructured_masks_only_grow() -> None:
    weight = PrunableWeight("w", nn.Parameter(torch.tensor([[1.0, 2.0, 3.0, 4.0]])), 1, None, False)
    alive = torch.tensor([[True, True, True, False]])
    (mask,) = unstructured_masks([weight], [weight.param], [alive], 0.5, False)
    assert mask.tolist() == [[False, True, True, False]]  # 4.0 stays out, then the smallest
    (mask,) = unstructured_masks([weight], [weight.param], [alive], 0.0, False)
    assert mask.tolist() == [[True, True, True, False]]  # a lower target prunes nothing back


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_channel_permutation_leaves_the_model_unchanged(activation: str) -> None:
    model = small_model(activation).eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(tokens).logits_BTV
        groups = hidden_channels(model, PruneScope.ALL)
        assert {type(g.consumer[0]) for g in groups} and len(groups) == 2  # dense + experts
        generator = torch.Generator().manual_seed(0)
        permutations = {
            g.name: [
                torch.randperm(16 if g.stacked else 32, generator=generator)
                for _ in range(4 if g.stacked else 1)
            ]
            for g in groups
        }
        for group in groups:
            permute_hidden(group, permutations[group.name])
        after = model(tokens).logits_BTV
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    experts = model.blocks[1].ffn.experts
    assert isinstance(experts, GroupedExperts) and isinstance(model.blocks[0].ffn, DenseMLP)
    assert not torch.equal(experts.w2_EHD, small_model(activation).blocks[1].ffn.experts.w2_EHD)


def _three_stripe_partitions() -> list[list[int]]:
    """Every split of 12 channels into 3 unordered stripes of 4, as a channel order."""
    out = []
    for rest in itertools.combinations(range(1, 12), 3):
        first = (0, *rest)
        remaining = [c for c in range(12) if c not in first]
        for rest2 in itertools.combinations(remaining[1:], 3):
            second = (remaining[0], *rest2)
            out.append([*first, *second, *(c for c in remaining if c not in second)])
    return out


def test_each_greedy_step_takes_the_best_swap() -> None:
    pattern = NMPattern(2, 4)
    magnitude = torch.rand(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state = _StripeScores(magnitude, pattern)
    for _ in range(3):
        now = kept_magnitude(magnitude, state.permutation_C, pattern)
        assert state.total() == pytest.approx(now)
        gains = {}
        for p, q in itertools.combinations(range(12), 2):
            if p // 4 != q // 4:
                swapped = state.permutation_C.clone()
                swapped[[p, q]] = swapped[[q, p]]
                gains[p, q] = kept_magnitude(magnitude, swapped, pattern) - now
        gain, p, q = state.best_swap()
        assert gain == pytest.approx(max(gains.values()), abs=1e-12)
        assert gains[min(p, q), max(p, q)] == pytest.approx(gain, abs=1e-12)
        state.swap(p, q)


@pytest.mark.parametrize("seed", [9, 22])
def test_escapes_leave_local_optima_to_the_optimum(seed: int) -> None:
    pattern = NMPattern(2, 4)
    magnitude = torch.rand(
        4, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    magnitude = magnitude**3
    best = max(
        kept_magnitude(magnitude, torch.tensor(order), pattern)
        for order in _three_stripe_partitions()
    )

    def search(escapes: int) -> float:
        generator = torch.Generator().manual_seed(0)
        result = search_permutation(
            magnitude, pattern, seconds=30.0, escapes=escapes, generator=generator
        )
        assert sorted(result.permutation_C.tolist()) == list(range(12))
        assert result.kept == pytest.approx(
            kept_magnitude(magnitude, result.permutation_C, pattern)
        )
        assert result.kept_identity == pytest.approx(
            kept_magnitude(magnitude, torch.arange(12), pattern)
        )
        return result.kept

    assert search(0) < best - 1e-6  # greedy swaps alone stop in a local optimum
    assert search(20) == pytest.approx(best, rel=1e-12)


def test_permutation_before_nm_keeps_more_magnitude() -> None:
    model = small_model()
    config = PruneConfig(method="magnitude", pattern="2:4", permute=True, permute_escapes=5)
    _, report = prune_model(model, config)
    assert report.kept_without_permutation is not None
    assert report.kept > report.kept_without_permutation
    for record in report.permutation:
        assert record["magnitude_kept_with"] >= record["magnitude_kept_without"]
    # The report's "without" is what N:M keeps of the unpermuted model.
    _, plain = prune_model(small_model(), PruneConfig(method="magnitude", pattern="2:4"))
    assert report.kept_without_permutation == pytest.approx(plain.kept, rel=1e-9)
    for weight in prunable_weights(model, PruneScope.EXPERTS):
        assert satisfies_nm(weight.param, 1, NMPattern(2, 4))


def test_gmp_schedule_equals_the_formula() -> None:
    config = PruneConfig(
        method="gradual", sparsity=0.8, initial_sparsity=0.1, start=10, end=50, every=10
    )
    n, dt, t0 = 4, 10, 10
    for step in range(0, 70):
        got = pruning_sparsity(step, config)
        if step in (10, 20, 30, 40, 50):
            want = 0.8 + (0.1 - 0.8) * (1 - (step - t0) / (n * dt)) ** 3
            assert got == pytest.approx(want, abs=1e-15)
            assert gmp_sparsity(step, config) == pytest.approx(want, abs=1e-15)
        else:
            assert got is None
    assert pruning_sparsity(50, config) == pytest.approx(0.8)
    assert pruning_sparsity(10, config) == pytest.approx(0.1)
    one_shot = PruneConfig(method="magnitude", sparsity=0.5, start=3)
    assert [pruning_sparsity(s, one_shot) for s in range(5)] == [None, None, None, 0.5, None]


def test_sr_ste_update_by_hand() -> None:
    # One Linear weight [2 out, 4 in], 2:4 along `in`; SGD lr 0.1; loss = sum(x @ W~^T).
    dense = torch.tensor([[1.0, -3.0, 0.5, 2.0], [0.2, 0.1, -0.4, 0.3]])
    param = nn.Parameter(dense.clone())
    weight = PrunableWeight("w", param, 1, None, False)
    decay = 0.5
    config = PruneConfig(method="sr_ste", pattern="2:4", sr_ste_decay=decay)
    state = MaskedTraining(config, [Constrained(weight, Rule.SR_STE)])
    mask = torch.tensor([[False, True, False, True], [False, False, True, True]])
    assert torch.equal(param.detach(), dense * mask)  # the forward sees W~
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    (x @ param.t()).sum().backward()
    grad_at_sparse = x.sum(0).expand(2, 4)  # d/dW~ of sum(x W~^T): the column sums of x
    assert torch.equal(param.grad, grad_at_sparse)  # straight through: all entries, pruned too
    state.before_update()
    want_grad = grad_at_sparse + decay * (~mask) * dense
    torch.testing.assert_close(param.grad, want_grad)
    assert torch.equal(param.detach(), dense)  # the optimizer updates the dense weights
    with torch.no_grad():
        param -= 0.1 * param.grad
    state.after_update()
    new_dense = dense - 0.1 * want_grad
    # By hand: row 0: [1 - .1(1.5 + .5), -3 - .1(2.5), .5 - .1(3.5 + .25), 2 - .1(4.5)];
    # row 1: [.2 - .1(1.5 + .1), .1 - .1(2.5 + .05), -.4 - .1(3.5), .3 - .1(4.5)]
    torch.testing.assert_close(new_dense[0], torch.tensor([0.8, -3.25, 0.125, 1.55]))
    torch.testing.assert_close(new_dense[1], torch.tensor([0.04, -0.155, -0.75, -0.15]))
    # The mask follows the new dense weights: row 1 now keeps -0.155 over -0.15.
    new_mask = torch.tensor([[False, True, False, True], [False, True, True, False]])
    torch.testing.assert_close(param.detach(), new_dense * new_mask)
    torch.testing.assert_close(state.constrained[0].dense, new_dense)
    # A step without a gradient for the weight (the optimizer skips it): W is unchanged.
    param.grad = None
    state.before_update()
    state.after_update()
    torch.testing.assert_close(state.constrained[0].dense, new_dense)
    torch.testing.assert_close(param.detach(), new_dense * new_mask)


def test_packed_size_matches_torch_semi_structured_format() -> None:
    conversions = pytest.importorskip("torch.sparse._semi_structured_conversions")
    generator = torch.Generator().manual_seed(0)
    for dtype, value_bytes in ((torch.float16, 2), (torch.bfloat16, 2), (torch.int8, 1)):
        dense = torch.randn(64, 128, generator=generator)
        (mask,) = nm_masks(
            [PrunableWeight("w", nn.Parameter(dense), 1, None, False)],
            [dense],
            [None],
            NMPattern(2, 4),
        )
        matrix = (dense * 10 * mask).to(dtype)
        packed, meta = conversions.sparse_semi_structured_from_dense_cutlass(matrix)
        torch_bytes = packed.numel() * packed.element_size() + meta.numel() * meta.element_size()
        assert packed_nm_bytes(matrix.numel(), NMPattern(2, 4), value_bytes) == torch_bytes


def test_bad_input_is_refused_by_name() -> None:
    for value in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"prune.sparsity={value} is invalid.*\[0, 1\)"):
            PruneConfig(method="magnitude", sparsity=value)
    for pattern in ("4:4", "3:2", "0:4", "2-4"):
        with pytest.raises(ValueError, match=r"prune.pattern=.*1 <= N < M"):
            PruneConfig(method="magnitude", pattern=pattern)
    model = small_model()
    with pytest.raises(
        ValueError, match=r"M=3 .* blocks.0.attn.qkv_proj.weight has shape \(64, 32\)"
    ):
        build_pruning(PruneConfig(method="magnitude", pattern="1:3", scope="all"), model)
    dense = small_model(moe_every=0)
    with pytest.raises(ValueError, match=r"prune.scope=experts has nothing to prune.*dense"):
        prune_model(dense, PruneConfig(method="magnitude", sparsity=0.5, scope="experts"))
    with pytest.raises(ValueError, match=r"prune.method=gradual needs prune.sparsity"):
        PruneConfig(method="gradual", end=10)
    with pytest.raises(ValueError, match=r"prune.method=sr_ste trains N:M"):
        PruneConfig(method="sr_ste")
    with pytest.raises(ValueError, match=r"prune.permute=true .* N:M"):
        PruneConfig(method="magnitude", sparsity=0.5, permute=True)
    with pytest.raises(ValueError, match=r"end - start a multiple of every"):
        PruneConfig(method="gradual", sparsity=0.5, start=0, end=10, every=3)
    with pytest.raises(ValueError, match=r"contradicts prune.pattern=2:4"):
        PruneConfig(method="magnitude", sparsity=0.7, pattern="2:4")


def test_fixed_masks_zero_gradients_and_weights_around_the_update() -> None:
    param = nn.Parameter(torch.tensor([[1.0, -2.0, 3.0, -4.0]]))
    weight = PrunableWeight("w", param, 1, None, False)
    mask = torch.tensor([[True, False, True, False]])
    state = MaskedTraining(PruneConfig(), [Constrained(weight, Rule.FIXED, mask)])
    assert param.detach().tolist() == [[1.0, 0.0, 3.0, 0.0]]
    optimizer = torch.optim.AdamW([param], lr=0.1, weight_decay=0.1)
    optimizer.state[param] = {  # moments from before the pruning would move the zeros
        "step": torch.tensor(5.0), "exp_avg": torch.ones(1, 4), "exp_avg_sq": torch.ones(1, 4),
    }  # fmt: skip
    (param * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    state.before_update()
    assert param.grad is not None and param.grad.tolist() == [[1.0, 0.0, 3.0, 0.0]]
    optimizer.step()
    assert param.detach()[0, 1] != 0  # AdamW's momentum moved a pruned weight ...
    state.after_update()
    assert param.detach()[0, 1] == 0 and param.detach()[0, 3] == 0  # ... and back to zero
    assert param.detach()[0, 0] != 1.0


def test_semi_structured_experts_are_refused_off_cuda_and_unpruned() -> None:
    model = small_model()
    with pytest.raises(
        ValueError, match=r"compute capability 8\.0 or more; the experts are on cpu"
    ):
        use_semi_structured(model)
    with pytest.raises(ValueError, match="not 2:4 along its reduction dimension"):
        SemiStructuredExperts(model.blocks[1].ffn.experts)


@pytest.mark.gpu
def test_two_four_experts_run_semi_structured_on_cuda() -> None:
    if not semi_structured_available("cuda"):
        pytest.skip("needs compute capability 8.0 or more")
    torch.manual_seed(0)
    # Widths at torch's semi-structured minimum (rows multiple of 32, columns of 64).
    experts = GroupedExperts(4, 64, 128, "swiglu").cuda()
    weights = prunable_weights(nn.ModuleDict({"e": experts}), PruneScope.EXPERTS)
    masks = nm_masks(weights, [w.param for w in weights], [None] * len(weights), NMPattern(2, 4))
    with torch.no_grad():
        for weight, mask in zip(weights, masks):
            weight.param.masked_fill_(~mask, 0.0)
            weight.param.copy_(weight.param.to(torch.bfloat16).float())  # exact in bf16
    sparse = SemiStructuredExperts.from_grouped(experts, torch.bfloat16)
    counts = torch.tensor([5, 0, 17, 10], device="cuda")
    x = torch.randn(32, 64, device="cuda").to(torch.bfloat16).float()
    with torch.no_grad():
        parts = x.split(counts.tolist())
        want = torch.cat([experts.expert_forward(part, e) for e, part in enumerate(parts)])
        got = sparse(x, counts)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)  # bf16 products
    with torch.no_grad():  # the compiled decode's padded layout: every expert, every row
        every = sparse.forward_every(x)
        want_every = torch.stack([experts.expert_forward(x, e) for e in range(4)])
    torch.testing.assert_close(every, want_every, rtol=3e-2, atol=3e-2)
    packed = sparse.matrices["w1"][0]  # [128 out, 64 in] in bf16
    parts_stored = [t for t in (packed.packed, packed.meta) if t is not None]
    packed_bytes = sum(t.numel() * t.element_size() for t in parts_stored)
    assert packed_bytes < 0.6 * 64 * 128 * 2
    if packed.meta is not None:  # CUTLASS: values and metadata as the formula says
        assert packed_bytes == packed_nm_bytes(64 * 128, NMPattern(2, 4), 2)


def test_global_ranking_needs_every_expert() -> None:
    config = ModelConfig(
        d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16, expert_hidden=16,
        num_experts=4,
    )  # fmt: skip

    def half(block: int, num_experts: int) -> LocalDispatcher:
        return LocalDispatcher(num_experts, [0, 1])

    model = MoETransformer(config, RoutingConfig(top_k=2), half)
    prune = PruneConfig(method="gradual", sparsity=0.5, end=4, granularity="global")
    with pytest.raises(ValueError, match=r"holds only some experts of blocks.0.ffn.experts.w1"):
        build_pruning(prune, model)
    build_pruning(PruneConfig(method="gradual", sparsity=0.5, end=4), model)  # per matrix


def test_scopes_name_the_right_weights() -> None:
    config = ModelConfig(
        d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16, expert_hidden=16,
        num_experts=4, moe_every=2, residual_mlp=True, ffn_kind="expert", ffn_hidden=32,
    )  # fmt: skip
    model = MoETransformer(config, RoutingConfig(top_k=1), seed=0)
    experts = [w.name for w in prunable_weights(model, PruneScope.EXPERTS)]
    dense = [w.name for w in prunable_weights(model, PruneScope.DENSE)]
    assert experts == [f"blocks.1.ffn.experts.{k}" for k in ("w1_EDH", "w2_EHD")]
    assert dense == [
        "blocks.0.attn.qkv_proj.weight", "blocks.0.attn.out_proj.weight",
        "blocks.0.ffn.experts.w1_EDH", "blocks.0.ffn.experts.w2_EHD",  # the ExpertFFN
        "blocks.1.attn.qkv_proj.weight", "blocks.1.attn.out_proj.weight",
        "blocks.1.ffn.residual.up.weight", "blocks.1.ffn.residual.down.weight",  # PR-MoE
    ]  # fmt: skip
    every = {w.name for w in prunable_weights(model, PruneScope.ALL)}
    assert every == set(experts) | set(dense)
    never = ("embed", "norm", "router", "residual_gate")
    assert not [name for name in every if any(word in name for word in never)]
    groups = {g.name: g.is_expert for g in hidden_channels(model, PruneScope.ALL)}
    assert groups == {
        "blocks.0.ffn.experts": False, "blocks.1.ffn.experts": True, "blocks.1.ffn.residual": False
    }  # fmt: skip
