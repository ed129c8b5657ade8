"""The inference planner of Pope et al. 2022 ("Efficiently Scaling Transformer
Inference", arXiv 2211.05102) for our MoE transformers: per layout, time and memory.

For a model shape, a workload (batch B, prompt and generation lengths, precisions) and a
`moe.inference.hardware.Hardware`, `estimate` gives per layout over n chips:

- prefill time = max(compute, memory) + communication + host, and its MFU (matmul FLOPs
  of the parameters, 2 * N_active per token, over n * peak * time; Pope Sec. 2);
- decode time per step (= per token of every sequence) with the same four terms
  (METHODS.md "Inference cost"): compute = FLOPs / peak, memory = (weights read + KV
  cache read) / bandwidth; the weights read per MoE layer are the experts the step's
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

from moe.config import ModelConfig
from moe.inference.hardware import Hardware, Precision, parse_precision


class Layout(str, Enum):
    REPLICATED = "replicated"
    EXPERT_PARALLEL = "expert_parallel"
    TP_1D = "tp_1d"
    TP_2D = "tp_2d"
    WEIGHT_GATHERED = "weight_gathered"


INT8_SCOPES = ("all", "experts")
OBJECTIVES = ("cost", "latency")


def _positive_int(owner: str, key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{key}={value!r} is invalid; accepted: an integer >= 1")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model. `experts_per_block[i]` is 0 for a dense
    block; `ffn_matrices` is 2 (gelu/relu MLP) or 3 (swiglu: gate, up, down)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    expert_hidden: int
    experts_per_block: tuple[int, ...]
    top_k: int = 2
    ffn_matrices: int = 2
    residual_mlp: bool = False
    tie_embeddings: bool = True
    parallel_block: bool = False  # PaLM's attention and FFN side by side: one collective set
    name: str = "model"

    def __post_init__(self) -> None:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "ffn_hidden", "expert_hidden", "top_k"):  # fmt: skip
            _positive_int("model", key, getattr(self, key))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_kv_heads={self.n_kv_heads} is invalid; accepted: a divisor of "
                f"n_heads={self.n_heads}"
            )
        if self.ffn_matrices not in (2, 3):
            raise ValueError(
                f"model.ffn_matrices={self.ffn_matrices!r} is invalid; accepted: 2 or 3"
            )
        experts = tuple(self.experts_per_block)
        if len(experts) != self.n_layers or any(
            isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in experts
        ):
            raise ValueError(
                f"model.experts_per_block={list(experts)} is invalid; accepted: n_layers="
                f"{self.n_layers} integers >= 0 (0 = a dense block)"
            )
        if any(0 < e < self.top_k for e in experts):
            raise ValueError(
                f"model.top_k={self.top_k} is invalid; accepted: at most the smallest expert "
                f"count of an MoE block ({min(e for e in experts if e)})"
            )

    @property
    def moe_blocks(self) -> list[int]:
        return [e for e in self.experts_per_block if e]


def shape_from_config(config: ModelConfig, top_k: int = 2, name: str = "model") -> ModelShape:
    """The planner's view of a `ModelConfig` (routing's `top_k` is not part of it)."""
    return ModelShape(
        vocab_size=config.vocab_size, d_model=config.d_model, n_layers=config.n_layers,
        n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
        ffn_hidden=config.ffn_hidden, expert_hidden=config.expert_hidden,
        experts_per_block=tuple(config.experts_per_block()), top_k=top_k,
        ffn_matrices=3 if config.activation.value == "swiglu" else 2,
        residual_mlp=config.residual_mlp, tie_embeddings=config.tie_embeddings, name=name,
    )  # fmt: skip


@dataclass
class Workload:
    """What is served: B sequences of `prompt_len` prompt and `gen_len` new tokens.
    `weights` is the weight precision; int8 is weight-only unless `activations` is int8
    too; `int8_scope`: `all` weights or only the `experts` (our engine's int8)."""

    batch: int = 8
    prompt_len: int = 64
    gen_len: int = 64
    weights: Precision = Precision.BF16
    activations: Precision = Precision.BF16
    int8_scope: str = "all"

    def __post_init__(self) -> None:
        for key in ("batch", "prompt_len", "gen_len"):
            _positive_int("plan", key, getattr(self, key))
        self.weights = parse_precision(self.weights, "plan.precision")
        self.activations = parse_precision(self.activations, "plan.activations")
        if self.int8_scope not in INT8_SCOPES:
            raise ValueError(
                f"plan.int8_scope={self.int8_scope!r} is invalid; accepted: "
                f"{', '.join(INT8_SCOPES)}"
            )


def experts_touched(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts that `tokens` tokens pick, K each, uniformly:
    E * (1 - (1 - K/E)^T) (METHODS.md). T = 1 gives K; large T gives E."""
    if num_experts == 0 or tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def matrix_bytes(inputs: int, outputs: int, precision: Precision) -> float:
    """Bytes of one [inputs, outputs] weight; int8 adds one fp32 scale per output."""
    return inputs * outputs * precision.nbytes + (4 * outputs if precision is Precision.INT8 else 0)


class Costs:
    """Parameter, byte and FLOP counts of a shape under a workload's precisions."""

    def __init__(self, shape: ModelShape, work: Workload) -> None:
        s, d = shape, shape.d_model
        expert_p = work.weights
        other_p = (
            work.weights
            if work.weights is not Precision.INT8 or work.int8_scope == "all"
            else work.activations
        )
        q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        attention = [(d, q), (d, kv), (d, kv), (q, d)]
        self.attention_params = sum(i * o for i, o in attention)

        def ffn(width: int) -> list[tuple[int, int]]:
            return [(d, width)] * (s.ffn_matrices - 1) + [(width, d)]

        self.expert_params = sum(i * o for i, o in ffn(s.expert_hidden))
        self.expert_bytes = sum(matrix_bytes(i, o, expert_p) for i, o in ffn(s.expert_hidden))
        act = work.activations if work.activations is not Precision.INT8 else Precision.BF16
        attention_bytes = sum(matrix_bytes(i, o, other_p) for i, o in attention)
        dense_bytes = sum(matrix_bytes(i, o, other_p) for i, o in ffn(s.ffn_hidden))
        residual_bytes = sum(matrix_bytes(i, o, other_p) for i, o in ffn(s.expert_hidden))
        embed_bytes = s.vocab_size * d * act.nbytes * (1 if s.tie_embeddings else 2)
        # Non-expert weights read by every call, block by block, then the embeddings.
        self.block_bytes: list[float] = []
        self.block_active_params: list[int] = []
        for e in s.experts_per_block:
            if e:
                extra = residual_bytes if s.residual_mlp else 0.0
                self.block_bytes.append(attention_bytes + d * e * act.nbytes + extra)
                active = s.top_k * self.expert_params + d * e
                active += self.expert_params if s.residual_mlp else 0
            else:
                self.block_bytes.append(attention_bytes + dense_bytes)
                active = sum(i * o for i, o in ffn(s.ffn_hidden))
            self.block_active_params.append(self.attention_params + active)
        self.embed_bytes = float(embed_bytes)
        self.non_expert_bytes = sum(self.block_bytes) + self.embed_bytes
        self.active_params = sum(self.block_active_params) + s.vocab_size * d  # + LM head
        self.kv_bytes_per_token = s.n_layers * 2 * kv * work.activations.nbytes
        self.shape, self.work = shape, work

    def all_weight_bytes(self) -> float:
        return self.non_expert_bytes + sum(self.shape.moe_blocks) * self.expert_bytes

    def touched_expert_bytes(self, tokens: float) -> float:
        """Bytes of the experts `tokens` tokens touch, summed over MoE blocks."""
        k = self.shape.top_k
        return sum(experts_touched(e, k, tokens) for e in self.shape.moe_blocks) * (
            self.expert_bytes
        )

    def experts_run(self, tokens: float) -> float:
        return sum(experts_touched(e, self.shape.top_k, tokens) for e in self.shape.moe_blocks)

    def flops(self, tokens: float, context: float) -> float:
        """FLOPs of `tokens` tokens each attending over `context` positions:
        2 * N_active per token (matmuls) + 4 * context * heads * head_dim per layer."""
        s = self.shape
        attention = 4.0 * context * s.n_heads * s.head_dim * s.n_layers
        return tokens * (2.0 * self.active_params + attention)


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
    _positive_int("plan", "chips", chips)
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
