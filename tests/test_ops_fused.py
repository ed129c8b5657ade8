"""The folded expert matmuls of `moe.ops.fused` (`gather_grouped_mm`,
`grouped_mm_combine`) against plain per-row loops: outputs and every gradient, fp32 and
fp64, on one and two threads (the block workers), under bf16 autocast, their composed
form (the path of devices without a CPU block worker), the registrations, and the layer
folded against the layer unfolded.

Shapes: T tokens, R routed rows (sorted by expert), D width, H hidden, E experts.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe import ops
from moe.layer import MoELayer
from moe.ops import fused, spans
from routing import RoutingConfig

BF16_TOLERANCE = {"rtol": 2**-6, "atol": 2e-3}


def _scaled(tolerance: dict[str, float], reference: torch.Tensor) -> dict[str, float]:
    """`tolerance` with atol relative to the reference's largest entry: a bf16 rounding of
    each of the many summands of a sum near zero is relative to the summands."""
    return {
        "rtol": tolerance["rtol"],
        "atol": tolerance["atol"] * float(reference.detach().abs().max()),
    }


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    )


def _routes(counts: list[int], num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_index_R, expert_R): rows sorted by expert, counts[e] rows for expert e, each
    row of a random token (tokens repeat and some get no row)."""
    generator = torch.Generator().manual_seed(seed)
    token_index_R = torch.randint(0, num_tokens, (sum(counts),), generator=generator)
    expert_R = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return token_index_R, expert_R


def _loop_gather_mm(x_TD, w_EDH, token_index_R, expert_R):  # type: ignore[no-untyped-def]
    rows = [x_TD[int(t)] @ w_EDH[int(e)] for t, e in zip(token_index_R, expert_R)]
    return torch.stack(rows) if rows else x_TD.new_zeros(0, w_EDH.shape[2])


def _loop_mm_combine(h_RH, w_EHD, token_index_R, weight_R, expert_R, num_tokens):  # type: ignore[no-untyped-def]
    y_TD = [h_RH.new_zeros(w_EHD.shape[2]) for _ in range(num_tokens)]
    for r, (t, e) in enumerate(zip(token_index_R.tolist(), expert_R.tolist())):
        y_TD[t] = y_TD[t] + weight_R[r] * (h_RH[r] @ w_EHD[e])
    return torch.stack(y_TD)


COUNTS = {
    "uneven": [3, 0, 5, 1],
    "one_expert": [0, 0, 7, 0],
    "uniform": [2, 2, 2, 2],
    "pool": [0, 9, 3, 0, 11, 1] + [2, 1] * 9,  # >= POOL_MIN_BLOCKS blocks: the workers
    "empty": [0, 0, 0],
}


def _inputs(counts: list[int], dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    num_tokens, width, hidden = 9, 6, 5
    token_index_R, expert_R = _routes(counts, num_tokens, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(num_tokens, width, generator=generator, dtype=dtype)
    w1 = torch.randn(len(counts), width, hidden, generator=generator, dtype=dtype)
    w2 = torch.randn(len(counts), hidden, width, generator=generator, dtype=dtype)
    weight = torch.rand(sum(counts), generator=generator, dtype=dtype)
    dy = torch.randn(num_tokens, width, generator=generator, dtype=dtype)
    return token_index_R, expert_R, x, w1, w2, weight, dy


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _check_both_ops(counts: list[int], dtype: torch.dtype, threads: int) -> None:
    """Both ops (and their backward) against the loops, every span size case of the
    module: the caller sets `spans.SPAN_ROWS`."""
    token_index_R, expert_R, x, w1, w2, weight, dy = _inputs(counts, dtype)
    counts_E, num_tokens = torch.tensor(counts), x.shape[0]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got_in = _leaves(x, w1, w2, weight)
        h = torch.nn.functional.gelu(
            ops.gather_grouped_mm(got_in[0], got_in[1], token_index_R, counts_E)
        )
        y = ops.grouped_mm_combine(h, got_in[2], token_index_R, got_in[3], counts_E, num_tokens)
        y.backward(dy)
    finally:
        torch.set_num_threads(previous)
    want_in = _leaves(x, w1, w2, weight)
    h_ref = torch.nn.functional.gelu(
        _loop_gather_mm(want_in[0], want_in[1], token_index_R, expert_R)
    )
    y_ref = _loop_mm_combine(h_ref, want_in[2], token_index_R, want_in[3], expert_R, num_tokens)
    torch.testing.assert_close(y, y_ref, **_tolerance(dtype))
    if not counts_E.sum():
        return
    y_ref.backward(dy)
    for name, got, want in zip(("x", "w1", "w2", "weight"), got_in, want_in):
        torch.testing.assert_close(got.grad, want.grad, **_tolerance(dtype), msg=name)


# Rows per span (`spans.SPAN_ROWS`): every expert its own span, a few experts per span,
# everything in one span.
SPAN_ROWS = {"expert": 1, "few": 4, "all": 1 << 20}


@pytest.mark.parametrize("span", sorted(SPAN_ROWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(COUNTS))
def test_folded_ops_match_loops(
    case: str, dtype: torch.dtype, span: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spans, "SPAN_ROWS", SPAN_ROWS[span])
    _check_both_ops(COUNTS[case], dtype, threads=1)


@pytest.mark.parametrize("span", ["expert", "few"])
@pytest.mark.parametrize("case", ["pool", "uneven"])
def test_folded_ops_on_the_block_workers_match_loops(
    case: str, span: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads: from `POOL_MIN_SPANS` spans on they share out to the block workers,
    each adding into its own sums."""
    monkeypatch.setattr(spans, "SPAN_ROWS", SPAN_ROWS[span])
    counts = COUNTS[case]
    assert len(spans.Spans(torch.tensor(counts), sum(counts)).items) >= spans.POOL_MIN_SPANS
    _check_both_ops(COUNTS[case], torch.float32, threads=2)


def test_composed_form_matches_loops() -> None:
    """The form every device without the CPU block workers runs (the unfolded ops of
    `moe.ops`, their Triton kernels on CUDA), checked here with CPU tensors."""
    counts = COUNTS["pool"]
    token_index_R, expert_R, x, w1, w2, weight, dy = _inputs(counts, torch.float64, seed=3)
    counts_E, num_tokens = torch.tensor(counts), x.shape[0]
    h_RH = fused.composed_gather_grouped_mm(x, w1, token_index_R, counts_E)
    torch.testing.assert_close(h_RH, _loop_gather_mm(x, w1, token_index_R, expert_R))
    want_in = _leaves(x, w1, w2, weight)
    h_ref = _loop_gather_mm(want_in[0], want_in[1], token_index_R, expert_R)
    y_ref = _loop_mm_combine(h_ref, want_in[2], token_index_R, want_in[3], expert_R, num_tokens)
    y = fused.composed_grouped_mm_combine(h_RH, w2, token_index_R, weight, counts_E, num_tokens)
    torch.testing.assert_close(y, y_ref)
    (dh_ref,) = torch.autograd.grad(y_ref, h_ref, dy, retain_graph=True)
    y_ref.backward(dy)
    dh, dw2, dweight = fused.composed_grouped_mm_combine_backward(
        dy, h_RH, w2, token_index_R, weight, counts_E, True
    )
    torch.testing.assert_close(dh, dh_ref)
    torch.testing.assert_close(dw2, want_in[2].grad)
    torch.testing.assert_close(dweight, want_in[3].grad)
    dx, dw1 = fused.composed_gather_grouped_mm_backward(
        dh_ref, x, w1, token_index_R, counts_E, True, True
    )
    torch.testing.assert_close(dx, want_in[0].grad)
    torch.testing.assert_close(dw1, want_in[1].grad)


def _check_bf16_autocast_against_the_fp32_loop(counts: list[int], seed: int) -> None:
    """Both ops and their backward under bf16 autocast against the fp32 loop on the
    bf16-rounded operands."""
    token_index_R, expert_R, x, w1, w2, weight, dy = _inputs(counts, torch.float32, seed=seed)
    counts_E, num_tokens = torch.tensor(counts), x.shape[0]
    got_in = _leaves(x, w1, w2, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = ops.gather_grouped_mm(got_in[0], got_in[1], token_index_R, counts_E)
        y = ops.grouped_mm_combine(h, got_in[2], token_index_R, got_in[3], counts_E, num_tokens)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.backward(dy.to(torch.bfloat16))
    rounded = [t.to(torch.bfloat16).float() for t in (x, w1, w2)]
    want_in = _leaves(*rounded, weight)
    h_ref = _loop_gather_mm(want_in[0], want_in[1], token_index_R, expert_R)
    # What the second matmul multiplies: the hidden rows scaled by their routing
    # weights, rounded to bf16 (the loop then sums in fp32 with weights of one).
    scaled_ref = (want_in[3].unsqueeze(1) * h_ref).to(torch.bfloat16).float()
    ones = torch.ones_like(weight)
    y_ref = _loop_mm_combine(scaled_ref, want_in[2], token_index_R, ones, expert_R, num_tokens)
    torch.testing.assert_close(y.float(), y_ref, **_scaled(BF16_TOLERANCE, y_ref))
    y_ref.backward(dy.to(torch.bfloat16).float())
    for name, got, want in zip(("x", "w1", "w2", "weight"), got_in, want_in):
        assert got.grad.dtype == torch.float32, name
        torch.testing.assert_close(
            got.grad, want.grad, **_scaled(BF16_TOLERANCE, want.grad), msg=name
        )


def test_opcheck_registrations() -> None:
    counts = torch.tensor([4, 0, 2])
    token_index_R = torch.tensor([0, 3, 3, 1, 4, 0])
    x = torch.randn(5, 4, requires_grad=True)
    w1 = torch.randn(3, 4, 3, requires_grad=True)
    w2 = torch.randn(3, 3, 4, requires_grad=True)
    h = torch.randn(6, 3, requires_grad=True)
    weight = torch.rand(6, requires_grad=True)
    torch.library.opcheck(torch.ops.moe.gather_grouped_mm.default, (x, w1, token_index_R, counts))
    combine_args = (h, w2, token_index_R, weight, counts, 5)
    torch.library.opcheck(torch.ops.moe.grouped_mm_combine.default, combine_args)
    for input_grad, weight_grad in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.moe.gather_grouped_mm_backward.default,
            (h.detach(), x.detach(), w1.detach(), token_index_R, counts, input_grad, weight_grad),
        )
    for weight_grad in (True, False):
        torch.library.opcheck(
            torch.ops.moe.grouped_mm_combine_backward.default,
            (
                torch.randn(5, 4),
                h.detach(),
                w2.detach(),
                token_index_R,
                weight.detach(),
                counts,
                weight_grad,
            ),
        )


def test_compile_traces_the_folded_ops() -> None:
    token_index_R, _, x, w1, w2, weight, _ = _inputs(COUNTS["uneven"], torch.float32)
    counts_E = torch.tensor(COUNTS["uneven"])

    def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(ops.gather_grouped_mm(a, b, token_index_R, counts_E))
        return ops.grouped_mm_combine(h, c, token_index_R, d, counts_E, a.shape[0]).square().sum()

    compiled_in, eager_in = _leaves(x, w1, w2, weight), _leaves(x, w1, w2, weight)
    loss = torch.compile(fn, backend="aot_eager", fullgraph=True)(*compiled_in)
    loss.backward()
    eager = fn(*eager_in)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for got, want in zip(compiled_in, eager_in):
        torch.testing.assert_close(got.grad, want.grad)


def _layer_results(layer: MoELayer, x: torch.Tensor, dy: torch.Tensor, autocast: bool) -> list:  # type: ignore[type-arg]
    """[y, dx, d(each parameter)] of one forward and backward, in fp32."""
    leaf = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(leaf)
    params = list(layer.parameters())
    grads = torch.autograd.grad((out.y.float() * dy).sum() + out.aux_loss, [leaf, *params])
    return [out.y.detach().float(), *(g.float() for g in grads)]


def _fine_grained_pair(activation: str) -> tuple[MoELayer, MoELayer]:
    """A fine-grained layer (top-8 of 24 experts) folded, and its copy unfolded."""
    torch.manual_seed(4)
    routing = RoutingConfig(top_k=8, capacity="dropless", aux_loss_weight=0.01)
    folded = MoELayer(16, 8, 24, routing, activation=activation)
    unfolded = copy.deepcopy(folded)
    unfolded.fold_permute = False
    return folded, unfolded


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_folded_equals_unfolded(activation: str) -> None:
    """The same outputs and gradients with the permute folded into the experts as on the
    permuted rows (which the per-token loop oracle checks in tests/test_layer.py)."""
    folded, unfolded = _fine_grained_pair(activation)
    x, dy = torch.randn(40, 16), torch.randn(40, 16)
    names = ["y", "x"] + [name for name, _ in folded.named_parameters()]
    calls: list[str] = []
    for name, layer in (("folded", folded), ("unfolded", unfolded)):
        forward_tokens = layer.experts.forward_tokens

        def spy(*args: torch.Tensor, forward_tokens=forward_tokens, name=name) -> torch.Tensor:  # type: ignore[no-untyped-def]
            calls.append(name)
            return forward_tokens(*args)

        layer.experts.forward_tokens = spy  # type: ignore[method-assign]
    got, want = _layer_results(folded, x, dy, False), _layer_results(unfolded, x, dy, False)
    assert calls == ["folded"], "top-8 folds (moe.layer.FOLD_MIN_TOP_K), the unfolded copy never"
    for name, one, other in zip(names, got, want, strict=True):
        tolerance = _tolerance(torch.float32)
        torch.testing.assert_close(one, other, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


def test_layer_folded_bf16_is_as_close_to_fp32_as_unfolded() -> None:
    """Under bf16 autocast, the folded layer's outputs and gradients are as close to the
    fp32 layer's as the unfolded layer's are (both round differently, so they are
    compared with the truth, not with each other)."""
    folded, unfolded = _fine_grained_pair("gelu")
    x, dy = torch.randn(40, 16), torch.randn(40, 16)
    names = ["y", "x"] + [name for name, _ in folded.named_parameters()]
    truth = _layer_results(unfolded, x, dy, False)
    got = _layer_results(folded, x, dy, True)
    other = _layer_results(unfolded, x, dy, True)
    for name, true, one, two in zip(names, truth, got, other, strict=True):
        scale = float(true.abs().max())
        error = float((one - true).abs().max()) / scale
        error_unfolded = float((two - true).abs().max()) / scale
        assert error <= max(2 * error_unfolded, 2**-8), (name, error, error_unfolded)


def test_folded_layer_compiles_as_one_graph_and_equals_eager() -> None:
    """A top-8 dropless layer (folded) under torch.compile: one graph, no break, and the
    eager loss and gradients."""
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 24, RoutingConfig(top_k=8, capacity="dropless"))
    x = torch.randn(30, 16)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        out = layer(x)
        return out.y.square().sum() + out.aux_loss

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss_of)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    results = []
    for fn in (torch.compile(loss_of, backend="aot_eager", fullgraph=True), loss_of):
        leaf = x.clone().requires_grad_(True)
        loss = fn(leaf)
        loss.backward()
        results.append([loss.detach(), leaf.grad, *(p.grad.clone() for p in layer.parameters())])
        layer.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    for compiled, eager in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


def test_the_default_forward_tokens_matches_the_per_row_loop() -> None:
    """A stack without a folded path (`Experts.forward_tokens`' default: gather, `forward`,
    weighted index_add) against each row's expert applied to its token, output and
    input gradient."""
    from moe.experts import Experts, GroupedExperts

    torch.manual_seed(0)
    counts = [3, 0, 5, 2]
    stack = GroupedExperts(len(counts), 8, 16, "swiglu")
    token_index_R, expert_R = _routes(counts, num_tokens=6, seed=1)
    weight_R = torch.rand(len(token_index_R))
    counts_E = torch.tensor(counts)
    x_TD = torch.randn(6, 8, requires_grad=True)
    y_TD = Experts.forward_tokens(stack, x_TD, token_index_R, weight_R, counts_E)
    x_ref = x_TD.detach().clone().requires_grad_(True)
    rows = [
        weight_R[r]
        * stack.expert_forward(x_ref[token_index_R[r]].unsqueeze(0), int(expert_R[r]))[0]
        for r in range(len(token_index_R))
    ]
    y_ref = torch.zeros(6, 8)
    for r, row in enumerate(rows):
        y_ref = y_ref.index_add(0, token_index_R[r : r + 1], row.unsqueeze(0))
    torch.testing.assert_close(y_TD, y_ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn(6, 8)
    (y_TD * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(x_TD.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
