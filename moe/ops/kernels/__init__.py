"""Triton kernels of the MoE layer: the CUDA fast path behind the custom ops in `moe.ops`.

- `grouped_mm`, `grouped_mm_wgrad` (module `moe.ops.kernels.grouped_gemm`): expert GEMMs over
  rows sorted by expert, driven by the device tensor of inclusive row offsets.
- `gather_rows`, `gather_rows_backward`, `combine`, `combine_backward` (module
  `moe.ops.kernels.gather`): the permute and the weighted unpermute.
- `gather_grouped_mm`, `grouped_mm_scatter`, `gather_grouped_mm_scale_dot` (module
  `moe.ops.kernels.folded`): expert GEMMs with the permute folded in (the row gather in
  the operand load, the weighted scatter-add into tokens in the epilogue).
- `GemmBlocks`, `default_blocks` (module `moe.ops.kernels.tiles`): the tile sizes, with
  the row-tile map, tile product and launch grid these GEMM kernels share.

Triton is imported only when one of these names is first used, so `import moe.ops.kernels`
works where Triton is absent. `triton_available()` says whether it can be imported.
The functions run on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1` (tests).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

_EXPORTS = {
    "GemmBlocks": "moe.ops.kernels.tiles",
    "default_blocks": "moe.ops.kernels.tiles",
    "grouped_mm": "moe.ops.kernels.grouped_gemm",
    "grouped_mm_wgrad": "moe.ops.kernels.grouped_gemm",
    "gather_rows": "moe.ops.kernels.gather",
    "gather_rows_backward": "moe.ops.kernels.gather",
    "combine": "moe.ops.kernels.gather",
    "combine_backward": "moe.ops.kernels.gather",
    "gather_grouped_mm": "moe.ops.kernels.folded",
    "grouped_mm_scatter": "moe.ops.kernels.folded",
    "gather_grouped_mm_scale_dot": "moe.ops.kernels.folded",
}

__all__ = [*_EXPORTS, "triton_available"]


def triton_available() -> bool:
    """True when the `triton` package is installed (it still needs CUDA or the interpreter)."""
    return importlib.util.find_spec("triton") is not None


def __getattr__(name: str) -> Any:
    """Import the kernel module that defines `name` on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe.ops.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
