"""The floating-point precision a model computes in, and the host support that picks it.

`ComputePrecision` is what `train.precision` (training, distillation) and `precision`
(`launch.generate`, `launch.serve`) accept:

- `fp32`: everything in fp32.
- `bf16`: mixed precision. Training: the parameters stay fp32 (the master weights the
  optimizer updates; its state and the gradients are fp32 too) and the forward and
  backward run under `torch.autocast` in bf16: matmuls (linear layers, attention, the
  `moe::` expert ops, `moe.ops.autocast`) take bf16 operands and accumulate in fp32.
  What stays fp32: the residual stream and so the norms' statistics (the embedding
  output is fp32 and every block adds into it), router logits and softmax/sigmoid
  (`routing.routers`), the aux and z losses, the LM loss (cross entropy on fp32 logits)
  and the optimizer. Inference: bf16 weights (`moe.inference.loading`), a bf16 KV cache,
  sampling in fp32. The MoE layer's all-to-all moves bf16 rows (`moe.layer`).
- `fp16`: as bf16 with fp16 and dynamic loss scaling; CUDA only (refused elsewhere,
  `resolve_precision`).
- `auto` (the training default): bf16 where bf16 is faster than fp32, fp32 elsewhere.
  CUDA: `torch.cuda.is_bf16_supported()`. CPU: an x86 CPU whose flags list `amx_bf16`
  (Intel AMX: bf16 matmul tiles, 8x fp32's rate on a 8192x512x1024 matmul), with
  oneDNN's bf16 path available in torch. A CPU with `avx512_bf16` but no AMX (Intel
  Cooper Lake, AMD Zen 4 and later) multiplies bf16 natively, about twice fp32's rate
  on large matmuls: there `auto` is bf16 for training (the demo trained at 1.17x fp32's
  tokens/s, with the attention in fp32, `moe.attention`) and fp32 for inference (a
  decode step of the demo took 5.7 ms in bf16 against 4.6 in fp32: small matmuls, casts;
  docs/BENCHMARKS.md, "Mixed precision"); `bf16` runs natively there when asked for. Other CPUs emulate bf16, several times slower than fp32; `bf16`
  can still be asked for there (the result is the same, only slower) and the
  resolution says so.

The resolution (`ResolvedPrecision`) carries the reason, which a run prints and records
(`launch.training.loop`: its log, events.jsonl and every checkpoint's meta.json).
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from routing.config import parse_enum


class ComputePrecision(str, Enum):
    """See the module docstring."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


DTYPES = {
    ComputePrecision.FP32: torch.float32,
    ComputePrecision.BF16: torch.bfloat16,
    ComputePrecision.FP16: torch.float16,
}
# CPU flags (x86 /proc/cpuinfo) that mean native bf16 matmuls.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def parse_precision(value: object, key: str = "train.precision") -> ComputePrecision:
    return parse_enum(ComputePrecision, value, key)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the `flags` line of /proc/cpuinfo; empty where there is
    none: not Linux, or not x86)."""
    path = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not path.is_file():
        return frozenset()
    for line in path.read_text(errors="replace").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def bf16_matmul_support(
    device: torch.device, flags: frozenset[str] | None = None
) -> tuple[bool, str]:
    """Whether `device` multiplies bf16 natively, and why (one phrase). `flags`: the
    CPU's flags (default: this host's, `cpu_flags()`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} supports bf16"
        return False, f"{name} has no native bf16"
    if device.type != "cpu":
        return False, f"no bf16 rule for device type {device.type!r}"
    flags = cpu_flags() if flags is None else flags
    native = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if not native:
        return False, f"this CPU lists none of the flags {', '.join(BF16_CPU_FLAGS)}"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, f"this CPU has {native[0]} but torch's oneDNN has no bf16 path"
    return True, f"this CPU has {native[0]}"


@dataclass(frozen=True)
class ResolvedPrecision:
    """The precision a run computes in (never `auto`), what was asked and why it is
    this one."""

    precision: ComputePrecision
    requested: ComputePrecision
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the autocast dtype in training, the weights' at inference."""
        return DTYPES[self.precision]

    @property
    def mixed(self) -> bool:
        """Whether the model computes in a half-precision type (bf16 or fp16)."""
        return self.precision != ComputePrecision.FP32

    @property
    def loss_scaling(self) -> bool:
        """fp16 gradients underflow without a loss scale; bf16 has fp32's range."""
        return self.precision == ComputePrecision.FP16

    @contextlib.contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        """The forward of a training step (or an evaluation) in this precision:
        `torch.autocast` in the compute dtype, nothing for fp32."""
        if not self.mixed:
            yield
            return
        with torch.autocast(device.type, dtype=self.dtype):
            yield

    def record(self) -> dict[str, str]:
        """Plain data for logs, events.jsonl and meta.json."""
        return {
            "precision": self.precision.value,
            "requested": self.requested.value,
            "reason": self.reason,
        }

    def describe(self) -> str:
        """One phrase: `bf16 (auto: this CPU has avx512_bf16)`, `fp32 (asked for)`."""
        if self.requested == self.precision:
            return f"{self.precision.value} ({self.reason})"
        return f"{self.precision.value} ({self.requested.value}: {self.reason})"


def bf16_faster(
    device: torch.device, flags: frozenset[str] | None = None, training: bool = False
) -> tuple[bool, str]:
    """Whether bf16 computes faster than fp32 on `device`, which multiplies bf16 natively
    (`bf16_matmul_support`), in `training` or at inference, and why: on CUDA always; on
    a CPU with AMX tiles always; on one with avx512_bf16 only in training."""
    if device.type != "cpu":
        return bf16_matmul_support(device, flags)
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return True, "this CPU has amx_bf16"
    if training:
        return True, (
            "this CPU has avx512_bf16: bf16 trains faster than fp32 there "
            "(the demo at 1.17x fp32's tokens/s)"
        )
    return False, (
        "this CPU has avx512_bf16 but no AMX: bf16 decodes slower than fp32 there "
        "(the demo's step 5.7 against 4.6 ms); ask for bf16 to use it anyway"
    )


# fp32 as asked for: the default of code that takes a resolved precision.
FULL_PRECISION = ResolvedPrecision(ComputePrecision.FP32, ComputePrecision.FP32, "asked for")


def resolve_precision(
    requested: ComputePrecision | str,
    device: torch.device,
    key: str = "train.precision",
    flags: frozenset[str] | None = None,
    training: bool = False,
) -> ResolvedPrecision:
    """The precision to compute in on `device` for `training` or inference (see the
    module docstring): `auto` becomes bf16 where bf16 is faster there, else fp32; fp16
    off CUDA is refused with a ValueError naming `key`."""
    chosen = parse_precision(requested, key)
    native, why = bf16_matmul_support(device, flags)
    if chosen == ComputePrecision.AUTO:
        faster, why = bf16_faster(device, flags, training) if native else (False, why)
        picked = ComputePrecision.BF16 if faster else ComputePrecision.FP32
        return ResolvedPrecision(picked, chosen, why)
    if chosen == ComputePrecision.FP16 and device.type != "cuda":
        raise ValueError(
            f"{key}=fp16 needs CUDA, this run is on {device.type}: CPUs have no fast fp16 "
            "matmul (and fp16 training needs loss scaling, bf16 does not); accepted here: "
            "bf16, fp32 or auto"
        )
    if chosen == ComputePrecision.BF16:
        return ResolvedPrecision(chosen, chosen, why if native else f"emulated, slow: {why}")
    return ResolvedPrecision(chosen, chosen, "asked for")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype `x` is computed in here: the autocast dtype when autocast is on for its
    device (and x is floating point), else x's own."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype
