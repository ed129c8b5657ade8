"""The int8-weight grouped matmul of the int8 experts (`moe.inference.quant`), as one
custom op: `moe::int8_grouped_mm(x_RK, q_ENK, scale_EN, counts_E, method)` computes
y_RN[rows of e] = (x_RK[rows of e] @ q_ENK[e]^T) * scale_EN[e] over rows sorted by expert.

One custom op, `moe::int8_grouped_mm(x_RD, q_ENK, scale_EN, counts_E, method)`, does
y_RN[rows of e] = (x_RD[rows of e] @ q_ENK[e]^T) * scale_EN[e]. On CUDA (with Triton) it is
the Triton grouped GEMM of `moe.ops.kernels.int8_grouped_gemm`, which dequantizes in the
kernel. Elsewhere it loops over the experts that have rows, one of two ways per expert:

- `int8mm`: torch's `_weight_int8pack_mm` (an int8-weight kernel) with bf16/fp16
  activations; fp32 activations are cast to bf16 for it (the op itself is 3x slower at
  one row and 50x at 256 with fp32 activations), its scales set to one and the fp32
  scales applied to its output, so only the activations and that output round to bf16.
- `dequant`: cast this expert's int8 weight to float (no scale multiply), one `torch.mm`,
  then the fp32 scales on the output. A transient float copy of one expert's weight.

Measured (`python scripts/bench_int8.py`, torch 2.13 CPU, 2 threads, fp32 activations,
median of 15 interleaved rounds; a shared 2-core machine, 1-minute load 1 to 3, so
single figures are noisy to ~20%). One projection, microseconds:

    K x N       rows   fp32 dense   int8mm raw fp32   int8mm   dequant
    128 x 128      1         13            37             95        69
    128 x 128     16         28           370            132        96
    128 x 128    256        135          5452            562       297
    256 x 512      1         27           121             58        71
    256 x 512     16        135          2596            218       269
    256 x 512     32        187          5323            414       343
    512 x 2048     1        344           956            227       987
    512 x 2048    16       2079         20865           1273      1949
    512 x 2048    64       3182         84577           3485      3228
    512 x 2048   256       6868        328228          10793      7150
    2048 x 512     1        459           910            230       814
    2048 x 512    16       1375         20724           1325      1656
    2048 x 512   128       2996        162573           5542      3535

A whole stack of E=8 experts (`--only stacks`), each with the same row count,
milliseconds, float `GroupedExperts` against `Int8Experts` ("auto"):

    D x H        rows/expert   float   int8 auto
    128 x 128         1          1.5       1.1
    128 x 128       256          4.9       4.5
    512 x 2048        1         10.7       4.7
    512 x 2048       16         34.8      15.8
    512 x 2048       64         41.9      33.8
    512 x 2048      256        115.7     118.1

So `method="auto"` takes `int8mm` for at most `INT8MM_MAX_ROWS` (16) rows of an expert
whose weight has at least `INT8MM_MIN_WEIGHT` (2^17) elements, where reading the weight
dominates (decode: 2-2.5x faster than fp32), and `dequant` otherwise: for larger row
counts the matmul dominates and dequant runs within ~10% of the fp32 matmul; for small
weights (the demo model's 128 x 128) per-op overheads dominate and dequant has fewer.
Half precision activations follow the same rule (int8mm without the casts).

Batch invariance: under "auto", for weights of at least 2^17 elements, a token's output
depends (at bf16 rounding, ~0.3%) on how many rows its expert got in the same call. Pass
`cpu_method="dequant"` (fp32 throughout) where a request's output must not depend on its
batch neighbours beyond float rounding.

Host-specific kernels are called only within the shapes they are known to handle.
`torch.ops.aten._weight_int8pack_mm` (torch 2.13, CPU) returns garbage or crashes the
process with bf16 activations whose input width K is not a multiple of 16 (seen on an
AMD EPYC with avx512_bf16 and on an Intel Xeon with AMX: K = 8, 24, 40, 72 give NaN or
inf at one row and a segmentation fault at five; every K that is a multiple of 16 agreed
within 1e-2 with the float reference, as did fp16 and fp32 activations at every K
tried). `int8mm_supports` is that rule, with N a multiple of 16 as a precaution no host
has yet shown necessary: outside it `int8mm` is never called, whether chosen by "auto"
or forced (`method="int8mm"`), and the expert falls back to `dequant`.

Shapes: R routed rows, E experts (local), K input width and N output width of one
projection, M rows of one expert.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from routing.config import parse_enum

# "auto" takes `int8mm` for at most this many rows of one expert, and only for weights of
# at least INT8MM_MIN_WEIGHT elements (below, per-op overheads dominate and dequant wins).
INT8MM_MAX_ROWS = 16
INT8MM_MIN_WEIGHT = 2**17
# `_weight_int8pack_mm` is trusted only with K and N multiples of this (module docstring).
INT8MM_ALIGNMENT = 16
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT8MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CpuInt8Method(str, Enum):
    """How the CPU path multiplies one expert's rows (see the module docstring)."""

    AUTO = "auto"
    INT8MM = "int8mm"
    DEQUANT = "dequant"


def parse_cpu_method(value: object) -> CpuInt8Method:
    return parse_enum(CpuInt8Method, value, "cpu_method")


def int8mm_supports(x_MK: Tensor, q_NK: Tensor) -> bool:
    """Whether `torch.ops.aten._weight_int8pack_mm` may be given these operands: a CPU
    float activation of a dtype it takes, and K, N multiples of `INT8MM_ALIGNMENT` (the
    shapes every host tried handled; module docstring)."""
    n, k = q_NK.shape
    return (
        x_MK.device.type == "cpu"
        and x_MK.dtype in INT8MM_DTYPES
        and q_NK.dtype == torch.int8
        and k % INT8MM_ALIGNMENT == 0
        and n % INT8MM_ALIGNMENT == 0
    )


def _int8pack_mm(x_MK: Tensor, q_NK: Tensor, scale_N: Tensor) -> Tensor:
    """The one call site of the host kernel; callers check `int8mm_supports` first."""
    if not int8mm_supports(x_MK, q_NK):
        raise ValueError(
            f"_weight_int8pack_mm refused for x {tuple(x_MK.shape)} {x_MK.dtype} and weight "
            f"{tuple(q_NK.shape)}: it is trusted only with K and N multiples of "
            f"{INT8MM_ALIGNMENT} and float CPU activations"
        )
    return torch.ops.aten._weight_int8pack_mm(x_MK.contiguous(), q_NK, scale_N)


def choose_cpu_method(rows: int, q_NK: Tensor, method: CpuInt8Method) -> CpuInt8Method:
    """The way `expert_int8_mm` multiplies `rows` rows by q_NK under `method` ("auto":
    int8mm for decode-sized row counts of weights large enough that reading them
    dominates, dequant otherwise; thresholds measured, see the module docstring)."""
    if method != CpuInt8Method.AUTO:
        return method
    large = q_NK.shape[0] * q_NK.shape[1] >= INT8MM_MIN_WEIGHT
    return CpuInt8Method.INT8MM if large and rows <= INT8MM_MAX_ROWS else CpuInt8Method.DEQUANT


def effective_cpu_method(x_MK: Tensor, q_NK: Tensor, method: CpuInt8Method) -> CpuInt8Method:
    """`choose_cpu_method`'s choice, with `int8mm` replaced by `dequant` wherever
    `int8mm_supports` says no (forced or not)."""
    chosen = choose_cpu_method(x_MK.shape[0], q_NK, method)
    if chosen == CpuInt8Method.INT8MM and not int8mm_supports(x_MK, q_NK):
        return CpuInt8Method.DEQUANT
    return chosen


def expert_int8_mm(
    x_MK: Tensor,
    q_NK: Tensor,
    scale_N: Tensor,
    method: CpuInt8Method,
    out_MN: Tensor | None = None,
) -> Tensor:
    """(x_MK @ q_NK^T) * scale_N for one expert, written into `out_MN` (default: a new
    tensor) of x's dtype, which is returned."""
    if out_MN is None:
        out_MN = x_MK.new_empty(x_MK.shape[0], q_NK.shape[0])
    method = effective_cpu_method(x_MK, q_NK, method)
    half = x_MK.dtype in (torch.float16, torch.bfloat16)
    if method == CpuInt8Method.INT8MM:
        if half:  # the output rounds to x's dtype anyway: let the op apply the scales
            return out_MN.copy_(_int8pack_mm(x_MK, q_NK, scale_N.to(x_MK.dtype)))
        # The op is slow on fp32 activations: bf16 ones, fp32 scales applied to the output.
        ones_N = torch.ones(scale_N.shape, dtype=torch.bfloat16)
        y_MN = _int8pack_mm(x_MK.to(torch.bfloat16), q_NK, ones_N)
        return torch.mul(y_MN, scale_N.to(torch.float32), out=out_MN)
    if half:
        y_MN = torch.mm(x_MK.to(torch.float32), q_NK.to(torch.float32).T)
        return out_MN.copy_(y_MN.mul_(scale_N.to(torch.float32)))
    torch.mm(x_MK, q_NK.to(x_MK.dtype).T, out=out_MN)
    return out_MN.mul_(scale_N.to(x_MK.dtype))


def int8_grouped_mm_torch(
    x_RK: Tensor, q_ENK: Tensor, scale_EN: Tensor, counts_E: Tensor, method: str = "auto"
) -> Tensor:
    """y_RN[rows of e] = (x_RK[rows of e] @ q_ENK[e]^T) * scale_EN[e]; rows sorted by
    expert. Loops over the experts that have rows only (the CPU path)."""
    chosen = parse_cpu_method(method)
    y_RN = x_RK.new_empty(x_RK.shape[0], q_ENK.shape[1])
    start = 0
    for expert, count in enumerate(counts_E.tolist()):
        if count:
            stop = start + count
            rows = slice(start, stop)
            expert_int8_mm(x_RK[rows], q_ENK[expert], scale_EN[expert], chosen, y_RN[rows])
            start = stop
    assert start == x_RK.shape[0], f"counts_E sums to {start}, not to the {x_RK.shape[0]} rows"
    return y_RN


int8_grouped_mm = torch.library.custom_op(
    "moe::int8_grouped_mm", int8_grouped_mm_torch, mutates_args=()
)


@int8_grouped_mm.register_fake
def _(
    x_RK: Tensor, q_ENK: Tensor, scale_EN: Tensor, counts_E: Tensor, method: str = "auto"
) -> Tensor:
    return x_RK.new_empty(x_RK.shape[0], q_ENK.shape[1])


def int8_grouped_mm_triton(
    x_RK: Tensor, q_ENK: Tensor, scale_EN: Tensor, counts_E: Tensor, method: str = "auto"
) -> Tensor:
    """The CUDA adapter of `moe::int8_grouped_mm` (a plain function, so tests can run it
    on CPU tensors under TRITON_INTERPRET=1). `method` is for the CPU path only."""
    from moe.ops.kernels.int8_grouped_gemm import int8_grouped_mm as launch

    if x_RK.dtype not in TRITON_DTYPES:
        return int8_grouped_mm_torch(x_RK, q_ENK, scale_EN, counts_E, method)
    return launch(x_RK, q_ENK, scale_EN, counts_E.to(x_RK.device).cumsum(0))


def _register_cuda_kernel() -> None:
    from moe.ops import kernels

    if kernels.triton_available():
        int8_grouped_mm.register_kernel("cuda")(int8_grouped_mm_triton)


_register_cuda_kernel()
