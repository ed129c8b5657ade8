"""The inference planner of Pope et al. 2022 ("Efficiently Scaling Transformer
Inference", arXiv 2211.05102) for our MoE transformers: per layout, time and memory.

For a model shape, a workload (batch B, prompt and generation lengths, precisions) and a
`moe.planning.hardware.Hardware`, `estimate` gives per layout over n chips:

- prefill time = max(compute, memory) + communication + host, and its MFU (matmul FLOPs
  of the parameters, 2 * N_active per token, over n * peak * time; Pope Sec. 2);
- decode time per step (= per token of every sequence) with the same four terms
  (docs/METHODS.md, "Inference cost"): compute = FLOPs / peak, memory = (weights read
  + KV cache read) / bandwidth; the weights read per MoE layer are the experts the step's
  tokens touch, E * (1 - (1 - K/E)^T) for T tokens under uniform routing;
- the all-to-all of each MoE layer (dispatch and combine) from `comm.cost`, flat or
  hierarchical, whichever is cheaper; weight and KV memory per chip and whether it fits.

Layouts (n chips each):
- `replicated`: n replicas, the batch split over them; no communication.
- `expert_parallel`: experts sharded over n chips (n <= experts per layer), attention
  and dense FFNs replicated with the batch split (DeepSpeed-MoE, our torchrun engine).
- `tp_1d`: 1D weight-stationary (Pope Sec. 3.2.1, Fig. 2a): every weight split over n
  chips along one dimension (heads; FFN and expert hidden width), activations
  all-gathered and reduce-scattered around each sublayer: ~2*B*L*D bytes-elements per
  sublayer over the network bandwidth, independent of n (we use the ring's (n-1)/n).
- `tp_2d`: 2D weight-stationary (Pope Sec. 3.2.2, Fig. 2b): weights split along D and
  F over a sqrt(n) x sqrt(n) grid: 8*B*L*D / (sqrt(n) * bandwidth) per sublayer, so it
  beats 1D beyond about 16 chips (Pope's own crossover).
- `weight_gathered`: fully (XYZ-) weight-gathered (Pope Sec. 3.2.3, Fig. 2c): weights
  stored split over n, each layer's weights all-gathered before use, the batch split
  over n: communication is the layer's weights, independent of B*L, so it wins for
  large prefill batches.
Decode attention in the tensor-parallel layouts is split over the batch (Pope Sec. 3.3,
for multi-query attention) or over KV heads, so the KV cache is not replicated while
B or the KV heads cover n chips. Simplifications, stated: our blocks are serial
(attention, then FFN: two sublayer collectives per block) unless `parallel_block`
(PaLM's formulation, one); the all-to-all that re-shards attention by batch, norms and biases (O(D)) are
left out; embeddings and routers stay in the activation precision.

Shapes: B sequences, L tokens per sequence in the call (prompt length in prefill, 1 in
decode), T = B * L tokens, D model width, F dense FFN width, H expert width, E experts
of a layer, K experts per token, n chips.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum

from moe.planning.hardware import Hardware, Precision
from moe.planning.model_costs import Costs, ModelShape, Workload, check_positive_int


class Layout(str, Enum):
    REPLICATED = "replicated"
    EXPERT_PARALLEL = "expert_parallel"
    TP_1D = "tp_1d"
    TP_2D = "tp_2d"
    WEIGHT_GATHERED = "weight_gathered"


OBJECTIVES = ("cost", "latency")


@dataclass(frozen=True)
class PhaseEstimate:
    """One model call of a phase on one chip of the layout (seconds, bytes, FLOPs)."""

    time_s: float
    compute_s: float
    memory_s: float
    comm_s: float
    host_s: float
    flops_per_chip: float
    bytes_read_per_chip: float
    all_to_all: str  # the algorithm comm.cost chose (or none)


@dataclass(frozen=True)
class Estimate:
    layout: str
    chips: int
    prefill: PhaseEstimate
    decode: PhaseEstimate
    prefill_mfu: float
    weight_bytes_per_chip: float
    kv_bytes_per_chip: float
    memory_per_chip: float
    fits: bool

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * self.decode.time_s

    def chip_s_per_token(self, batch: int) -> float:
        """Chip-seconds per generated token at decode: the cost of a token."""
        return self.chips * self.decode.time_s / batch

    def to_dict(self, batch: int) -> dict[str, object]:
        data = asdict(self)
        data["decode_ms_per_token"] = self.decode_ms_per_token
        data["chip_s_per_token"] = self.chip_s_per_token(batch)
        return data


def _ring_collective_s(hw: Hardware, chips: int, nbytes: float) -> float:
    """All-gather or reduce-scatter on a ring of `chips`: (n-1)/n of the full `nbytes`
    over the slowest link, plus one launch and n-1 hop latencies."""
    if chips == 1:
        return 0.0
    bandwidth, latency = hw.link(chips)
    return nbytes * (chips - 1) / chips / bandwidth + hw.collective_call_s + (chips - 1) * latency


def _grid(chips: int) -> int:
    """The side of the 2D layout's grid: the largest power of two <= sqrt(n)."""
    return 2 ** (int(math.log2(chips)) // 2)


def _phase(
    costs: Costs, hw: Hardware, layout: Layout, n: int, seqs: int, length: int, context: float
) -> PhaseEstimate:
    """One call of `seqs` sequences, `length` tokens each, attending over `context`."""
    s, w = costs.shape, costs.work
    total = seqs * length
    sharded = layout in (Layout.REPLICATED, Layout.EXPERT_PARALLEL, Layout.WEIGHT_GATHERED)
    seqs_chip = math.ceil(seqs / n) if sharded else seqs
    tokens_chip = seqs_chip * length
    kv_shards = 1 if sharded else min(n, max(seqs, s.n_kv_heads))
    # Decode reads each sequence's cache; prefill writes the prompt's once.
    per_sequence_kv = (context if length == 1 else length) * costs.kv_bytes_per_token
    kv_read = seqs_chip * per_sequence_kv if sharded else seqs * per_sequence_kv / kv_shards
    act_bytes = w.activations.nbytes
    comm_s, algo = 0.0, "none"
    expert_flops = 2.0 * costs.expert_params * s.top_k * len(s.moe_blocks)
    if layout is Layout.REPLICATED:
        flops = costs.flops(tokens_chip, context)
        read = costs.non_expert_bytes + costs.touched_expert_bytes(tokens_chip) + kv_read
        experts_run = costs.experts_run(tokens_chip)
    elif layout is Layout.EXPERT_PARALLEL:
        flops = costs.flops(tokens_chip, context) - tokens_chip * expert_flops
        flops += total * expert_flops / n  # balanced experts
        read = costs.non_expert_bytes + costs.touched_expert_bytes(total) / n + kv_read
        experts_run = costs.experts_run(total) / n
        one, algo = hw.all_to_all_s(n, tokens_chip * s.top_k * s.d_model * act_bytes)
        comm_s = 2 * len(s.moe_blocks) * one  # dispatch and combine
    elif layout in (Layout.TP_1D, Layout.TP_2D):
        flops = costs.flops(total, context) / n
        read = (costs.non_expert_bytes + costs.touched_expert_bytes(total)) / n + kv_read
        experts_run = costs.experts_run(total)
        activations = total * s.d_model * act_bytes  # B*L*D of Pope's formulas, in bytes
        if layout is Layout.TP_1D:  # all-gather + reduce-scatter per sublayer
            sublayer = 2 * _ring_collective_s(hw, n, activations)
        else:  # 8BLD / (sqrt(n) bw): 4 collectives of 2BLD/sqrt(n) over a side of the grid
            side = _grid(n)
            bandwidth, latency = hw.link(n)
            sublayer = 8 * activations / (math.sqrt(n) * bandwidth) if n > 1 else 0.0
            sublayer += 4 * (hw.collective_call_s + (side - 1) * latency) if n > 1 else 0.0
        comm_s = (1 if s.parallel_block else 2) * s.n_layers * sublayer
    else:  # weight-gathered: all-gather each block's weights (touched experts only)
        flops = costs.flops(tokens_chip, context)
        touched = costs.touched_expert_bytes(total)
        read = costs.non_expert_bytes + touched + kv_read
        experts_run = costs.experts_run(tokens_chip)
        moe_share = touched / max(len(s.moe_blocks), 1)
        comm_s = sum(
            _ring_collective_s(hw, n, block + (moe_share if e else 0.0))
            for block, e in zip(costs.block_bytes, s.experts_per_block)
        )
    compute_s = flops / hw.peak_flops(w.activations)
    memory_s = read / hw.memory_bandwidth
    expert_host = hw.host_expert_int8_s if w.weights is Precision.INT8 else hw.host_expert_s
    host_s = (
        hw.host_step_s + hw.host_layer_s * s.n_layers + expert_host * experts_run
        + hw.host_sequence_s * seqs_chip + hw.host_token_s * tokens_chip
    )  # fmt: skip
    time_s = max(compute_s, memory_s) + comm_s + host_s
    return PhaseEstimate(time_s, compute_s, memory_s, comm_s, host_s, flops, read, algo)


def estimate(
    shape: ModelShape, work: Workload, hw: Hardware, layout: Layout | str, chips: int
) -> Estimate:
    """Prefill and decode of `work` on `chips` chips of `hw` in `layout`.

    Decode is costed at the mean context of the generation, prompt + gen_len / 2."""
    layout = Layout(layout)
    check_positive_int("plan", "chips", chips)
    if chips > hw.chips:
        raise ValueError(f"chips={chips} is invalid; accepted: 1..hardware.chips={hw.chips}")
    if layout is Layout.EXPERT_PARALLEL and (not shape.moe_blocks or chips > min(shape.moe_blocks)):
        raise ValueError(
            f"expert_parallel over {chips} chips needs an MoE model with at least that many "
            "experts per MoE block"
        )
    costs = Costs(shape, work)
    b, p = work.batch, work.prompt_len
    prefill = _phase(costs, hw, layout, chips, b, p, p / 2.0)
    decode = _phase(costs, hw, layout, chips, b, 1, p + work.gen_len / 2.0)
    sharded = layout in (Layout.REPLICATED, Layout.EXPERT_PARALLEL, Layout.WEIGHT_GATHERED)
    context = p + work.gen_len
    if sharded:
        kv = float(math.ceil(b / chips) * context * costs.kv_bytes_per_token)
    else:
        kv = b * context * costs.kv_bytes_per_token / min(chips, max(b, shape.n_kv_heads))
    if layout is Layout.REPLICATED:
        weights = costs.all_weight_bytes()
    elif layout is Layout.EXPERT_PARALLEL:
        experts_chip = sum(math.ceil(e / chips) for e in shape.moe_blocks)
        weights = costs.non_expert_bytes + experts_chip * costs.expert_bytes
    elif layout is Layout.WEIGHT_GATHERED:  # its shard plus one gathered block
        largest = max(
            block + (e * costs.expert_bytes) for block, e in zip(costs.block_bytes,
                                                                 shape.experts_per_block)
        )  # fmt: skip
        weights = costs.all_weight_bytes() / chips + largest
    else:
        weights = costs.all_weight_bytes() / chips
    ideal = 2.0 * costs.active_params * b * p / (chips * hw.peak_flops(work.activations))
    total = weights + kv
    return Estimate(
        layout.value, chips, prefill, decode, ideal / prefill.time_s, weights, kv, total,
        total <= hw.memory_bytes,
    )  # fmt: skip


def chip_counts(hw: Hardware) -> list[int]:
    """Powers of two up to the machine's chips, and the machine's chip count."""
    counts = [2**i for i in range(int(math.log2(hw.chips)) + 1)]
    return sorted(set(counts) | {hw.chips})


def plan(
    shape: ModelShape, work: Workload, hw: Hardware, *, objective: str = "cost",
    latency_target_ms: float = 0.0,
) -> list[Estimate]:  # fmt: skip
    """Every valid (layout, chips) ranked: those that fit first, then those meeting the
    decode latency target (0: none), then by chip-seconds per token (`cost`) or by
    decode latency (`latency`); ties go to fewer chips."""
    if objective not in OBJECTIVES:
        raise ValueError(
            f"plan.objective={objective!r} is invalid; accepted: {', '.join(OBJECTIVES)}"
        )
    if latency_target_ms < 0:
        raise ValueError(f"plan.latency_target_ms={latency_target_ms} is invalid; accepted: >= 0")
    rows = []
    for n in chip_counts(hw):
        for layout in Layout:
            if n == 1 and layout is not Layout.REPLICATED:
                continue  # every layout is the replicated one on one chip
            if layout is Layout.EXPERT_PARALLEL and (
                not shape.moe_blocks or n > min(shape.moe_blocks)
            ):
                continue
            rows.append(estimate(shape, work, hw, layout, n))

    def key(e: Estimate) -> tuple[bool, bool, float, int]:
        missed = latency_target_ms > 0 and e.decode_ms_per_token > latency_target_ms
        metric = e.chip_s_per_token(work.batch) if objective == "cost" else e.decode.time_s
        return (not e.fits, missed, metric, e.chips)

    return sorted(rows, key=key)
