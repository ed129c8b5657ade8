"""The hardware description the inference planner (`moe.planning.planner`) plans for.

One `Hardware` dataclass, validated in `__post_init__` (a bad field raises `ValueError`
naming the field and the accepted values), read from `conf/hardware/*.yaml` (Hydra group
`hardware`) or built in code. Units are SI: seconds, bytes, bytes/s, FLOP/s.

- `chips` in nodes of `chips_per_node`; peak FLOP/s per chip for fp32, bf16 and int8
  matmuls; memory per chip and its read bandwidth.
- The interconnect: per-chip bandwidth (one direction) and per-message latency within a
  node and across nodes, plus the fixed cost of launching one collective. They become a
  `comm.cost.CostModel` (`cost_model`), so the all-to-all of an expert-parallel layer is
  costed by the same alpha-beta model that `comm` calibrates and uses.
- The host: what one model call costs outside the roofline (Python and op dispatch of
  an eager engine). Decode at small batch on a CPU is dominated by it, so it is a term of
  its own rather than folded into an efficiency factor:

    host_s = host_step_s + host_layer_s * layers + host_expert_s * experts run
           + host_sequence_s * sequences + host_token_s * tokens

  where "experts run" sums, over MoE layers, the experts that received at least one
  token (`host_expert_int8_s` replaces `host_expert_s` for int8 experts, whose CPU path
  dequantizes one expert per call). `scripts/calibrate_hardware.py` measures all of
  these on this machine; the GPU presets state their assumption in the YAML.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path

import yaml

from comm.cost import CostModel


class Precision(str, Enum):
    """A number format of weights, activations or the KV cache."""

    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"

    @property
    def nbytes(self) -> int:
        return {"fp32": 4, "bf16": 2, "int8": 1}[self.value]


def parse_precision(value: object, key: str) -> Precision:
    """`Precision(value)`, or a ValueError naming `key` and the accepted values."""
    if isinstance(value, Precision):
        return value
    accepted = ", ".join(p.value for p in Precision)
    if value not in {p.value for p in Precision}:
        raise ValueError(f"{key}={value!r} is invalid; accepted: {accepted}")
    return Precision(str(value))


HOST_FIELDS = ("host_step_s", "host_layer_s", "host_expert_s", "host_expert_int8_s",
               "host_sequence_s", "host_token_s")  # fmt: skip
_POSITIVE = (
    "peak_flops_fp32", "peak_flops_bf16", "peak_flops_int8", "memory_bytes",
    "memory_bandwidth", "intra_node_bandwidth", "inter_node_bandwidth",
)  # fmt: skip
_NON_NEGATIVE = (
    "intra_node_latency_s", "inter_node_latency_s", "collective_call_s", *HOST_FIELDS,
)  # fmt: skip


@dataclass
class Hardware:
    """A machine to plan for; every figure is per chip unless it says otherwise."""

    name: str = "unnamed"
    chips: int = 1
    chips_per_node: int = 1
    peak_flops_fp32: float = 1e12
    peak_flops_bf16: float = 1e12
    peak_flops_int8: float = 1e12
    memory_bytes: float = 16e9
    memory_bandwidth: float = 1e11
    intra_node_bandwidth: float = 1e10
    intra_node_latency_s: float = 1e-6
    inter_node_bandwidth: float = 1e10
    inter_node_latency_s: float = 1e-6
    collective_call_s: float = 0.0
    host_step_s: float = 0.0
    host_layer_s: float = 0.0
    host_expert_s: float = 0.0
    host_expert_int8_s: float = 0.0
    host_sequence_s: float = 0.0
    host_token_s: float = 0.0
    source: str = ""  # where the figures come from (measured, vendor sheet, assumption)

    def __post_init__(self) -> None:
        for key in ("chips", "chips_per_node"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"hardware.{key}={value!r} is invalid; accepted: an integer >= 1")
        if self.chips % self.chips_per_node and self.chips > self.chips_per_node:
            raise ValueError(
                f"hardware.chips={self.chips} is invalid; accepted: a multiple of "
                f"chips_per_node={self.chips_per_node} (whole nodes), or at most one node"
            )
        for key in _POSITIVE:
            value = getattr(self, key)
            if not _is_number(value) or not value > 0:
                raise ValueError(
                    f"hardware.{key}={value!r} is invalid; accepted: a finite number > 0"
                )
            setattr(self, key, float(value))
        for key in _NON_NEGATIVE:
            value = getattr(self, key)
            if not _is_number(value) or value < 0:
                raise ValueError(
                    f"hardware.{key}={value!r} is invalid; accepted: a finite number >= 0"
                )
            setattr(self, key, float(value))

    def peak_flops(self, precision: Precision) -> float:
        """Peak matmul FLOP/s of one chip with operands in `precision`."""
        return {
            Precision.FP32: self.peak_flops_fp32,
            Precision.BF16: self.peak_flops_bf16,
            Precision.INT8: self.peak_flops_int8,
        }[precision]

    def nodes_of(self, num_chips: int) -> tuple[int, int]:
        """(nodes, chips per node) of a group of `num_chips` chips packed into nodes."""
        per_node = min(num_chips, self.chips_per_node)
        return math.ceil(num_chips / per_node), per_node

    def link(self, num_chips: int) -> tuple[float, float]:
        """(bandwidth, latency) of the slowest link a group of `num_chips` uses: the
        node's own links while the group fits in a node, the inter-node ones beyond."""
        if num_chips <= self.chips_per_node:
            return self.intra_node_bandwidth, self.intra_node_latency_s
        return self.inter_node_bandwidth, self.inter_node_latency_s

    def cost_model(self) -> CostModel:
        """The `comm` alpha-beta model of this machine's interconnect: a regroup (the
        hierarchical all-to-all's local copy) reads and writes its bytes once."""
        return CostModel(
            call_s=self.collective_call_s,
            alpha_intra_s=self.intra_node_latency_s,
            alpha_inter_s=self.inter_node_latency_s,
            beta_intra_s_per_B=1.0 / self.intra_node_bandwidth,
            beta_inter_s_per_B=1.0 / self.inter_node_bandwidth,
            beta_copy_s_per_B=2.0 / self.memory_bandwidth,
            copy_call_s=0.0,
        )

    def all_to_all_s(self, num_chips: int, bytes_per_chip: float) -> tuple[float, str]:
        """Time of one all-to-all in which each of `num_chips` chips sends
        `bytes_per_chip`, and the algorithm (`flat` or `hierarchical`) that achieves it:
        whichever `comm.cost` says is cheaper."""
        if num_chips == 1:
            return 0.0, "none"
        nodes, per_node = self.nodes_of(num_chips)
        model = self.cost_model()
        algo = model.choose(nodes, per_node, bytes_per_chip)
        return model.time_s(algo, nodes, per_node, bytes_per_chip), algo

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def hardware_from_dict(data: object) -> Hardware:
    """A validated `Hardware` from a mapping; unknown keys name themselves."""
    if not isinstance(data, dict):
        raise ValueError(f"hardware must be a mapping of fields, got {type(data).__name__}")
    names = {f.name for f in fields(Hardware)}
    unknown = sorted(set(data) - names - {"defaults"})
    if unknown:
        raise ValueError(
            f"unknown hardware key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(names))}"
        )
    # The values are as read (YAML); Hardware.__post_init__ checks their types.
    return Hardware(**{k: v for k, v in data.items() if k in names})


def load_hardware(path: str | Path) -> Hardware:
    """Read a `conf/hardware/*.yaml` file (its Hydra `defaults` list is ignored)."""
    with open(path) as handle:
        data = yaml.safe_load(handle)
    return hardware_from_dict(data)
