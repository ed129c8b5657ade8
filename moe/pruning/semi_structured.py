"""2:4 experts on sparse tensor cores, and what packed N:M formats take in memory.

On CUDA with compute capability 8.0 or more, torch's semi-structured sparse tensors
(`torch.sparse.to_sparse_semi_structured`) store a 2:4 matrix packed (the kept values and
their positions) and multiply it on the sparse tensor cores. `SemiStructuredExperts`
holds each expert's projections that way, as [out, in] matrices whose 2:4 groups run
along `in` (the reduction dimension, where `launch.prune` put them), in a 16-bit dtype
(bf16 by default: torch's CUTLASS kernels take fp32 only as 1:2). It is for inference
(forward only, no state to save: checkpoints keep the float experts with zeros);
`use_semi_structured(model)` swaps it in for every float 2:4 expert stack.

On the CPU the weights stay dense with zeros; `packed_nm_bytes` is what a packed format
would take: the kept N of every M values, plus ceil(log2 M) bits of position per kept
value (for 2:4, 2 bits each: one bit per weight of the dense matrix, which is what
torch's CUTLASS format stores for 16-bit and 8-bit values; tests/test_pruning_memory.py
checks it against torch's own conversion).

Legend: R routed rows, D model width, H expert hidden width, E experts (local).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.experts import Experts, GroupedExperts, apply_activation
from moe.pruning.config import NMPattern
from moe.pruning.masks import satisfies_nm

TWO_FOUR = NMPattern(2, 4)
MIN_CAPABILITY = (8, 0)


def packed_nm_bytes(numel: int, pattern: NMPattern, value_bytes: float) -> int:
    """Bytes of an N:M-sparse matrix of `numel` weights stored packed: the kept values
    (`value_bytes` each) and ceil(log2 M) bits of position per kept value."""
    if numel % pattern.m:
        raise ValueError(f"{numel} weights do not split into groups of M={pattern.m}")
    kept = numel // pattern.m * pattern.n
    index_bits = max(1, math.ceil(math.log2(pattern.m)))
    return math.ceil(kept * value_bytes) + math.ceil(kept * index_bits / 8)


def semi_structured_available(device: torch.device | str) -> bool:
    """Whether `device` runs torch's semi-structured sparse matmuls (CUDA sm80+)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


class SemiStructuredExperts(Experts):
    """E expert MLPs whose projections are 2:4 semi-structured sparse tensors (module
    docstring): y = act(x w1) w2, or (silu(x w1) * x w3) w2, in `dtype`, returned in
    the input's dtype. Built from a 2:4-pruned `GroupedExperts` with `from_grouped`."""

    quantization = "semi_structured"

    def __init__(self, grouped: GroupedExperts, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.num_experts = grouped.num_experts
        self.d_model = grouped.d_model
        self.d_hidden = grouped.d_hidden
        self.activation = grouped.activation
        self.expert_ids = grouped.expert_ids
        self.dtype = dtype
        projections: dict[str, Tensor | None] = {
            "w1": grouped.w1_EDH,
            "w2": grouped.w2_EHD,
            "w3": grouped.w3_EDH,
        }
        self.matrices: dict[str, list[Tensor]] = {}
        for key, stacked in projections.items():
            if stacked is None:
                continue
            if not satisfies_nm(stacked, 1, TWO_FOUR):
                raise ValueError(
                    f"{key} of the experts is not 2:4 along its reduction dimension; prune "
                    "it with launch.prune prune.pattern=2:4 first"
                )
            # [E, in, out] -> per expert [out, in]: the 2:4 groups run along `in`.
            self.matrices[key] = [
                to_sparse_semi_structured(stacked[e].detach().t().contiguous().to(dtype))
                for e in range(self.num_experts)
            ]

    @classmethod
    def from_grouped(
        cls, grouped: GroupedExperts, dtype: torch.dtype = torch.bfloat16
    ) -> SemiStructuredExperts:
        return cls(grouped, dtype)

    def _expert(self, x_ND: Tensor, expert: int) -> Tensor:
        rows = x_ND.to(self.dtype)
        h = F.linear(rows, self.matrices["w1"][expert])
        gate = F.linear(rows, self.matrices["w3"][expert]) if "w3" in self.matrices else None
        h = apply_activation(h, gate, self.activation)
        return F.linear(h, self.matrices["w2"][expert]).to(x_ND.dtype)

    def forward(self, x_RD: Tensor, counts_E: Tensor, filled_E: Tensor | None = None) -> Tensor:
        """See `Experts.forward`: one sparse matmul chain per expert over its rows;
        padding rows (`filled_E`) are skipped and give zeros."""
        y_RD = torch.zeros_like(x_RD)
        counts = counts_E.tolist()
        used = filled_E.tolist() if filled_E is not None else counts
        offset = 0
        for expert, (count, rows) in enumerate(zip(counts, used)):
            if rows:
                y_RD[offset : offset + rows] = self._expert(x_RD[offset : offset + rows], expert)
            offset += count
        return y_RD

    def forward_every(self, x_TD: Tensor) -> Tensor:
        """See `Experts.forward_every` (the compiled decode's padded layout): every
        expert's sparse matmul chain over all rows, stacked [E, T, D]; no host sync (the
        default goes through `forward`, whose counts come to the host), so a CUDA graph
        can capture it."""
        return torch.stack([self._expert(x_TD, e) for e in range(self.num_experts)])

    def expert_forward(self, x_ND: Tensor, expert: int) -> Tensor:
        return self._expert(x_ND, expert)

    def expert_state(self, local: int) -> dict[str, Tensor]:
        raise ValueError(
            "semi-structured experts are an inference format; save the float checkpoint "
            "they were built from (launch.prune's output)"
        )


def use_semi_structured(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16, names: Sequence[str] | None = None
) -> int:
    """Replace, in place, every float expert stack held as `.experts` of a module whose
    projections are all 2:4 (or those named in `names`) by `SemiStructuredExperts`.
    Needs CUDA sm80+ (ValueError otherwise). Returns how many were replaced."""
    holders = [
        (name, module, experts)
        for name, module in model.named_modules()
        if isinstance(experts := getattr(module, "experts", None), GroupedExperts)
    ]
    if not holders:
        return 0
    device = holders[0][2].w1_EDH.device
    if not semi_structured_available(device):
        raise ValueError(
            f"semi-structured sparse experts need CUDA with compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or more; the experts are on {device}"
        )
    replaced = 0
    for name, module, experts in holders:
        wanted = names is None or f"{name}.experts" in names
        stacks = [experts.w1_EDH, experts.w2_EHD] + (
            [experts.w3_EDH] if experts.w3_EDH is not None else []
        )
        if wanted and all(satisfies_nm(w, 1, TWO_FOUR) for w in stacks):
            module.experts = SemiStructuredExperts(experts, dtype)
            replaced += 1
    return replaced
