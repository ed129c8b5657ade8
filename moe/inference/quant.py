"""Int8 weight-only experts: per-output-channel symmetric int8 weights, float activations.

Quantization (METHODS.md, "Int8 weight-only quantization"): for a weight w_KN (K inputs,
N outputs) each output channel n gets scale_N[n] = max_k |w[k, n]| / 127 (fp32) and
q_NK[n, k] = round(w[k, n] / scale[n]) in [-127, 127], stored [out, in] as
`torch.ops.aten._weight_int8pack_mm` wants. The fast paths compute y = x @ w as
(x @ q^T) * scale: the scale multiplies the output, not a dequantized weight.

`Int8Experts` stores every projection stacked over its experts (`w1_q_EHD` [E, H, D] int8,
`w1_scale_EH` [E, H] fp32, `w2_q_EDH`, `w2_scale_ED`, and `w3_*` for SwiGLU) as buffers,
so that checkpoints save one file per expert. It is for inference: no gradients.

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

Shapes: R routed rows, D model width, H expert hidden width, E experts (local), K input
width and N output width of one projection, M rows of one expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor, nn

from moe.experts import (
    Activation,
    Experts,
    GroupedExperts,
    apply_activation,
    check_expert_ids,
    parse_activation,
)
from routing.config import parse_enum

QMAX = 127
# "auto" takes `int8mm` for at most this many rows of one expert, and only for weights of
# at least INT8MM_MIN_WEIGHT elements (below, per-op overheads dominate and dequant wins).
INT8MM_MAX_ROWS = 16
INT8MM_MIN_WEIGHT = 2**17
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CpuInt8Method(str, Enum):
    """How the CPU path multiplies one expert's rows (see the module docstring)."""

    AUTO = "auto"
    INT8MM = "int8mm"
    DEQUANT = "dequant"


def parse_cpu_method(value: object) -> CpuInt8Method:
    return parse_enum(CpuInt8Method, value, "cpu_method")


def quantize_weight(w_KN: Tensor) -> tuple[Tensor, Tensor]:
    """w_KN [..., K, N] float -> (q_NK [..., N, K] int8, scale_N [..., N] fp32).

    Per output channel n: scale = max_k |w[k, n]| / 127 and q = round(w / scale), so
    |w - q * scale| <= scale / 2. An all-zero channel gets scale 0 and q 0.
    """
    if w_KN.dim() < 2 or not w_KN.is_floating_point():
        raise ValueError(
            f"quantize_weight: w has shape {tuple(w_KN.shape)} and dtype {w_KN.dtype}; "
            "expected a float tensor [..., K, N]"
        )
    w_NK = w_KN.detach().transpose(-1, -2).to(torch.float32)
    scale_N = w_NK.abs().amax(dim=-1) / QMAX
    divisor_N = torch.where(scale_N > 0, scale_N, torch.ones_like(scale_N))
    q_NK = torch.round(w_NK / divisor_N.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q_NK.contiguous(), scale_N.contiguous()


def dequantize(q_NK: Tensor, scale_N: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(q_NK [..., N, K] int8, scale_N [..., N]) -> w_KN [..., K, N] of `dtype`."""
    if q_NK.dtype != torch.int8 or q_NK.dim() < 2 or scale_N.shape != q_NK.shape[:-1]:
        raise ValueError(
            f"dequantize: q {tuple(q_NK.shape)} {q_NK.dtype}, scale {tuple(scale_N.shape)}; "
            "expected int8 [..., N, K] and scales [..., N]"
        )
    w_NK = q_NK.to(torch.float32) * scale_N.to(torch.float32).unsqueeze(-1)
    return w_NK.transpose(-1, -2).to(dtype)


def choose_cpu_method(rows: int, q_NK: Tensor, method: CpuInt8Method) -> CpuInt8Method:
    """The way `expert_int8_mm` multiplies `rows` rows by q_NK under `method` ("auto":
    int8mm for decode-sized row counts of weights large enough that reading them
    dominates, dequant otherwise; thresholds measured, see the module docstring)."""
    if method != CpuInt8Method.AUTO:
        return method
    large = q_NK.shape[0] * q_NK.shape[1] >= INT8MM_MIN_WEIGHT
    return CpuInt8Method.INT8MM if large and rows <= INT8MM_MAX_ROWS else CpuInt8Method.DEQUANT


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
    method = choose_cpu_method(x_MK.shape[0], q_NK, method)
    half = x_MK.dtype in (torch.float16, torch.bfloat16)
    use_int8mm = x_MK.device.type == "cpu" and (half or x_MK.dtype == torch.float32)
    if method == CpuInt8Method.INT8MM and use_int8mm:
        if half:  # the output rounds to x's dtype anyway: let the op apply the scales
            scale_half_N = scale_N.to(x_MK.dtype)
            return out_MN.copy_(
                torch.ops.aten._weight_int8pack_mm(x_MK.contiguous(), q_NK, scale_half_N)
            )
        # The op is slow on fp32 activations: bf16 ones, fp32 scales applied to the output.
        ones_N = torch.ones(scale_N.shape, dtype=torch.bfloat16)
        y_MN = torch.ops.aten._weight_int8pack_mm(x_MK.to(torch.bfloat16), q_NK, ones_N)
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


class Int8Experts(Experts):
    """E expert MLPs with int8 weights: y = act(x w1) w2, or (silu(x w1) * x w3) w2.

    Built empty (zero weights, to be filled by `load_checkpoint` from an int8 checkpoint)
    with the shape arguments of `GroupedExperts`, or from one with `from_float`.
    `cpu_method` picks the CPU matmul ("auto", "int8mm", "dequant"; module docstring).
    """

    quantization = "int8"

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: Activation | str = Activation.GELU,
        expert_ids: Sequence[int] | None = None,
        *,
        cpu_method: CpuInt8Method | str = CpuInt8Method.AUTO,
    ) -> None:
        super().__init__()
        if num_experts < 1 or d_model < 1 or d_hidden < 1:
            raise ValueError(
                f"Int8Experts needs num_experts, d_model, d_hidden >= 1; got "
                f"{num_experts}, {d_model}, {d_hidden}"
            )
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.expert_ids = check_expert_ids(expert_ids, num_experts)
        self.activation = parse_activation(activation)
        self.cpu_method = parse_cpu_method(cpu_method)
        E, D, H = num_experts, d_model, d_hidden
        self.w1_q_EHD: Tensor
        self.w1_scale_EH: Tensor
        self.w2_q_EDH: Tensor
        self.w2_scale_ED: Tensor
        self.w3_q_EHD: Tensor | None
        self.w3_scale_EH: Tensor | None
        self.register_buffer("w1_q_EHD", torch.zeros(E, H, D, dtype=torch.int8))
        self.register_buffer("w1_scale_EH", torch.zeros(E, H))
        self.register_buffer("w2_q_EDH", torch.zeros(E, D, H, dtype=torch.int8))
        self.register_buffer("w2_scale_ED", torch.zeros(E, D))
        swiglu = self.activation == Activation.SWIGLU
        self.register_buffer("w3_q_EHD", torch.zeros(E, H, D, dtype=torch.int8) if swiglu else None)
        self.register_buffer("w3_scale_EH", torch.zeros(E, H) if swiglu else None)

    @classmethod
    def from_float(
        cls, grouped: GroupedExperts, *, cpu_method: CpuInt8Method | str = CpuInt8Method.AUTO
    ) -> Int8Experts:
        """The int8 copy of `grouped` (same experts, ids, activation and device)."""
        if not isinstance(grouped, GroupedExperts):
            raise ValueError(
                f"Int8Experts.from_float takes a GroupedExperts; got {type(grouped).__name__}"
            )
        module = cls(
            grouped.num_experts,
            grouped.d_model,
            grouped.d_hidden,
            grouped.activation,
            grouped.expert_ids,
            cpu_method=cpu_method,
        ).to(grouped.w1_EDH.device)
        with torch.no_grad():
            pairs = [
                (grouped.w1_EDH, module.w1_q_EHD, module.w1_scale_EH),
                (grouped.w2_EHD, module.w2_q_EDH, module.w2_scale_ED),
            ]
            if grouped.w3_EDH is not None:
                assert module.w3_q_EHD is not None and module.w3_scale_EH is not None
                pairs.append((grouped.w3_EDH, module.w3_q_EHD, module.w3_scale_EH))
            for weight, q_ENK, scale_EN in pairs:
                q, scale = quantize_weight(weight)
                q_ENK.copy_(q)
                scale_EN.copy_(scale)
        return module

    def forward(self, x_RD: Tensor, counts_E: Tensor, filled_E: Tensor | None = None) -> Tensor:
        """x_RD: [R, D] float rows sorted by local expert; counts_E: [E] int64 rows per
        local expert. Returns y_RD in x's dtype. Padding rows (`filled_E`, see
        `Experts.forward`) are multiplied like the others."""
        if x_RD.dim() != 2 or x_RD.shape[1] != self.d_model or not x_RD.is_floating_point():
            raise ValueError(
                f"Int8Experts input has shape {tuple(x_RD.shape)} and dtype {x_RD.dtype}; "
                f"expected a float tensor [rows, {self.d_model}]"
            )
        if counts_E.shape != (self.num_experts,):
            raise ValueError(
                f"counts_E has shape {tuple(counts_E.shape)}; expected ({self.num_experts},)"
            )
        method = self.cpu_method.value
        h_RH = int8_grouped_mm(x_RD, self.w1_q_EHD, self.w1_scale_EH, counts_E, method)
        gate_RH = None
        if self.w3_q_EHD is not None and self.w3_scale_EH is not None:
            gate_RH = int8_grouped_mm(x_RD, self.w3_q_EHD, self.w3_scale_EH, counts_E, method)
        h_RH = apply_activation(h_RH, gate_RH, self.activation)
        return int8_grouped_mm(h_RH, self.w2_q_EDH, self.w2_scale_ED, counts_E, method)

    def expert_forward(self, x_ND: Tensor, expert: int) -> Tensor:
        """Local expert `expert` on any rows: dequantize its weights, then float matmuls."""
        h = x_ND @ dequantize(self.w1_q_EHD[expert], self.w1_scale_EH[expert], x_ND.dtype)
        gate = None
        if self.w3_q_EHD is not None and self.w3_scale_EH is not None:
            gate = x_ND @ dequantize(self.w3_q_EHD[expert], self.w3_scale_EH[expert], x_ND.dtype)
        h = apply_activation(h, gate, self.activation)
        return h @ dequantize(self.w2_q_EDH[expert], self.w2_scale_ED[expert], x_ND.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation.value}, expert_ids={list(self.expert_ids)}, "
            f"cpu_method={self.cpu_method.value}"
        )


def quantize_experts(model: nn.Module, *, cpu_method: CpuInt8Method | str = "auto") -> int:
    """Replace, in place, every `GroupedExperts` held as `.experts` of a module (the MoE
    layers) by its `Int8Experts`. Returns how many were replaced."""
    holders = [
        (module, experts)
        for module in model.modules()
        if isinstance(experts := getattr(module, "experts", None), GroupedExperts)
    ]
    for module, experts in holders:
        module.experts = Int8Experts.from_float(experts, cpu_method=cpu_method)
    return len(holders)
