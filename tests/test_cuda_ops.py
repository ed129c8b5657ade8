"""The CUDA wiring of the `moe::` ops (moe/ops/cuda.py), run end to end on CPU.

A subprocess sets `TRITON_INTERPRET=1`, registers the CUDA adapters for the CPU
dispatch key, and runs whole MoELayer forwards and backwards through the Triton kernels,
a top-2 layer (the unfolded ops) and a top-8 one (the folded ops of `moe.ops.fused`);
outputs and every gradient must equal the per-token reference. This checks the adapters
(offsets from counts, argument order, dtypes) that the GPU runs, without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import torch
    from moe.ops import cpu as ops, cuda as cuda_ops
    for name in ("grouped_mm", "grouped_mm_wgrad", "gather_rows", "scatter_add_rows",
                 "combine", "combine_backward"):
        getattr(ops, name).register_kernel("cpu")(getattr(cuda_ops, name))
    from moe.layer import MoELayer
    from moe.reference import reference_layer_output
    from routing import RoutingConfig

    # The folded ops too, each call counted: a top-8 layer runs them.
    from moe.ops import fused
    folded_calls = []
    for name in ("gather_grouped_mm", "gather_grouped_mm_backward", "grouped_mm_combine",
                 "grouped_mm_combine_backward"):
        def counted(*args, adapter=getattr(cuda_ops, name)):
            folded_calls.append(adapter.__name__)
            return adapter(*args)
        getattr(fused, name).register_kernel("cpu")(counted)

    def check(layer):
        x = torch.randn(21, 16, requires_grad=True)
        out = layer(x)
        x_ref = x.detach().clone().requires_grad_()
        y_ref = reference_layer_output(layer, x_ref, layer.route(x_ref))
        torch.testing.assert_close(out.y, y_ref, atol=1e-4, rtol=1e-4)
        params = list(layer.parameters())
        dy = torch.randn_like(y_ref)
        got = torch.autograd.grad(out.y, [x, *params], dy, allow_unused=True)
        want = torch.autograd.grad(y_ref, [x_ref, *params], dy, allow_unused=True)
        for g, w in zip(got, want):
            if w is not None:
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)

    torch.manual_seed(int(SEED))
    routing = RoutingConfig(top_k=2, capacity="priority", capacity_factor=0.8)
    check(MoELayer(16, 24, 4, routing, activation="swiglu", residual_mlp=True).eval())
    assert not folded_calls, folded_calls
    routing = RoutingConfig(top_k=8, capacity="dropless")
    check(MoELayer(16, 8, 12, routing, activation="swiglu").eval())
    assert sorted(set(folded_calls)) == ["gather_grouped_mm", "gather_grouped_mm_backward",
                                         "grouped_mm_combine", "grouped_mm_combine_backward"]
    # A padded layout with random (nonzero) padding rows: the adapters zero their
    # outputs and leave them out of the weight gradient, as the plain-torch op does.
    counts, filled = torch.tensor([5, 0, 6, 4]), torch.tensor([2, 0, 6, 1])
    xp, wp, dyp = torch.randn(15, 16), torch.randn(4, 16, 8), torch.randn(15, 8)
    torch.testing.assert_close(cuda_ops.grouped_mm(xp, wp, counts, filled),
                               ops.grouped_mm_torch(xp, wp, counts, filled), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cuda_ops.grouped_mm_wgrad(xp, dyp, counts, filled),
                               ops.grouped_mm_wgrad_torch(xp, dyp, counts, filled),
                               atol=1e-4, rtol=1e-4)
    print("ok")
    """
)


@pytest.mark.slow
def test_layer_through_triton_adapters_under_interpreter() -> None:
    pytest.importorskip("triton", reason="the Triton interpreter needs the triton package")
    seed = int(torch.randint(0, 10_000, ()).item())
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("SEED", str(seed))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"seed {seed}:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.strip().endswith("ok")


def test_folded_ops_have_cuda_kernels() -> None:
    """`moe.ops.cuda` registers the folded ops' Triton adapters for CUDA tensors, which
    the dispatcher prefers to the ops' default implementation (the composed form)."""
    pytest.importorskip("triton", reason="the CUDA kernels are registered with Triton only")
    import moe.ops  # noqa: F401  (registers the kernels)

    for name in (
        "gather_grouped_mm", "gather_grouped_mm_backward",
        "grouped_mm_combine", "grouped_mm_combine_backward",
    ):  # fmt: skip
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moe::{name}", "CUDA"), name
