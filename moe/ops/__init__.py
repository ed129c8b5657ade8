"""The MoE layer's ops, registered with `torch.library` (one opaque op each for autograd
and `torch.compile`): `grouped_mm`, `grouped_mm_wgrad`, `gather_rows`,
`scatter_add_rows`, `combine`, `combine_backward`.

- `moe.ops.cpu`: the ops and their plain-torch implementation (every device without a
  kernel), with the CPU block workers;
- `moe.ops.cuda`: the CUDA implementations, registered here when Triton is installed;
- `moe.ops.kernels`: the Triton kernels behind them;
- `moe.ops.fused`: `gather_grouped_mm` and `grouped_mm_combine`, the expert matmuls
  with the permute's gather and the unpermute's weighted combine folded in; on CPU
  implemented by `moe.ops.spans` (the block workers) and `moe.ops.padded_blocks` (bf16,
  one `bmm` per matmul), half-precision blocks at the row counts of `moe.ops.row_buckets`;
- `moe.ops.int8`: the int8-weight grouped matmul of the int8 experts;
- `moe.ops.autocast`: the ops' rules under `torch.autocast` (registered here).
"""

from moe.ops import kernels
from moe.ops.cpu import (
    POOL_MIN_BLOCKS,
    combine,
    combine_backward,
    gather_rows,
    grouped_mm,
    grouped_mm_torch,
    grouped_mm_wgrad,
    grouped_mm_wgrad_torch,
    scatter_add_rows,
)
from moe.ops.fused import gather_grouped_mm, grouped_mm_combine

if kernels.triton_available():
    from moe.ops import cuda

    cuda.register()

# Registers the ops' rules under torch.autocast (moe.ops.autocast), once the ops exist.
from moe.ops import autocast

__all__ = [
    "POOL_MIN_BLOCKS",
    "autocast",
    "combine",
    "combine_backward",
    "gather_grouped_mm",
    "gather_rows",
    "grouped_mm",
    "grouped_mm_combine",
    "grouped_mm_torch",
    "grouped_mm_wgrad",
    "grouped_mm_wgrad_torch",
    "scatter_add_rows",
]
