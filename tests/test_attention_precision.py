"""Attention under bf16 autocast on CPU (`moe.attention.fp32_attention`): training on a
CPU without AMX computes the attention itself in fp32 (torch's bf16 flash-attention
backward is several times slower there), inference and AMX hosts keep bf16; either way
the outputs and gradients track an fp32 reference at bf16 tolerance.

Shapes: B batch, T positions, D width.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe import attention
from moe.attention import CausalSelfAttention


def _attention_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The query dtypes SDPA receives from now on."""
    seen: list[torch.dtype] = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, **options):  # type: ignore[no-untyped-def]
        seen.append(q.dtype)
        return original(q, k, v, **options)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    return seen


def _run(layer: CausalSelfAttention, x_BTD: torch.Tensor, autocast: bool):  # type: ignore[no-untyped-def]
    leaf = x_BTD.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(leaf)
    y.float().square().sum().backward()
    grads = [leaf.grad] + [p.grad for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return y.float(), grads


@pytest.mark.parametrize("amx", [False, True])
def test_training_attention_precision_by_host(amx: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "CPU_HAS_AMX", amx)
    seen = _attention_dtypes(monkeypatch)
    torch.manual_seed(0)
    layer = CausalSelfAttention(32, 4, 2)
    x = torch.randn(2, 12, 32)
    want_y, want_grads = _run(layer, x, autocast=False)
    seen.clear()
    got_y, got_grads = _run(layer, x, autocast=True)
    assert seen == [torch.bfloat16 if amx else torch.float32]
    scale = float(want_y.abs().max())
    torch.testing.assert_close(got_y, want_y, rtol=2**-6, atol=2**-6 * scale)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2**-5, atol=2**-6 * float(want.abs().max()))


def test_inference_attention_stays_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without gradients (and on bf16 weights) there is no backward to spare: bf16."""
    monkeypatch.setattr(attention, "CPU_HAS_AMX", False)
    seen = _attention_dtypes(monkeypatch)
    torch.manual_seed(0)
    layer = CausalSelfAttention(32, 4, 2)
    x = torch.randn(2, 12, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    bf16_layer = CausalSelfAttention(32, 4, 2).to(torch.bfloat16)
    with torch.no_grad():
        y_bf16 = bf16_layer(x.to(torch.bfloat16))
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert y.dtype == y_bf16.dtype == torch.bfloat16
