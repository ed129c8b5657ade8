"""The folded ops on the padded blocks of `moe.ops.padded_blocks` (bf16 on CPU): which
loads take them (one or two tiers) and which stay on the spans, against the fp32 loops
under autocast, the fp32 sums, non-finite rows kept to their experts, the layout built
once per routing."""

from __future__ import annotations

import pytest
import torch
from test_ops_fused import SPAN_ROWS, _check_bf16_autocast_against_the_fp32_loop

from moe.layer import MoELayer
from moe.ops import fused, padded_blocks, spans
from routing import RoutingConfig


def _count_padded_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the `moe.ops.padded_blocks` ops the folded ops call from now on."""
    calls: list[str] = []
    for name in (
        "gather_grouped_mm", "gather_grouped_mm_backward",
        "grouped_mm_combine", "grouped_mm_combine_backward",
    ):  # fmt: skip
        original = getattr(padded_blocks, name)

        def spy(*args, original=original, name=name):  # type: ignore[no-untyped-def]
            calls.append(name)
            return original(*args)

        monkeypatch.setattr(padded_blocks, name, spy)
    return calls


# A load the padded layout takes (E * M within `max_padded_ratio` of the rows) and one
# it leaves to the spans (one expert with most rows).
BALANCED = [70, 66, 72, 69, 71, 64, 70, 68]
BALANCED_WITH_EMPTY = [70, 66, 0, 72, 69, 71, 64, 70]  # an expert without rows in the middle
SKEWED = [200, 0, 100, 50, 25, 12, 6, 3, 1] + [0] * 8  # geometric: no two tiers fit it


@pytest.mark.parametrize("span", ["expert", "few"])
def test_folded_ops_under_bf16_autocast_match_the_fp32_loop(
    span: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 autocast on the span path (a skewed load): the matmuls take bf16 operands
    (blocks over 64 rows multiplied at bucketed row counts), the routing weights stay
    fp32, the sums are fp32 rounded once."""
    monkeypatch.setattr(spans, "SPAN_ROWS", SPAN_ROWS[span])
    calls = _count_padded_calls(monkeypatch)
    _check_bf16_autocast_against_the_fp32_loop(SKEWED, seed=7)
    assert calls == [], "a skewed load stays on the span path"


FULL = [80, 77, 80, 79, 80, 78, 80, 80]  # one tier: no overflow tier saves places


@pytest.mark.parametrize(
    ("counts", "seed", "tiers"),
    [(BALANCED, 7, 2), (BALANCED, 8, 2), (BALANCED_WITH_EMPTY, 9, 2), (FULL, 10, 1)],
)
def test_padded_layout_under_bf16_autocast_matches_the_fp32_loop(
    counts: list[int], seed: int, tiers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 autocast with a balanced load: every op and backward runs on the padded
    blocks of `moe.ops.padded_blocks` (one bmm per matmul and tier, sums by
    embedding_bag), in one tier or with the largest experts' rows beyond the first
    height in a second."""
    token_index_R = torch.zeros(sum(counts), dtype=torch.long)
    assert len(padded_blocks.PaddedBlocks(torch.tensor(counts), token_index_R, 9).tiers) == tiers
    calls = _count_padded_calls(monkeypatch)
    _check_bf16_autocast_against_the_fp32_loop(counts, seed=seed)
    assert sorted(calls) == [
        "gather_grouped_mm", "gather_grouped_mm_backward",
        "grouped_mm_combine", "grouped_mm_combine_backward",
    ]  # fmt: skip


def test_padded_layout_applies_within_its_bound() -> None:
    half = torch.zeros(1, dtype=torch.bfloat16)
    balanced, skewed = torch.tensor(BALANCED), torch.tensor(SKEWED)
    assert padded_blocks.applies(half, balanced, sum(BALANCED), hidden=128)
    assert not padded_blocks.applies(half, skewed, sum(SKEWED), hidden=8)
    assert not padded_blocks.applies(half.float(), balanced, sum(BALANCED), 8), "fp32: spans"
    assert not padded_blocks.applies(half, torch.zeros(4, dtype=torch.long), 0, 8)
    # 4 blocks of 48 places for 128 rows: 1.5 padded places a row, within the bound of
    # narrow experts and beyond that of wide ones.
    uneven = torch.tensor([48, 32, 24, 24])
    assert padded_blocks.applies(half, uneven, 128, hidden=32)
    assert not padded_blocks.applies(half, uneven, 128, hidden=128)


def test_padded_sums_stay_in_fp32_until_rounded_once() -> None:
    """A token's rows summed by the padded layout: 1 and 256 rows of 2^-9 give 1.5 (a
    bf16 running sum would stay at 1)."""
    rows = torch.cat([torch.ones(1, 2), torch.full((256, 2), 2.0**-9)]).to(torch.bfloat16)
    counts_E = torch.tensor([257])
    blocks = padded_blocks.PaddedBlocks(counts_E, torch.zeros(257, dtype=torch.long), 3)
    summed = blocks.sum_per_token(blocks.pad(rows))
    assert summed.dtype == torch.bfloat16
    torch.testing.assert_close(summed.float(), torch.tensor([[1.5, 1.5], [0, 0], [0, 0]]))


def test_padded_weight_gradients_keep_a_non_finite_token_to_its_experts() -> None:
    """A padding place holds a token of its own expert, so an inf in a token's row
    reaches the weight gradients of the experts it is routed to (as in the loop) and no
    other's; an expert without rows (whose padding reads the next expert's first token)
    gets an exact zero. 64 tokens, each routed to 2 of 8 experts (expert 3 to none);
    each expert's first token in turn carries the inf."""
    num_tokens, width, hidden, experts, empty = 64, 6, 5, 8, 3
    generator = torch.Generator().manual_seed(4)
    choices = torch.tensor([e for e in range(experts) if e != empty])
    expert_TK = torch.stack(
        [choices[torch.randperm(len(choices), generator=generator)[:2]] for _ in range(num_tokens)]
    )
    order = expert_TK.flatten().argsort(stable=True)
    token_index_R, expert_R = order // 2, expert_TK.flatten()[order]
    counts_E = torch.bincount(expert_R, minlength=experts)
    w1 = torch.randn(experts, width, hidden, generator=generator).to(torch.bfloat16)
    w2 = torch.randn(experts, hidden, width, generator=generator).to(torch.bfloat16)
    h = torch.randn(len(order), hidden, generator=generator).to(torch.bfloat16)
    weight = torch.rand(len(order), generator=generator)
    starts = (torch.cumsum(counts_E, 0) - counts_E).tolist()
    for expert in range(experts):
        if expert == empty:
            continue
        bad = int(token_index_R[starts[expert]])
        x, dy = (torch.randn(num_tokens, width, generator=generator) for _ in range(2))
        x, dy = x.to(torch.bfloat16), dy.to(torch.bfloat16)
        x[bad], dy[bad] = float("inf"), float("inf")
        assert padded_blocks.layout(x, counts_E, token_index_R, num_tokens, hidden)
        _, dw1 = fused.gather_grouped_mm_backward(h, x, w1, token_index_R, counts_E, True, True)
        _, dw2, _ = fused.grouped_mm_combine_backward(
            dy, h, w2, token_index_R, weight, counts_E, True
        )
        routed = set(expert_TK[bad].tolist())
        for other in range(experts):
            for dw in (dw1, dw2):
                assert bool(torch.isfinite(dw[other]).all()) == (other not in routed), (
                    bad, other, routed,
                )  # fmt: skip
        assert not dw1[empty].any() and not dw2[empty].any()


def _count_layout_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gains an entry each time a padded layout is built from now on."""
    builds: list[int] = []
    init = padded_blocks.PaddedBlocks.__init__

    def counted(self, *args):  # type: ignore[no-untyped-def]
        builds.append(1)
        init(self, *args)

    monkeypatch.setattr(padded_blocks.PaddedBlocks, "__init__", counted)
    return builds


def test_padded_layout_is_built_once_per_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 layer step builds the padded layout once (its four folded ops share it
    through the routing's token_index_R); an in-place change to the rows, or another
    routing, builds a new one."""
    builds = _count_layout_builds(monkeypatch)
    torch.manual_seed(0)
    layer = MoELayer(64, 16, 16, RoutingConfig(top_k=4), activation="gelu")
    x = torch.randn(256, 64, requires_grad=True)
    for _ in range(2):
        builds.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.y.float().sum().backward()
        assert len(builds) == 1
    half = torch.zeros(1, dtype=torch.bfloat16)
    counts_E, token_index_R = torch.tensor(BALANCED), torch.arange(sum(BALANCED)) % 100
    first = padded_blocks.layout(half, counts_E, token_index_R, 100, hidden=8)
    assert padded_blocks.layout(half, counts_E, token_index_R, 100, hidden=8) is first
    assert padded_blocks.layout(half, counts_E, token_index_R.clone(), 100, hidden=8) is not first
    token_index_R[:2] = token_index_R[:2].flip(0)
    changed = padded_blocks.layout(half, counts_E, token_index_R, 100, hidden=8)
    assert changed is not first and changed.token_P[0] == 1


def test_padded_layout_under_inference_mode_matches_no_grad(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under `torch.inference_mode` (no version counter to check a cached layout by) the
    layout is built by each op, and the bf16 layer gives what it gives under `no_grad`
    (where the forward's two ops share one)."""
    builds = _count_layout_builds(monkeypatch)
    torch.manual_seed(0)
    layer = MoELayer(64, 16, 16, RoutingConfig(top_k=4), activation="gelu").eval()
    x = torch.randn(256, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            want = layer(x).y
        assert len(builds) == 1
        with torch.inference_mode():
            got = layer(x).y
        assert len(builds) == 3
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _fewest_places_by_loops(counts: list[int]) -> int:
    """The fewest padded places over one tier and every two-tier split at a multiple of
    16 rows, each tier's height exact up to 64 rows and a multiple of 16 above."""

    def height(rows: int) -> int:
        return rows if rows <= 64 else (rows + 15) // 16 * 16

    fewest = len(counts) * height(max(counts))
    for first in range(16, height(max(counts)), 16):
        beyond = [count - first for count in counts if count > first]
        if beyond:
            fewest = min(fewest, len(counts) * first + len(beyond) * height(max(beyond)))
    return fewest


def test_padded_heights_find_the_fewest_places() -> None:
    """Random routings, balanced to skewed: the chosen heights give the fewest places of
    any split (the second tier taken only when it saves 1/16 of one tier's places)."""
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(200):
        experts = int(torch.randint(4, 257, (1,), generator=generator))
        tokens = int(torch.randint(64, 8192, (1,), generator=generator))
        top_k = int(torch.randint(1, min(8, experts) + 1, (1,), generator=generator))
        skew = 3 * float(torch.rand(1, generator=generator))
        logits = torch.randn(tokens, experts, generator=generator)
        logits += skew * torch.randn(experts, generator=generator)
        counts = torch.bincount(logits.topk(top_k).indices.flatten(), minlength=experts).tolist()
        if max(counts) <= 64:
            continue
        places, fewest = padded_blocks.padded_places(counts), _fewest_places_by_loops(counts)
        one_tier = experts * padded_blocks.padded_heights([max(counts)])[0]
        assert places == fewest or (
            places == one_tier and fewest > (1 - padded_blocks.OVERFLOW_MIN_SAVING) * one_tier
        ), (counts, places, fewest)
        checked += 1
    assert checked > 100
