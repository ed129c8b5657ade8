"""The `moe::` ops under `torch.autocast("cpu", torch.bfloat16)` (`moe.ops.autocast`):
the matmuls return bf16 computed with fp32 accumulation, the row movers keep their
inputs' dtype, and every gradient matches a plain fp32 per-expert (per-slot) loop.

The reference multiplies the bf16-rounded operands in fp32, so what may differ is one
rounding of each result to bf16 (relative 2^-9) plus fp32 summation order: the
tolerance is `BF16_TOLERANCE`. A bf16-accumulated matmul would be ~sqrt(K) roundings
off (`test_accumulation_is_fp32` shows the two apart at K = 2048).

Shapes: R routed rows, D input width, H output width, E experts, T tokens, K slots.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from moe import ops
from moe.inference.quant import Int8Experts, dequantize, quantize_weight
from moe.ops.int8 import CpuInt8Method, int8_grouped_mm

BF16 = torch.bfloat16
# One bf16 rounding of the result (2^-9 relative, times 2 for the input's rounding of
# a backward operand) plus summation-order noise for results near zero.
BF16_TOLERANCE = {"rtol": 2**-7, "atol": 1e-4}


def _rounded(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, in fp32: what the autocast rule hands the kernel."""
    return t.detach().to(BF16).float()


def _loop_grouped_mm(
    x_RD: torch.Tensor, w_EDH: torch.Tensor, counts: list[int], filled: list[int] | None = None
) -> torch.Tensor:
    """fp32 per-expert loop; rows past filled[e] in block e are zero."""
    y_RH = x_RD.new_zeros(x_RD.shape[0], w_EDH.shape[2])
    start = 0
    for expert, count in enumerate(counts):
        used = count if filled is None else filled[expert]
        y_RH[start : start + used] = x_RD[start : start + used] @ w_EDH[expert]
        start += count
    return y_RH


CASES = {
    "uneven": ([3, 0, 5, 9], None),  # one torch.mm per block
    "uniform": ([4, 4, 4, 4], None),  # one bmm
    "padded": ([5, 5, 5, 5], [5, 2, 0, 4]),  # filled rows only
    "pool": ([7] * 20, None),  # >= POOL_MIN_BLOCKS blocks: the worker threads
    "bucketed": ([70, 0, 131, 257], [70, 0, 100, 257]),  # zero-padded half-precision blocks
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_mm_under_autocast_matches_the_fp32_loop(case: str) -> None:
    counts, filled = CASES[case]
    if case == "pool":
        assert len(counts) >= ops.POOL_MIN_BLOCKS
    torch.manual_seed(0)
    experts, rows, d_in, d_out = len(counts), sum(counts), 48, 40
    x = torch.randn(rows, d_in, requires_grad=True)
    w = torch.randn(experts, d_in, d_out, requires_grad=True)
    counts_E = torch.tensor(counts)
    filled_E = None if filled is None else torch.tensor(filled)
    with torch.autocast("cpu", dtype=BF16):
        y = ops.grouped_mm(x, w, counts_E, filled_E)
    assert y.dtype == BF16
    expected = _loop_grouped_mm(_rounded(x), _rounded(w), counts, filled)
    torch.testing.assert_close(y.float(), expected, **BF16_TOLERANCE)

    dy = torch.randn(rows, d_out).to(BF16)
    y.backward(dy)
    x_ref = _rounded(x).requires_grad_()
    w_ref = _rounded(w).requires_grad_()
    _loop_grouped_mm(x_ref, w_ref, counts, filled).backward(dy.float())
    assert x.grad is not None and w.grad is not None and x_ref.grad is not None
    # The leaves are fp32 (master weights): their gradients come back in fp32.
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, **BF16_TOLERANCE)
    torch.testing.assert_close(w.grad, w_ref.grad, **BF16_TOLERANCE)


def test_half_precision_blocks_come_in_few_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN builds a kernel per bf16 matmul shape (~0.7 ms each), so blocks of more
    than `moe.ops.row_buckets.HALF_EXACT_ROWS` rows are multiplied zero-padded to 8 sizes per power of two:
    200 random row counts in [65, 2048] give at most 8 * 5 shapes, each at most 1/8
    larger than its block; fp32 blocks keep their exact row counts."""
    from moe.ops import cpu

    shapes: dict[torch.dtype, list[tuple[int, int]]] = {torch.float32: [], BF16: []}
    mm = torch.mm

    def spy(a: torch.Tensor, b: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        shapes[a.dtype].append((a.shape[0], a.shape[1]))
        return mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    generator = torch.Generator().manual_seed(5)
    w = torch.randn(2, 8, 8)
    for _ in range(100):
        counts = torch.randint(65, 2049, (2,), generator=generator)
        x = torch.randn(int(counts.sum()), 8)
        for dtype in (torch.float32, BF16):
            cpu.grouped_mm_wgrad_torch(x.to(dtype), x.to(dtype), counts)
            cpu.grouped_mm_torch(x.to(dtype), w.to(dtype), counts)
    forward = {m for m, k in shapes[BF16] if k == 8}
    assert len(forward) <= 8 * 5, sorted(forward)
    assert all(m % (1 << (m.bit_length() - 4)) == 0 for m in forward)
    exact = {m for m, k in shapes[torch.float32] if k == 8}
    assert len(exact) > 100  # fp32: every block its own row count
    wgrad = {k for m, k in shapes[BF16] if m == 8}  # x^T: the rows are the inner size
    assert wgrad <= forward


def test_accumulation_is_fp32() -> None:
    """K = 2048 products of unit scale per output: accumulated in fp32 and rounded once,
    the result is within 2^-8 of the fp32 sum; accumulated in bf16 it would be about
    sqrt(K) * 2^-9 off (an emulation of that is shown to miss)."""
    torch.manual_seed(1)
    counts, d_in, d_out = [6, 10], 2048, 8
    x = torch.randn(sum(counts), d_in)
    w = torch.randn(len(counts), d_in, d_out)
    with torch.autocast("cpu", dtype=BF16):
        y = ops.grouped_mm(x, w, torch.tensor(counts))
    assert y.dtype == BF16
    expected = _loop_grouped_mm(_rounded(x), _rounded(w), counts)
    scale = expected.abs().mean()
    assert (y.float() - expected).abs().max() / scale < 2**-6
    # A bf16 accumulator, emulated: products rounded, summed with a bf16 running total.
    products = _rounded(x[:6])[:, :, None] * _rounded(w[0])[None]
    running = torch.zeros(6, d_out, dtype=BF16)
    for k in range(d_in):
        running = (running.float() + products[:, k]).to(BF16)
    assert (running.float() - expected[:6]).abs().max() / scale > 2**-5


def test_row_movers_keep_their_dtype_under_autocast() -> None:
    """gather_rows and combine move rows: fp32 stays fp32 and bf16 stays bf16 under
    autocast (nothing inside them is cast), and their gradients match the loops."""
    torch.manual_seed(2)
    num_tokens, top_k, width = 9, 2, 16
    for dtype in (torch.float32, BF16):
        x_TD = torch.randn(num_tokens, width).to(dtype).requires_grad_()
        index_R = torch.randint(0, num_tokens, (num_tokens * top_k,))
        row_of_slot_TK = torch.randperm(num_tokens * top_k).view(num_tokens, top_k)
        row_of_slot_TK[0, 1] = -1  # a dropped slot
        weights_TK = torch.rand(num_tokens, top_k, requires_grad=True)
        with torch.autocast("cpu", dtype=BF16):
            x_RD = ops.gather_rows(x_TD, index_R)
            y_TD = ops.combine(x_RD, row_of_slot_TK, weights_TK)
        assert x_RD.dtype == dtype and y_TD.dtype == dtype
        dy = torch.randn(num_tokens, width).to(dtype)
        y_TD.backward(dy)
        # Reference: the same composition in float64 loops.
        x_ref = x_TD.detach().double().requires_grad_()
        w_ref = weights_TK.detach().double().requires_grad_()
        rows = x_ref[index_R]
        y_ref = torch.zeros(num_tokens, width, dtype=torch.float64)
        for t, k in itertools.product(range(num_tokens), range(top_k)):
            row = int(row_of_slot_TK[t, k])
            if row >= 0:
                y_ref[t] = y_ref[t] + w_ref[t, k] * rows[row]
        y_ref.backward(dy.double())
        tolerance = BF16_TOLERANCE if dtype == BF16 else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(y_TD.double(), y_ref.detach(), **tolerance)
        assert x_TD.grad is not None and weights_TK.grad is not None
        assert x_TD.grad.dtype == dtype and weights_TK.grad.dtype == torch.float32
        # A bf16 gradient is rounded at each of its few steps (weight times dy, then the
        # scatter-add over the token's slots): a few bf16 roundings of O(1) values.
        tolerance = {"rtol": 2**-6, "atol": 2**-6} if dtype == BF16 else tolerance
        torch.testing.assert_close(x_TD.grad.double(), x_ref.grad, **tolerance)
        torch.testing.assert_close(weights_TK.grad.double(), w_ref.grad, **tolerance)


@pytest.mark.parametrize("method", [m.value for m in CpuInt8Method])
@pytest.mark.parametrize("d_in", [32, 24], ids=["aligned", "unaligned"])
def test_int8_op_under_autocast_takes_bf16_activations(method: str, d_in: int) -> None:
    """The int8 op casts only the activations: bf16 in, bf16 out, fp32 scales; at an
    input width the int8 kernel is not trusted with (24) it still dequantizes."""
    torch.manual_seed(3)
    counts, d_out = [3, 0, 6], 64
    w_EKN = torch.randn(len(counts), d_in, d_out) / d_in**0.5
    q_ENK, scale_EN = quantize_weight(w_EKN)
    x_RK = torch.randn(sum(counts), d_in)
    with torch.autocast("cpu", dtype=BF16):
        y_RN = int8_grouped_mm(x_RK, q_ENK, scale_EN, torch.tensor(counts), method)
    assert y_RN.dtype == BF16
    expected = _loop_grouped_mm(_rounded(x_RK), dequantize(q_ENK, scale_EN), counts)
    relative = (y_RN.float() - expected).norm() / expected.norm()
    assert relative < 2e-2, relative


def test_int8_experts_keep_fp32_scales_under_bf16_weights() -> None:
    """`load_model(precision="bf16")` casts parameters only: the int8 experts' scales are
    buffers and stay fp32, and the experts then take and return bf16 activations."""
    from moe.experts import GroupedExperts
    from moe.inference.loading import cast_parameters

    grouped = GroupedExperts(3, 32, 48, "swiglu").requires_grad_(False)
    module = Int8Experts.from_float(grouped)
    holder = torch.nn.ModuleDict({"experts": module, "norm": torch.nn.RMSNorm(32)})
    cast_parameters(holder, BF16)
    assert holder["norm"].weight.dtype == BF16
    assert {name: t.dtype for name, t in module.state_dict().items() if "scale" in name} == {
        "w1_scale_EH": torch.float32, "w2_scale_ED": torch.float32, "w3_scale_EH": torch.float32,
    }  # fmt: skip
    counts = torch.tensor([4, 1, 5])
    x_RD = torch.randn(10, 32)
    y_RD = module(x_RD.to(BF16), counts)
    assert y_RD.dtype == BF16
    expected = grouped(_rounded(x_RD), counts)
    assert (y_RD.float() - expected).norm() / expected.norm() < 3e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_mm_under_cuda_autocast(dtype: torch.dtype) -> None:
    """The same rule on CUDA: the Triton kernels get the autocast dtype (bf16 or fp16,
    read when called) and their gradients match the fp32 loop."""
    torch.manual_seed(4)
    counts = [30, 0, 50, 17]
    x = torch.randn(sum(counts), 64, device="cuda", requires_grad=True)
    w = torch.randn(len(counts), 64, 96, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        y = ops.grouped_mm(x, w, torch.tensor(counts, device="cuda"))
    assert y.dtype == dtype
    x_ref = x.detach().to(dtype).float().requires_grad_()
    w_ref = w.detach().to(dtype).float().requires_grad_()
    expected = _loop_grouped_mm(x_ref, w_ref, counts)
    torch.testing.assert_close(y.float(), expected.detach(), **BF16_TOLERANCE)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.float())
    assert x.grad is not None and w.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad, **BF16_TOLERANCE)
    torch.testing.assert_close(w.grad, w_ref.grad, **BF16_TOLERANCE)
