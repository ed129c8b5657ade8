"""Int8 weight-only experts (`moe.inference.quant`) against references written here.

The reference follows docs/METHODS.md ("Int8 weight-only quantization") in float64 with its
own per-expert loop: per output channel scale = max|w| / 127, q = round(w / scale),
w ~ q * scale. The Triton kernel runs under the Triton interpreter in a fresh subprocess
(this file run as a script), as in tests/test_triton_kernels.py: `TRITON_INTERPRET=1`
must be set before Triton is imported.

Shape legend: R routed rows, D model width, H expert hidden width, E experts, K input
width, N output width, B batch, T sequence length.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moe.checkpoint import load_checkpoint, save_checkpoint
from moe.config import ModelConfig
from moe.experts import Activation, GroupedExperts
from moe.inference.quant import Int8Experts, dequantize, quantize_experts, quantize_weight
from moe.ops.int8 import (
    INT8MM_ALIGNMENT,
    INT8MM_MAX_ROWS,
    INT8MM_MIN_WEIGHT,
    CpuInt8Method,
    choose_cpu_method,
    effective_cpu_method,
    expert_int8_mm,
    int8_grouped_mm_torch,
)
from moe.transformer import MoETransformer
from routing import CapacityKind, RoutingConfig

ACTIVATIONS = [a.value for a in Activation]
METHODS = ("auto", "int8mm", "dequant")
DROPLESS = RoutingConfig(top_k=2, capacity=CapacityKind.DROPLESS)
# Experts 1 and 4 get no rows; expert 3 more than INT8MM_MAX_ROWS.
COUNTS = [5, 0, 1, INT8MM_MAX_ROWS + 7, 0, 3]


# --- the reference ---------------------------------------------------------------------


def reference_quantize(w_KN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_KN, scale_N) per docs/METHODS.md, as float64 tensors. The arithmetic is fp32, as
    stored: in float64 a weight whose w / scale lies within rounding of a half would
    round the other way (one step off) now and then."""
    w = w_KN.float()
    scale_N = w.abs().max(dim=0).values / 127
    q_KN = torch.zeros_like(w)
    for n in range(w.shape[1]):
        if scale_N[n] > 0:
            q_KN[:, n] = torch.round(w[:, n] / scale_N[n]).clamp(-127, 127)
    return q_KN.double(), scale_N.double()


def reference_dequantized(w_KN: torch.Tensor) -> torch.Tensor:
    q_KN, scale_N = reference_quantize(w_KN)
    return q_KN * scale_N


def reference_forward(
    grouped: GroupedExperts, x_RD: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """Each expert quantized from the float weights, then a float64 MLP, expert by expert."""
    y_RD = torch.zeros(x_RD.shape, dtype=torch.float64)
    start = 0
    for expert, count in enumerate(counts):
        x = x_RD[start : start + count].double()
        h = x @ reference_dequantized(grouped.w1_EDH[expert])
        if grouped.activation == Activation.SWIGLU:
            assert grouped.w3_EDH is not None
            h = F.silu(h) * (x @ reference_dequantized(grouped.w3_EDH[expert]))
        elif grouped.activation == Activation.GELU:
            h = F.gelu(h)
        else:
            h = F.relu(h)
        y_RD[start : start + count] = h @ reference_dequantized(grouped.w2_EHD[expert])
        start += count
    return y_RD


def make_grouped(activation: str, expert_ids: list[int] | None = None) -> GroupedExperts:
    num_experts = len(COUNTS)
    grouped = GroupedExperts(num_experts, 24, 40, activation, expert_ids=expert_ids)
    with torch.no_grad():  # uneven channel magnitudes, so that scales differ per channel
        grouped.w1_EDH.mul_(torch.rand(num_experts, 1, 40) * 3)
        grouped.w2_EHD.mul_(torch.rand(num_experts, 1, 24) * 3)
    return grouped.requires_grad_(False)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| over max |expected| (the output scale)."""
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max())


# --- quantize / dequantize ---------------------------------------------------------------


def test_quantize_round_trip_error_is_at_most_half_a_step() -> None:
    w_EKN = torch.randn(3, 48, 20) * torch.rand(3, 1, 20) * 4
    w_EKN[1, :, 7] = 0.0  # an all-zero channel
    q_ENK, scale_EN = quantize_weight(w_EKN)
    assert q_ENK.dtype == torch.int8 and q_ENK.shape == (3, 20, 48)
    assert scale_EN.dtype == torch.float32 and scale_EN.shape == (3, 20)
    assert int(q_ENK.abs().max()) == 127
    for expert in range(3):
        _, expected_scale_N = reference_quantize(w_EKN[expert])
        torch.testing.assert_close(scale_EN[expert].double(), expected_scale_N, rtol=1e-6, atol=0)
    assert float(scale_EN[1, 7]) == 0.0 and not q_ENK[1, 7].any()
    w_back = dequantize(q_ENK, scale_EN)
    assert w_back.shape == w_EKN.shape and w_back.dtype == torch.float32
    error_EKN = (w_back.double() - w_EKN.double()).abs()
    # Half a quantization step, plus fp32 rounding of w / scale and of q * scale.
    bound_EKN = scale_EN.double().unsqueeze(1) / 2 * (1 + 1e-5) + 1e-6 * w_EKN.abs().double()
    assert bool((error_EKN <= bound_EKN).all()), float((error_EKN - bound_EKN).max())
    assert dequantize(q_ENK, scale_EN, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "bad", [torch.randint(-3, 3, (4, 5)), torch.randn(5)], ids=["integer", "1-d"]
)
def test_quantize_rejects_bad_input(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="quantize_weight"):
        quantize_weight(bad)


def test_dequantize_rejects_mismatched_scales() -> None:
    q_NK, scale_N = quantize_weight(torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"scale \(5,\)"):
        dequantize(q_NK, scale_N[:5])


# --- Int8Experts -------------------------------------------------------------------------


def test_buffers_hold_the_quantized_weights_stacked_over_experts() -> None:
    grouped = make_grouped("swiglu")
    module = Int8Experts.from_float(grouped)
    state = module.state_dict()
    assert {k: (tuple(t.shape), t.dtype) for k, t in state.items()} == {
        "w1_q_EHD": ((6, 40, 24), torch.int8),
        "w1_scale_EH": ((6, 40), torch.float32),
        "w2_q_EDH": ((6, 24, 40), torch.int8),
        "w2_scale_ED": ((6, 24), torch.float32),
        "w3_q_EHD": ((6, 40, 24), torch.int8),
        "w3_scale_EH": ((6, 40), torch.float32),
    }
    assert not list(module.parameters())
    q_KN, scale_N = reference_quantize(grouped.w2_EHD[4])
    assert torch.equal(state["w2_scale_ED"][4].double(), scale_N)
    assert torch.equal(state["w2_q_EDH"][4].T.double(), q_KN)
    assert module.expert_state(2)["w1_q_EHD"].shape == (1, 40, 24)
    assert Int8Experts.from_float(make_grouped("gelu")).w3_q_EHD is None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_matches_the_per_expert_reference(activation: str, method: str) -> None:
    grouped = make_grouped(activation, expert_ids=[1, 4, 6, 7, 9, 12])
    module = Int8Experts.from_float(grouped, cpu_method=method)
    assert module.expert_ids == (1, 4, 6, 7, 9, 12) and module.quantization == "int8"
    x_RD = torch.randn(sum(COUNTS), 24)
    counts_E = torch.tensor(COUNTS)
    y_RD = module(x_RD, counts_E)
    assert y_RD.dtype == torch.float32 and y_RD.shape == x_RD.shape
    expected = reference_forward(grouped, x_RD, COUNTS)
    # "int8mm" rounds activations and the unscaled output to bf16 (~2^-9 relative).
    bound = 1e-5 if method == "dequant" else 2e-2
    assert relative_error(y_RD, expected) < bound
    start = 0
    for expert, count in enumerate(COUNTS):
        rows = slice(start, start + count)
        if count:
            single = module.expert_forward(x_RD[rows], expert)
            assert relative_error(single, expected[rows]) < 1e-5
        start += count


def test_auto_takes_int8mm_for_few_rows_of_a_large_weight_only() -> None:
    large_NK = torch.zeros(INT8MM_MIN_WEIGHT // 64, 64, dtype=torch.int8)
    small_NK = torch.zeros(INT8MM_MIN_WEIGHT // 64 - 1, 64, dtype=torch.int8)
    auto, int8mm, dequant = CpuInt8Method.AUTO, CpuInt8Method.INT8MM, CpuInt8Method.DEQUANT
    assert choose_cpu_method(1, large_NK, auto) == int8mm
    assert choose_cpu_method(INT8MM_MAX_ROWS, large_NK, auto) == int8mm
    assert choose_cpu_method(INT8MM_MAX_ROWS + 1, large_NK, auto) == dequant
    assert choose_cpu_method(1, small_NK, auto) == dequant
    assert choose_cpu_method(1, small_NK, int8mm) == int8mm
    assert choose_cpu_method(1, large_NK, dequant) == dequant


@pytest.fixture
def int8mm_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, torch.dtype]]:
    """Every call of torch's `_weight_int8pack_mm` as (K, N, activation dtype); a call
    with a shape outside the trusted rule fails the test instead of reaching the kernel
    (which crashes the process on some hosts)."""
    kernel = torch.ops.aten._weight_int8pack_mm
    calls: list[tuple[int, int, torch.dtype]] = []

    def spy(x_MK: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
        n, k = q_NK.shape
        calls.append((k, n, x_MK.dtype))
        if k % 16 or n % 16:
            raise AssertionError(f"_weight_int8pack_mm reached with K={k}, N={n}")
        return kernel(x_MK, q_NK, scale_N)

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8mm_gets_only_the_shapes_it_handles(
    dtype: torch.dtype, int8mm_calls: list[tuple[int, int, torch.dtype]]
) -> None:
    """Forced or chosen by "auto", `int8mm` runs only at K and N multiples of 16 (torch
    2.13's kernel gives NaN or a segmentation fault with bf16 at K = 8, 24, 40, 72);
    other shapes take the dequantizing path and still match the reference."""
    generator = torch.Generator().manual_seed(3)
    for k, n in itertools.product((8, 16, 24, 40, 48, 72), (8, 16, 24, 32, 48)):
        w_KN = torch.randn(k, n, generator=generator) / k**0.5
        q_NK, scale_N = quantize_weight(w_KN)
        x_MK = torch.randn(5, k, generator=generator).to(dtype)
        expected = x_MK.float() @ dequantize(q_NK, scale_N)
        for method in (CpuInt8Method.INT8MM, CpuInt8Method.AUTO):
            y_MN = expert_int8_mm(x_MK, q_NK, scale_N, method)
            assert y_MN.dtype == dtype
            assert relative_error(y_MN, expected) < 3e-2, (k, n, method)
        aligned = k % INT8MM_ALIGNMENT == 0 and n % INT8MM_ALIGNMENT == 0
        forced = effective_cpu_method(x_MK, q_NK, CpuInt8Method.INT8MM)
        assert forced == (CpuInt8Method.INT8MM if aligned else CpuInt8Method.DEQUANT)
    # The supported shapes did reach the kernel (the guard is not a blanket refusal).
    assert {(k, n) for k, n, _ in int8mm_calls} == {(k, n) for k in (16, 48) for n in (16, 32, 48)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations_keep_their_dtype(dtype: torch.dtype) -> None:
    grouped = make_grouped("gelu")
    x_RD = torch.randn(sum(COUNTS), 24)
    expected = reference_forward(grouped, x_RD, COUNTS)
    for method in METHODS:
        y_RD = Int8Experts.from_float(grouped, cpu_method=method)(
            x_RD.to(dtype), torch.tensor(COUNTS)
        )
        assert y_RD.dtype == dtype
        assert relative_error(y_RD, expected) < 3e-2


def test_no_rows_at_all() -> None:
    module = Int8Experts.from_float(make_grouped("relu"))
    y_RD = module(torch.randn(0, 24), torch.zeros(len(COUNTS), dtype=torch.int64))
    assert y_RD.shape == (0, 24)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_int8_error_against_fp32_experts_is_bounded(activation: str) -> None:
    """At the model's initialisation scale: within 2% of the output scale, and not exact
    (the weights really are rounded)."""
    grouped = GroupedExperts(4, 64, 128, activation).requires_grad_(False)
    counts = [30, 0, 50, 2]
    x_RD = torch.randn(sum(counts), 64)
    y_fp32 = grouped(x_RD, torch.tensor(counts))
    for method in METHODS:
        y_int8 = Int8Experts.from_float(grouped, cpu_method=method)(x_RD, torch.tensor(counts))
        error = relative_error(y_int8, y_fp32)
        assert 1e-4 < error < 2e-2, (method, error)


def test_empty_module_has_the_shape_of_grouped_experts() -> None:
    module = Int8Experts(3, 16, 32, "swiglu", expert_ids=[2, 5, 9])
    reference = Int8Experts.from_float(GroupedExperts(3, 16, 32, "swiglu", expert_ids=[2, 5, 9]))
    assert {k: t.shape for k, t in module.state_dict().items()} == {
        k: t.shape for k, t in reference.state_dict().items()
    }
    module.load_state_dict(reference.state_dict())
    x_RD, counts_E = torch.randn(7, 16), torch.tensor([3, 0, 4])
    assert torch.equal(module(x_RD, counts_E), reference(x_RD, counts_E))


def test_bad_input_names_the_value() -> None:
    with pytest.raises(ValueError, match="got 0, 16, 32"):
        Int8Experts(0, 16, 32)
    with pytest.raises(ValueError, match="'fast'"):
        Int8Experts(2, 16, 32, cpu_method="fast")
    with pytest.raises(ValueError, match="'tanh'"):
        Int8Experts(2, 16, 32, activation="tanh")
    with pytest.raises(ValueError, match=r"expert_ids=\[3, 1\]"):
        Int8Experts(2, 16, 32, expert_ids=[3, 1])
    with pytest.raises(ValueError, match="Int8Experts"):
        Int8Experts.from_float(Int8Experts(2, 16, 32))  # type: ignore[arg-type]
    module = Int8Experts(2, 16, 32)
    with pytest.raises(ValueError, match=r"\(5, 17\)"):
        module(torch.randn(5, 17), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        module(torch.randn(5, 16), torch.tensor([2, 3, 0]))


# --- a whole model -----------------------------------------------------------------------


def tiny_model(activation: str = "gelu", seed: int = 0) -> MoETransformer:
    config = ModelConfig(
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=32,
        ffn_hidden=48,
        expert_hidden=64,
        num_experts=4,
        activation=Activation(activation),
    )
    return MoETransformer(config, DROPLESS, seed=seed).eval()


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_quantize_experts_keeps_each_layer_and_the_logits_close(activation: str) -> None:
    """Per MoE layer, on the fp32 model's input to it (same routing): within 3% of the
    output scale. The logits: most tokens within 5% (relative norm)."""
    model = tiny_model(activation)
    fp32 = copy.deepcopy(model)
    tokens_BT = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        logits_fp32 = fp32(tokens_BT).logits_BTV
    assert quantize_experts(model) == len(model.moe_layers()) > 0
    assert quantize_experts(model) == 0  # nothing float left
    # Per layer: the int8 layer on the fp32 model's input to that layer.
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda _, args, i=i: inputs.__setitem__(i, args[0]))
        for i, layer in fp32.moe_layers()
    ]
    with torch.no_grad():
        fp32(tokens_BT)
        for (i, layer_int8), (_, layer_fp32) in zip(model.moe_layers(), fp32.moe_layers()):
            assert isinstance(layer_int8.experts, Int8Experts)
            error = relative_error(layer_int8(inputs[i]).y, layer_fp32(inputs[i]).y)
            assert 1e-5 < error < 3e-2, (i, error)
        logits_int8 = model(tokens_BT).logits_BTV
    for hook in hooks:
        hook.remove()
    # End to end a token's routing may flip where two router scores nearly tie, so bound
    # most tokens rather than the worst one.
    error_BT = (logits_int8 - logits_fp32).norm(dim=-1) / logits_fp32.norm(dim=-1)
    assert float(error_BT.median()) < 4e-2
    assert float((error_BT < 5e-2).float().mean()) >= 0.75


def test_int8_checkpoint_round_trip(tmp_path: Path) -> None:
    model = tiny_model("swiglu")
    quantize_experts(model)
    step_dir = save_checkpoint(tmp_path / "int8", model, None, step=0, config={})
    # A fresh model of other weights, its experts built empty as int8.
    fresh = tiny_model("swiglu", seed=1)
    for _, layer in fresh.moe_layers():
        experts = layer.experts
        layer.experts = Int8Experts(
            experts.num_experts,
            experts.d_model,
            experts.d_hidden,
            experts.activation,
            experts.expert_ids,
        )
    load_checkpoint(step_dir, fresh)
    tokens_BT = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(tokens_BT).logits_BTV, model(tokens_BT).logits_BTV)
    for key, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key

    with pytest.raises(ValueError, match="quantization='int8'"):
        load_checkpoint(step_dir, tiny_model("swiglu"))
    float_dir = save_checkpoint(tmp_path / "fp32", tiny_model("swiglu"), None, step=0, config={})
    with pytest.raises(ValueError, match="quantization='none'"):
        load_checkpoint(float_dir, fresh)


# --- the Triton kernel ---------------------------------------------------------------------


KERNEL_COUNTS = ([5, 0, 37, 20], [0, 17, 0], [33])


def _interpreter_dtypes(device: str) -> tuple[torch.dtype, ...]:
    """The interpreter multiplies raw bits of bf16 `tl.dot` operands (triton#11584)."""
    all_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    return all_dtypes if device != "cpu" else all_dtypes[:2]


def check_int8_kernel(device: str) -> None:
    """The Triton kernel (and `Int8Experts` through it) against the CPU path."""
    from moe.ops import int8
    from moe.ops.kernels.int8_grouped_gemm import int8_grouped_mm
    from moe.ops.kernels.tiles import GemmBlocks

    small = GemmBlocks(16, 16, 16)
    for case, counts in enumerate(KERNEL_COUNTS):
        num_experts, num_rows = len(counts), sum(counts)
        d_in, d_out = random.choice([(24, 40), (32, 16), (16, 33)])
        q_ENK, scale_EN = quantize_weight(torch.randn(num_experts, d_in, d_out))
        offsets_E = torch.tensor(counts).cumsum(0).to(torch.int32 if case % 2 else torch.int64)
        for dtype in _interpreter_dtypes(device):
            # A column slice of a wider tensor: x with a row stride != K.
            x_RK = torch.randn(num_rows, d_in + 5).to(dtype)[:, :d_in]
            expected = int8_grouped_mm_torch(
                x_RK.float(), q_ENK, scale_EN, torch.tensor(counts), "dequant"
            )
            tolerance: dict[str, Any] = (
                {"rtol": 1e-4, "atol": 1e-4}
                if dtype == torch.float32
                else {"rtol": 2e-2, "atol": 2e-2 * float(expected.abs().max())}
            )
            for blocks in (small, None):
                y_RN = int8_grouped_mm(
                    x_RK.to(device), q_ENK.to(device), scale_EN.to(device),
                    offsets_E.to(device), blocks,
                )  # fmt: skip
                assert y_RN.dtype == dtype and y_RN.shape == (num_rows, d_out)
                torch.testing.assert_close(y_RN.cpu().float(), expected, **tolerance)
    try:
        int8_grouped_mm(torch.randn(4, 8), torch.zeros(2, 6, 8), torch.ones(2, 6), offsets_E[:2])
    except ValueError as error:
        assert "torch.int8" in str(error)
    else:
        raise AssertionError("a float q_ENK was accepted")

    if device == "cpu":  # send the op's CPU calls to the Triton adapter, in this process only
        int8.int8_grouped_mm.register_kernel("cpu")(int8.int8_grouped_mm_triton)
    for activation in ACTIVATIONS:
        grouped = make_grouped(activation)
        x_RD = torch.randn(sum(COUNTS), 24)
        expected = reference_forward(grouped, x_RD, COUNTS)
        module = Int8Experts.from_float(grouped).to(device)
        y_RD = module(x_RD.to(device), torch.tensor(COUNTS, device=device))
        assert relative_error(y_RD.cpu(), expected) < 1e-4, activation


def compile_int8_kernel_for_gpu(arch: int) -> None:
    """Compile the kernel to a cubin for sm_{arch} with no GPU present: the interpreter
    accepts code the compiler rejects. Specialised as a launch on contiguous tensors is."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moe.ops.kernels import int8_grouped_gemm

    kernel = int8_grouped_gemm._int8_grouped_mm_kernel
    params = list(inspect.signature(kernel.fn).parameters)
    for dtype, precision in (("fp32", "ieee"), ("bf16", "tf32")):
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        for rows_per_expert in (1, 512):
            blocks = int8_grouped_gemm.default_int8_blocks(torch_dtype, rows_per_expert)
            constants: dict[str, Any] = {
                "BLOCK_M": blocks.block_m,
                "BLOCK_N": blocks.block_n,
                "BLOCK_K": blocks.block_k,
                "EXPERTS_POW2": 8,
                "INPUT_PRECISION": precision,
                **dict.fromkeys(("stride_xk", "stride_qk", "stride_sn", "stride_yn"), 1),
            }
            pointers = iter([f"*{dtype}", "*i8", "*fp32", f"*{dtype}", "*i64"])
            signature = {
                p: "constexpr"
                if p in constants
                else next(pointers)
                if p.endswith("_ptr")
                else "i32"
                for p in params
            }
            divisible = {
                (i,): [["tt.divisibility", 16]]
                for i, p in enumerate(params)
                if p not in constants and (p.endswith("_ptr") or p.startswith("stride"))
            }
            source = ASTSource(
                fn=kernel, signature=signature, constexprs=constants, attrs=divisible
            )
            options = {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}
            triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _has_ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(
        os.path.exists(os.path.join(root, "backends", "nvidia", "bin", "ptxas"))
        for root in spec.submodule_search_locations
    )


def _run_as_script(check: str, env: dict[str, str], seed: int = 0) -> None:
    result = subprocess.run(
        [sys.executable, __file__, check, str(seed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = f"seed {seed}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, report
    assert f"passed {check}" in result.stdout, report


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_int8_kernel_under_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    _run_as_script("int8_kernel", env, seed=random.randrange(2**31))


@pytest.mark.slow
@pytest.mark.skipif(not _has_ptxas(), reason="triton with its bundled ptxas is not installed")
def test_int8_kernel_compiles_for_sm90(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path))
    _run_as_script("compile_for_sm90", env)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_kernel_on_cuda() -> None:
    torch.manual_seed(random.randrange(2**31))
    check_int8_kernel("cuda")


if __name__ == "__main__":
    name, seed = sys.argv[1], int(sys.argv[2])
    random.seed(seed)
    torch.manual_seed(seed)
    if name == "compile_for_sm90":
        compile_int8_kernel_for_gpu(90)
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run the kernel check with TRITON_INTERPRET=1 (the pytest test does)")
    else:
        check_int8_kernel("cpu")
    print(f"passed {name}")
