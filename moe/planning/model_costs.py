"""What the inference planner (`moe.planning.planner`) counts: a model's shape, the
workload it serves, and the parameters, bytes and FLOPs that follow from the two.

- `ModelShape` (or `shape_from_config` of a `ModelConfig`): widths, heads, and the
  experts of each block (0: a dense block).
- `Workload`: batch, prompt and generation lengths, weight and activation precisions.
- `Costs(shape, workload)`: active parameters per block, weight bytes (int8 with its
  per-output scales), KV-cache bytes per token, the experts T tokens touch under uniform
  routing (`experts_touched`, docs/METHODS.md, "Inference cost") and the FLOPs of a call.

Shapes: T tokens, D model width, E experts of a layer, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig
from moe.planning.hardware import Precision, parse_precision

INT8_SCOPES = ("all", "experts")


def check_positive_int(owner: str, key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{key}={value!r} is invalid; accepted: an integer >= 1")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model. `experts_per_block[i]` is 0 for a dense
    block; `ffn_matrices` is 2 (gelu/relu MLP) or 3 (swiglu: gate, up, down);
    `shared_expert_hidden`: the width of the dense expert every token of an MoE block
    also passes (Qwen2-MoE; 0: none), dense weight, always active."""

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
    shared_expert_hidden: int = 0
    tie_embeddings: bool = True
    parallel_block: bool = False  # PaLM's attention and FFN side by side: one collective set
    name: str = "model"

    def __post_init__(self) -> None:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "ffn_hidden", "expert_hidden", "top_k"):  # fmt: skip
            check_positive_int("model", key, getattr(self, key))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_kv_heads={self.n_kv_heads} is invalid; accepted: a divisor of "
                f"n_heads={self.n_heads}"
            )
        if isinstance(self.shared_expert_hidden, bool) or self.shared_expert_hidden < 0:
            raise ValueError(
                f"model.shared_expert_hidden={self.shared_expert_hidden!r} is invalid; accepted: "
                "an integer >= 0"
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
        residual_mlp=config.residual_mlp, shared_expert_hidden=config.shared_expert_hidden,
        tie_embeddings=config.tie_embeddings, name=name,
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
            check_positive_int("plan", key, getattr(self, key))
        self.weights = parse_precision(self.weights, "plan.precision")
        self.activations = parse_precision(self.activations, "plan.activations")
        if self.int8_scope not in INT8_SCOPES:
            raise ValueError(
                f"plan.int8_scope={self.int8_scope!r} is invalid; accepted: "
                f"{', '.join(INT8_SCOPES)}"
            )


def experts_touched(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts that `tokens` tokens pick, K each, uniformly:
    E * (1 - (1 - K/E)^T) (docs/METHODS.md, "Inference cost"). T = 1 gives K; large T
    gives E."""
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
        shared = [*ffn(s.shared_expert_hidden), (d, 1)] if s.shared_expert_hidden else []
        shared_bytes = sum(matrix_bytes(i, o, other_p) for i, o in shared)
        shared_params = sum(i * o for i, o in shared)
        embed_bytes = s.vocab_size * d * act.nbytes * (1 if s.tie_embeddings else 2)
        # Non-expert weights read by every call, block by block, then the embeddings.
        self.block_bytes: list[float] = []
        self.block_active_params: list[int] = []
        for e in s.experts_per_block:
            if e:
                extra = (residual_bytes if s.residual_mlp else 0.0) + shared_bytes
                self.block_bytes.append(attention_bytes + d * e * act.nbytes + extra)
                active = s.top_k * self.expert_params + d * e + shared_params
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
