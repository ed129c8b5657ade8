"""The Triton kernels of `moe.ops.kernels` against plain torch references.

On CPU the kernels run under the Triton interpreter. `TRITON_INTERPRET=1` must be set
before Triton is imported, so each check runs in a fresh subprocess (this file run as a
script) and the pytest process itself never imports Triton in interpreter mode. The
`gpu` tests run the same checks, on CUDA tensors, in process.

Shape legend: T tokens, D input width, H output width, E experts, R routed rows,
K slots per token.
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from folded_checks import CHECKS as FOLDED_CHECKS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REPO_ROOT = Path(__file__).resolve().parents[1]


def _subprocess_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with this checkout first on the module path: where the package is installed
    editable from another checkout (a git worktree beside it), a script's subprocess
    would otherwise import that one."""
    paths = [str(REPO_ROOT), env.get("PYTHONPATH", "")]
    return {**env, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}


def _gemm_dtypes(device: str) -> tuple[torch.dtype, ...]:
    """The Triton interpreter multiplies the raw bits of bf16 `tl.dot` operands
    (triton-lang/triton#11584, "not supported yet"), so bf16 GEMMs are checked on CUDA only.
    """
    return DTYPES if device != "cpu" else (torch.float32, torch.float16)


def _tolerance(dtype: torch.dtype, scale: float) -> dict[str, Any]:
    """assert_close tolerances for a result of magnitude ~scale rounded to dtype."""
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 1e-4 * scale}
    return {"rtol": 2e-2, "atol": 2e-2 * scale}


def _row_ranges(counts_E: list[int]) -> list[tuple[int, int]]:
    ends = torch.tensor(counts_E).cumsum(0).tolist()
    return [(end - count, end) for count, end in zip(counts_E, ends)]


def reference_grouped_mm(
    x_RD: torch.Tensor, w_EDH: torch.Tensor, counts_E: list[int]
) -> torch.Tensor:
    """fp32 per-expert loop."""
    blocks = [
        x_RD[s:e].float() @ w_EDH[i].float() for i, (s, e) in enumerate(_row_ranges(counts_E))
    ]
    return torch.cat(blocks)


def reference_wgrad(x_RD: torch.Tensor, dy_RH: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
    """fp32 per-expert loop; an expert with no rows gets an explicit zero block."""
    return torch.stack([x_RD[s:e].float().T @ dy_RH[s:e].float() for s, e in _row_ranges(counts_E)])


def reference_combine(
    y_RD: torch.Tensor, row_of_slot_TK: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    """Per-token, per-slot loop in float64."""
    num_tokens, top_k = row_of_slot_TK.shape
    y_TD = torch.zeros(num_tokens, y_RD.shape[1], dtype=torch.float64)
    for t in range(num_tokens):
        for k in range(top_k):
            row = int(row_of_slot_TK[t, k])
            if row >= 0:
                y_TD[t] += float(weights_TK[t, k]) * y_RD[row].double()
    return y_TD


COUNT_CASES = ([5, 0, 37, 20], [0, 17, 0], [33])


def check_grouped_mm(device: str) -> None:
    from moe.ops.kernels import GemmBlocks, grouped_mm

    small = GemmBlocks(16, 16, 16)
    for case, counts_E in enumerate(COUNT_CASES):
        num_experts, num_rows = len(counts_E), sum(counts_E)
        for dtype in _gemm_dtypes(device):
            d_in, d_out = random.choice([(24, 40), (32, 16), (16, 33)])
            # A column slice of a wider tensor: x with a row stride != D.
            x_RD = torch.randn(num_rows, d_in + 5, device=device).to(dtype)[:, :d_in]
            w_EHD = torch.randn(num_experts, d_out, d_in, device=device).to(dtype)
            w_EDH = torch.randn(num_experts, d_in, d_out, device=device).to(dtype)
            offsets_dtype = torch.int32 if case % 2 else torch.int64
            offsets_E = torch.tensor(counts_E, device=device).cumsum(0).to(offsets_dtype)
            tolerance = _tolerance(dtype, d_in**0.5)
            for weights in (w_EDH, w_EHD.transpose(1, 2)):
                expected = reference_grouped_mm(x_RD.cpu(), weights.cpu(), counts_E)
                for blocks in (small, None):
                    y_RH = grouped_mm(x_RD, weights, offsets_E, blocks)
                    assert y_RH.dtype == dtype and y_RH.shape == (num_rows, d_out)
                    torch.testing.assert_close(y_RH.cpu().float(), expected, **tolerance)


def check_grouped_mm_wgrad(device: str) -> None:
    from moe.ops.kernels import GemmBlocks, grouped_mm_wgrad

    small = GemmBlocks(16, 16, 16)
    for case, counts_E in enumerate(COUNT_CASES):
        num_experts, num_rows = len(counts_E), sum(counts_E)
        for dtype in _gemm_dtypes(device):
            d_in, d_out = random.choice([(24, 40), (32, 16), (16, 33)])
            x_RD = torch.randn(num_rows, d_in, device=device).to(dtype)
            dy_RH = torch.randn(num_rows, d_out + 3, device=device).to(dtype)[:, :d_out]
            offsets_dtype = torch.int32 if case % 2 else torch.int64
            offsets_E = torch.tensor(counts_E, device=device).cumsum(0).to(offsets_dtype)
            expected = reference_wgrad(x_RD.cpu(), dy_RH.cpu(), counts_E)
            tolerance = _tolerance(dtype, max(counts_E) ** 0.5)
            for blocks, out_dtype in ((small, None), (None, torch.float32)):
                dw_EDH = grouped_mm_wgrad(x_RD, dy_RH, offsets_E, num_experts, out_dtype, blocks)
                assert dw_EDH.dtype == (out_dtype or dtype)
                assert dw_EDH.shape == (num_experts, d_in, d_out)
                torch.testing.assert_close(dw_EDH.cpu().float(), expected, **tolerance)


def _random_slots(num_tokens: int, top_k: int, extra_rows: int) -> tuple[torch.Tensor, int]:
    """row_of_slot_TK of a random permutation: about 1/4 of the slots dropped (-1).

    Kept slots get distinct rows in a random order; `extra_rows` rows are named by no slot.
    """
    keep_TK = torch.rand(num_tokens, top_k) > 0.25
    keep_TK[0] = False  # a token with every slot dropped
    num_kept = int(keep_TK.sum())
    num_rows = num_kept + extra_rows
    row_of_slot_TK = torch.full((num_tokens, top_k), -1, dtype=torch.int64)
    row_of_slot_TK[keep_TK] = torch.randperm(num_rows)[:num_kept]
    return row_of_slot_TK, num_rows


def check_gather(device: str) -> None:
    from moe.ops.kernels import combine, gather_rows, gather_rows_backward

    for num_tokens, width, top_k in ((23, 24, 2), (9, 1100, 3)):
        row_of_slot_TK, num_rows = _random_slots(num_tokens, top_k, extra_rows=0)
        token_of_row_R = torch.empty(num_rows, dtype=torch.int64)
        kept_TK = row_of_slot_TK >= 0
        token_of_row_R[row_of_slot_TK[kept_TK]] = torch.nonzero(kept_TK)[:, 0]
        for dtype, index_dtype in ((torch.float32, torch.int64), (torch.bfloat16, torch.int32)):
            x_TD = torch.randn(width + 2, num_tokens, device=device).to(dtype).T[:, :width]
            index_R = token_of_row_R.to(device=device, dtype=index_dtype)
            x_RD = gather_rows(x_TD, index_R)
            assert torch.equal(x_RD.cpu(), x_TD.cpu()[token_of_row_R])

            dx_RD = torch.randn(num_rows, width, device=device).to(dtype)
            expected = torch.zeros(num_tokens, width, dtype=torch.float64)
            for row, token in enumerate(token_of_row_R.tolist()):
                expected[token] += dx_RD[row].cpu().double()
            tolerance = _tolerance(dtype, 1.0)
            by_scatter = gather_rows_backward(dx_RD, token_of_row_R.to(device), num_tokens)
            torch.testing.assert_close(by_scatter.cpu().double(), expected, **tolerance)
            by_gather = combine(dx_RD, row_of_slot_TK.to(device=device, dtype=index_dtype), None)
            assert by_gather.dtype == dtype
            torch.testing.assert_close(by_gather.cpu().double(), expected, **tolerance)


def check_combine(device: str) -> None:
    from moe.ops.kernels import combine, combine_backward

    for num_tokens, width, top_k in ((23, 24, 2), (9, 1100, 3), (40, 16, 1)):
        row_of_slot_TK, num_rows = _random_slots(num_tokens, top_k, extra_rows=3)
        for y_dtype, w_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
            y_RD = torch.randn(num_rows, width).to(y_dtype)
            weights_TK = torch.rand(num_tokens, top_k, dtype=w_dtype)
            weights_TK[row_of_slot_TK < 0] = float("nan")  # dropped slots must never be read
            rows = row_of_slot_TK.to(device)
            y_TD = combine(y_RD.to(device), rows, weights_TK.to(device))
            assert y_TD.dtype == y_dtype
            expected = reference_combine(y_RD, row_of_slot_TK, weights_TK)
            torch.testing.assert_close(y_TD.cpu().double(), expected, **_tolerance(y_dtype, 1.0))

            # Backward: autograd through a differentiable torch form of the reference.
            dy_TD = torch.randn(num_tokens, width).to(y_TD.dtype)
            y_leaf = y_RD.double().requires_grad_()
            w_leaf = torch.nan_to_num(weights_TK.double()).requires_grad_()
            kept_TK = row_of_slot_TK >= 0
            gathered_TKD = y_leaf[row_of_slot_TK.clamp(min=0)] * kept_TK[..., None]
            (w_leaf[..., None] * gathered_TKD).sum(1).mul(dy_TD.double()).sum().backward()
            dy_RD, dweights_TK = combine_backward(
                dy_TD.to(device), y_RD.to(device), rows, weights_TK.to(device)
            )
            assert dy_RD.dtype == y_dtype and dweights_TK.dtype == w_dtype
            assert y_leaf.grad is not None and w_leaf.grad is not None
            tolerance = _tolerance(y_dtype, width**0.5)
            torch.testing.assert_close(dy_RD.cpu().double(), y_leaf.grad, **_tolerance(y_dtype, 1))
            torch.testing.assert_close(dweights_TK.cpu().double(), w_leaf.grad, **tolerance)


def check_half_precision_adapters(device: str) -> None:
    """What the ops' autocast rule hands the CUDA kernels (`moe.ops.cuda`): half-precision
    operands (fp16 under the interpreter, whose bf16 `tl.dot` is wrong; bf16 on CUDA).
    The result keeps that dtype and is accumulated in fp32: at K = 1024 its largest error
    is about one rounding of the largest output (relative 2^-11 in fp16), where an fp16
    accumulator would be off by about sqrt(K) roundings of the running sum."""
    from moe.ops import cuda

    counts = [5, 0, 11]
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    rounding = 2**-11 if dtype == torch.float16 else 2**-8  # half a unit in the last place

    def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.cpu().float() - want).abs().max() / want.abs().max())

    x_RD = torch.randn(sum(counts), 1024, device=device).to(dtype)
    w_EDH = torch.randn(len(counts), 1024, 24, device=device).to(dtype)
    counts_E = torch.tensor(counts, device=device)
    y_RH = cuda.grouped_mm(x_RD, w_EDH, counts_E)
    assert y_RH.dtype == dtype
    error = relative_error(y_RH, reference_grouped_mm(x_RD.cpu(), w_EDH.cpu(), counts))
    assert error < 2 * rounding, error
    dy_RH = torch.randn(sum(counts), 24, device=device).to(dtype)
    dw_EDH = cuda.grouped_mm_wgrad(x_RD, dy_RH, counts_E)
    assert dw_EDH.dtype == dtype
    error = relative_error(dw_EDH, reference_wgrad(x_RD.cpu(), dy_RH.cpu(), counts))
    assert error < 2 * rounding, error


CHECKS: dict[str, Callable[[str], None]] = {
    "half_precision_adapters": check_half_precision_adapters,
    "grouped_mm": check_grouped_mm,
    "grouped_mm_wgrad": check_grouped_mm_wgrad,
    "gather": check_gather,
    "combine": check_combine,
    **FOLDED_CHECKS,  # the folded kernels and their adapters (tests/folded_checks.py)
}


def compile_for_gpu(arch: int) -> None:
    """Compile every kernel to a cubin for sm_{arch}, with no GPU present.

    The interpreter accepts code the compiler rejects; this catches that. Specialised as a
    launch on contiguous tensors is: unit strides constant, pointers and other strides
    16-divisible (which enables vector loads, cp.async pipelining and wgmma).
    """
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moe.ops.kernels import folded, gather, grouped_gemm, tiles

    def build(
        kernel: Any,
        pointer_types: list[str],
        constants: dict[str, Any],
        unit_strides: tuple[str, ...],
        num_warps: int = 4,
    ) -> None:
        params = list(inspect.signature(kernel.fn).parameters)
        constants = {**constants, **dict.fromkeys(unit_strides, 1)}
        pointers = iter(pointer_types)
        signature = {
            p: "constexpr" if p in constants else next(pointers) if p.endswith("_ptr") else "i32"
            for p in params
        }
        divisible = {
            (i,): [["tt.divisibility", 16]]
            for i, p in enumerate(params)
            if p not in constants and (p.endswith("_ptr") or p.startswith("stride"))
        }
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=divisible)
        options = {"num_warps": num_warps, "num_stages": 3}
        triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)

    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    # fp16 takes the bf16 path and tf32 the fp32 tile shapes; these two cover both.
    for dtype, precision in (("fp32", "ieee"), ("bf16", "tf32")):
        blocks = tiles.default_blocks(torch_dtypes[dtype], rows_per_expert=512)
        gemm = {"BLOCK_K": blocks.block_k, "INPUT_PRECISION": precision}
        pointers = [f"*{dtype}"] * 3 + ["*i64"]
        # x, index, w, y, offsets: the index is read only with GATHER_A.
        mm_pointers = [pointers[0], "*i64", pointers[0], pointers[0], "*i64"]
        for weight_unit_stride in ("stride_wh", "stride_wd"):  # w_EDH and w_EHD.transpose(1, 2)
            build(
                grouped_gemm._grouped_mm_kernel,
                mm_pointers,
                {"BLOCK_M": 128, "BLOCK_N": 128, "EXPERTS_POW2": 8, "GATHER_A": False, **gemm},
                ("stride_xd", weight_unit_stride, "stride_yh"),
                num_warps=8,
            )
        wgrad = {"BLOCK_D": 128, "BLOCK_H": 128, "INPUT_PRECISION": precision}
        # Plain; in bf16 (what training runs; in fp32 they differ only in the operand type
        # of the same `tl.dot`) also x gathered (the gather's dw) and dy gathered with x
        # scaled (the combine's).
        variants = [(False, False)] + ([(True, False), (False, True)] if dtype == "bf16" else [])
        for x_indexed, dy_indexed in variants:
            flags = {"X_INDEXED": x_indexed, "DY_INDEXED": dy_indexed, "X_SCALED": dy_indexed}
            build(
                grouped_gemm._grouped_mm_wgrad_kernel,
                [*pointers, "*i64", "*i64", "*fp32"],
                {**wgrad, "BLOCK_R": blocks.block_k, **flags},
                ("stride_xd", "stride_dyh", "stride_dwh"),
                num_warps=8,
            )
    # The folded kernels, in bf16 likewise.
    blocks = tiles.default_blocks(torch.bfloat16, rows_per_expert=512)
    tile_sizes = {"BLOCK_M": 128, "BLOCK_N": 128, "EXPERTS_POW2": 8}
    tile_sizes.update(BLOCK_K=blocks.block_k, INPUT_PRECISION="tf32")
    data, index = "*bf16", "*i64"
    build(  # the gather folded into the load
        grouped_gemm._grouped_mm_kernel,
        [data, index, data, data, index],
        {**tile_sizes, "GATHER_A": True},
        ("stride_xd", "stride_wh", "stride_yh"),
        num_warps=8,
    )
    for has_weight in (True, False):  # the combine; the gather's dx (w transposed)
        build(
            folded._grouped_mm_scatter_kernel,
            [data, data, index, "*fp32", "*fp32", index],
            {**tile_sizes, "HAS_WEIGHT": has_weight},
            ("stride_xd", "stride_wh" if has_weight else "stride_wd", "stride_oh"),
            num_warps=8,
        )
    build(
        folded._gather_grouped_mm_scale_dot_kernel,
        [data, index, data, "*fp32", data, data, "*fp32", index],
        tile_sizes,
        ("stride_dyd", "stride_wd", "stride_hh", "stride_dhh"),
        num_warps=8,
    )
    rows = {"BLOCK_T": 8, "BLOCK_D": 512}
    build(
        gather._gather_rows_kernel,
        ["*bf16", "*i64", "*bf16"],
        {"BLOCK_R": 8, "BLOCK_D": 512},
        ("stride_xd", "stride_od"),
    )
    for has_weights in (True, False):
        build(
            gather._combine_kernel,
            ["*bf16", "*i64", "*fp32", "*bf16"],
            {"HAS_WEIGHTS": has_weights, **rows},
            ("stride_yd", "stride_rk", "stride_wk", "stride_od"),
        )
    build(
        gather._combine_backward_kernel,
        ["*bf16", "*bf16", "*i64", "*fp32", "*bf16", "*fp32"],
        rows,
        ("stride_dod", "stride_yd", "stride_rk", "stride_wk", "stride_dyd", "stride_dwk"),
    )


def _has_ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(
        os.path.exists(os.path.join(root, "backends", "nvidia", "bin", "ptxas"))
        for root in spec.submodule_search_locations
    )


@pytest.mark.slow
@pytest.mark.skipif(not _has_ptxas(), reason="triton with its bundled ptxas is not installed")
def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    env = _subprocess_env({k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    env.update(OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run(
        [sys.executable, __file__, "compile_for_sm90", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, report
    assert "passed compile_for_sm90" in result.stdout, report


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_kernel_under_triton_interpreter(check: str) -> None:
    seed = random.randrange(2**31)
    env = _subprocess_env({**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_kernel_on_cuda(check: str) -> None:
    torch.manual_seed(random.randrange(2**31))
    CHECKS[check]("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_gemm_at_layer_sizes_on_cuda(dtype: torch.dtype) -> None:
    """Default tiles (the ones training uses) at benchmark sizes, with an empty expert."""
    from moe.ops.kernels import grouped_mm, grouped_mm_wgrad

    num_experts, d_in, d_out = 8, 512, 1024
    counts_E = torch.multinomial(torch.ones(num_experts), 4096, replacement=True).bincount(
        minlength=num_experts
    )
    counts_E[3] = 0
    counts = counts_E.tolist()
    offsets_E = counts_E.cumsum(0).cuda()
    x_RD = torch.randn(sum(counts), d_in, device="cuda", dtype=dtype)
    w_EHD = torch.randn(num_experts, d_out, d_in, device="cuda", dtype=dtype)
    dy_RH = torch.randn(sum(counts), d_out, device="cuda", dtype=dtype)
    y_RH = grouped_mm(x_RD, w_EHD.transpose(1, 2), offsets_E)
    expected = reference_grouped_mm(x_RD, w_EHD.transpose(1, 2), counts)
    torch.testing.assert_close(y_RH.float(), expected, **_tolerance(dtype, d_in**0.5))
    dw_EDH = grouped_mm_wgrad(x_RD, dy_RH, offsets_E, num_experts)
    expected_dw = reference_wgrad(x_RD, dy_RH, counts)
    torch.testing.assert_close(dw_EDH.float(), expected_dw, **_tolerance(dtype, 4096**0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_folded_ops_at_layer_sizes_match_the_composed_form_on_cuda(dtype: torch.dtype) -> None:
    """The four folded ops at a layer's size (T=4096, D=512, E=128, H=64, top-8, default
    tiles, one expert without rows) on the folded Triton kernels (where `moe.ops`
    dispatches CUDA tensors) against their composed form (the unfolded Triton kernels)."""
    from moe.ops import fused

    num_tokens, width, num_experts, hidden, top_k = 4096, 512, 128, 64, 8
    for name in ("gather_grouped_mm", "gather_grouped_mm_backward", "grouped_mm_combine",
                 "grouped_mm_combine_backward"):  # fmt: skip
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moe::{name}", "CUDA"), name
    scores_TE = torch.rand(num_tokens, num_experts, device="cuda")
    scores_TE[:, 5] = -1.0  # expert 5 gets no row
    expert_R, slot_R = scores_TE.topk(top_k, dim=1).indices.flatten().sort(stable=True)
    index_R = slot_R // top_k
    counts_E = torch.bincount(expert_R, minlength=num_experts)
    x_TD = torch.randn(num_tokens, width, device="cuda", dtype=dtype)
    w1_EDH = (torch.randn(num_experts, width, hidden, device="cuda") * width**-0.5).to(dtype)
    w2_EHD = (torch.randn(num_experts, hidden, width, device="cuda") * hidden**-0.5).to(dtype)
    weight_R = torch.rand(index_R.shape[0], device="cuda")
    dy_TD = torch.randn(num_tokens, width, device="cuda", dtype=dtype)

    def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        tolerance = _tolerance(dtype, float(want.abs().max()))
        torch.testing.assert_close(got.float(), want.float(), **tolerance, msg=what)

    h_RH = fused.gather_grouped_mm(x_TD, w1_EDH, index_R, counts_E)
    close(h_RH, fused.composed_gather_grouped_mm(x_TD, w1_EDH, index_R, counts_E), "h")
    args = (h_RH, w2_EHD, index_R, weight_R, counts_E)
    y_TD = fused.grouped_mm_combine(*args, num_tokens)
    close(y_TD, fused.composed_grouped_mm_combine(*args, num_tokens), "y")
    got = fused.grouped_mm_combine_backward(dy_TD, *args, True)
    want = fused.composed_grouped_mm_combine_backward(dy_TD, *args, True)
    for name, one, other in zip(("dh", "dw2", "dweight"), got, want, strict=True):
        close(one, other, name)
    args = (got[0], x_TD, w1_EDH, index_R, counts_E, True, True)
    got = fused.gather_grouped_mm_backward(*args)
    want = fused.composed_gather_grouped_mm_backward(*args)
    for name, one, other in zip(("dx", "dw1"), got, want, strict=True):
        close(one, other, name)
    assert not got[1][5].any(), "an expert without rows gets a zero gradient"


def test_import_does_not_need_triton() -> None:
    code = "import sys, moe.ops.kernels; assert 'triton' not in sys.modules; print('clean')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "clean", result.stderr


if __name__ == "__main__":
    name, seed = sys.argv[1], int(sys.argv[2])
    if name == "compile_for_sm90":
        compile_for_gpu(90)
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run the kernel checks with TRITON_INTERPRET=1 (the pytest tests do)")
    else:
        random.seed(seed)
        torch.manual_seed(seed)
        CHECKS[name]("cpu")
    print(f"passed {name}")
