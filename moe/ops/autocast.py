"""How the `moe::` ops behave under `torch.autocast`: one rule per op, registered for
the CPU and CUDA autocast dispatch keys.

- The matmuls (`grouped_mm`, `grouped_mm_wgrad`, `int8_grouped_mm`, and the folded
  `gather_grouped_mm`, `grouped_mm_combine`, whose routing weights stay as they are) cast their float
  operands to the autocast dtype (bf16, or fp16 on CUDA; read when called, so one
  registration serves both) and run in it: CPU `torch.mm`/`torch.bmm` on bf16 operands
  accumulate in fp32 (oneDNN) and round the result once, as do the Triton kernels
  (`tl.dot` into an fp32 accumulator). They return the autocast dtype. The int8 op casts
  only the activations: its per-channel scales stay fp32.
- The row movers (`gather_rows`, `scatter_add_rows`, `combine`, `combine_backward`)
  compute nothing worth a lower precision: they keep their inputs' dtypes, as do the
  folded matmuls' backward ops (called by autograd with the forward's dtypes).

Every op then runs with autocast off, so nothing inside it is cast again (the outputs
have the dtypes the ops' fake implementations promise). This is what
`torch.library.register_autocast` does, except that its cast dtype is fixed when it is
registered, and a CUDA run may autocast to bf16 or fp16. Autograd records the casts
(autocast dispatches before autograd): a weight cast to bf16 gets its gradient back in
fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from moe.ops import cpu, fused
from moe.ops import int8 as int8_ops

_LIBRARY = torch.library.Library("moe", "IMPL")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _rule(op: Any, device_type: str, cast: Sequence[int]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(
            arg.to(dtype)
            if index in cast and isinstance(arg, Tensor) and arg.is_floating_point()
            else arg
            for index, arg in enumerate(args)
        )
        with torch.autocast(device_type, enabled=False):
            return op(*args)

    return run


def register_autocast_rule(op: Any, cast: Sequence[int]) -> None:
    """Register `op`'s autocast rule (a `torch.library.custom_op`): positional arguments
    `cast` are cast to the autocast dtype when floating, the rest pass as they are, and
    the op runs with autocast off. Both for eager calls (the dispatcher) and for
    tracing (`torch.compile`'s Python dispatcher), as `register_autocast` does."""
    overload = op._opoverload
    name = overload._schema.name.split("::")[1]
    for device_type, key in _AUTOCAST_KEYS.items():
        if not torch.amp.is_autocast_available(device_type):
            continue
        rule = _rule(overload, device_type, cast)
        _LIBRARY.impl(name, rule, key)
        overload.py_impl(getattr(torch._C.DispatchKey, key))(rule)


register_autocast_rule(cpu.grouped_mm, cast=(0, 1))
register_autocast_rule(cpu.grouped_mm_wgrad, cast=(0, 1))
register_autocast_rule(int8_ops.int8_grouped_mm, cast=(0,))
register_autocast_rule(fused.gather_grouped_mm, cast=(0, 1))
register_autocast_rule(fused.grouped_mm_combine, cast=(0, 1))
for _mover in (
    cpu.gather_rows, cpu.scatter_add_rows, cpu.combine, cpu.combine_backward,
    fused.gather_grouped_mm_backward, fused.grouped_mm_combine_backward,
):  # fmt: skip
    register_autocast_rule(_mover, cast=())
