"""The schema of the MoE transformer language model (`ModelConfig`).

A plain dataclass with `str` Enums so that Hydra's structured configs accept it (the
launch package registers it in the ConfigStore; this module imports no Hydra). It holds
no live objects: routing settings live in `routing.RoutingConfig`, the process groups in
the launcher's topology.

Layout of the blocks (`moe_every = N`):
    N = 0  every FFN is a dense MLP of width `ffn_hidden` (a dense model);
    N >= 1 block i (0-based) has an MoE FFN when (i + 1) % N == 0, so N = 1 makes every
           FFN an MoE layer and N = 2 makes blocks 1, 3, 5, ... MoE (the last block of
           every group of N), the rest dense.

The dense FFNs (`moe_every = 0`, or the blocks between MoE layers) are `ffn_kind`:
    mlp    `moe.experts.DenseMLP` (two `nn.Linear`);
    expert `moe.experts.ExpertFFN`: the expert-layer code with one expert and no router
           (`GroupedExperts(num_experts=1)` over all tokens), the same class and
           parameter layout as one expert of an MoE layer (the distillation student).

`dense_layers` forces the listed blocks dense whatever `moe_every` says (Qwen-MoE's
`mlp_only_layers`; `decoder_sparse_step` is `moe_every`).

PR-MoE (DeepSpeed-MoE): `expert_schedule` lists the expert count of each MoE layer in
order (empty = `num_experts` everywhere); a pyramid puts more experts in later layers
(`pyramid_schedule`). `residual_mlp` turns on the MoE layer's dense residual MLP.

The options the HuggingFace MoE families need (docs/MODELS.md has the table per family);
every default is the model this project trained before they existed:
    norm_eps             epsilon of every RMSNorm;
    head_dim             query/key/value head width (0: d_model // n_heads, resolved at
                         construction; Qwen3-MoE sets it explicitly);
    qkv_bias, out_bias   biases on the q/k/v projections and on the output projection;
    qk_norm              RMSNorm of queries and keys before RoPE: `head` over each head's
                         C channels, one gain shared by the heads (Qwen3-MoE), or
                         `projection` over the whole q (N*C) and k (G*C) projections
                         (OLMoE);
    clip_qkv             clamp q, k and v to [-clip, clip] after the q/k norm (OLMoE);
                         0 = off;
    shared_expert_hidden a dense SwiGLU/… MLP of this width beside the routed experts of
                         every MoE layer, every token through it (0 = none);
                         `shared_expert_gate` scales it by sigmoid(x w_g) per token
                         (Qwen2-MoE).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum

# One enum for experts and dense MLPs: gelu, relu (sigma-MoE's experts), swiglu.


class FFNKind(str, Enum):
    """The module of a dense (non-MoE) FFN."""

    MLP = "mlp"  # DenseMLP
    EXPERT = "expert"  # ExpertFFN: one expert of the expert-layer code, no router


def _require(condition: bool, key: str, value: object, accepted: str) -> None:
    if not condition:
        raise ValueError(f"ModelConfig.{key}={value!r} is invalid; accepted: {accepted}")


class QKNorm(str, Enum):
    """RMSNorm of queries and keys before RoPE (see the module docstring)."""

    NONE = "none"
    HEAD = "head"  # over each head's C channels, one gain of C shared by the heads
    PROJECTION = "projection"  # over the whole projection: N*C for q, G*C for k


class Activation(str, Enum):
    """The hidden activation of every MLP (experts and dense FFNs)."""

    GELU = "gelu"
    RELU = "relu"
    SWIGLU = "swiglu"


@dataclass
class ModelConfig:
    """A decoder-only transformer whose every `moe_every`-th FFN is an MoE layer.

    Byte-level by default (`vocab_size=256`, no tokenizer). Widths: `ffn_hidden` is the
    hidden width of the dense MLPs, `expert_hidden` (H) that of each expert (and of the
    PR-MoE residual MLP).
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # n_kv_heads == n_heads: multi-head; 1: multi-query; in between: grouped-query.
    n_kv_heads: int = 4
    max_seq_len: int = 256
    ffn_hidden: int = 1024
    expert_hidden: int = 256
    num_experts: int = 8
    expert_schedule: list[int] = field(default_factory=list)
    moe_every: int = 1
    residual_mlp: bool = False
    activation: Activation = Activation.GELU
    ffn_kind: FFNKind = FFNKind.MLP
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_theta: float = 10000.0
    init_std: float = 0.02
    norm_eps: float = 1e-6
    head_dim: int = 0
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: QKNorm = QKNorm.NONE
    clip_qkv: float = 0.0
    shared_expert_hidden: int = 0
    shared_expert_gate: bool = True
    dense_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        positive = "an integer >= 1"
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, key)
            _require(isinstance(value, int) and value >= 1, key, value, positive)
        for key in ("ffn_hidden", "expert_hidden", "num_experts"):
            value = getattr(self, key)
            _require(isinstance(value, int) and value >= 1, key, value, positive)
        _require(
            isinstance(self.head_dim, int) and self.head_dim >= 0,
            "head_dim",
            self.head_dim,
            "0 (d_model // n_heads) or an even integer >= 2",
        )
        if self.head_dim == 0:
            _require(
                self.d_model % self.n_heads == 0,
                "n_heads",
                self.n_heads,
                f"a divisor of d_model={self.d_model} (or set head_dim)",
            )
            _require(
                (self.d_model // self.n_heads) % 2 == 0,
                "d_model",
                self.d_model,
                f"a multiple of 2 * n_heads={2 * self.n_heads} (RoPE rotates pairs of channels)",
            )
            self.head_dim = self.d_model // self.n_heads
        _require(
            self.head_dim % 2 == 0,
            "head_dim",
            self.head_dim,
            "an even integer (RoPE rotates pairs of channels)",
        )
        _require(
            isinstance(self.n_kv_heads, int)
            and self.n_kv_heads >= 1
            and self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            self.n_kv_heads,
            f"a divisor of n_heads={self.n_heads} (1 = multi-query, n_heads = multi-head)",
        )
        _require(
            isinstance(self.moe_every, int) and 0 <= self.moe_every <= self.n_layers,
            "moe_every",
            self.moe_every,
            f"0 (dense) or 1..n_layers={self.n_layers} (block i is MoE when (i+1) % N == 0)",
        )
        self.dense_layers = sorted({int(i) for i in self.dense_layers})
        _require(
            all(0 <= i < self.n_layers for i in self.dense_layers),
            "dense_layers",
            self.dense_layers,
            f"block indices in [0, {self.n_layers - 1}]",
        )
        self.expert_schedule = list(self.expert_schedule)
        num_moe = len(self.moe_layer_indices())
        _require(
            not self.expert_schedule or len(self.expert_schedule) == num_moe,
            "expert_schedule",
            self.expert_schedule,
            f"empty or one expert count per MoE layer ({num_moe} MoE layers)",
        )
        _require(
            all(isinstance(n, int) and n >= 1 for n in self.expert_schedule),
            "expert_schedule",
            self.expert_schedule,
            "expert counts >= 1",
        )
        _require(
            not self.residual_mlp or num_moe > 0,
            "residual_mlp",
            self.residual_mlp,
            "false when moe_every=0 (a dense model has no MoE layer)",
        )
        if not isinstance(self.activation, Activation):
            accepted = ", ".join(a.value for a in Activation)
            _require(
                self.activation in {a.value for a in Activation},
                "activation",
                self.activation,
                accepted,
            )
            self.activation = Activation(self.activation)
        if not isinstance(self.ffn_kind, FFNKind):
            accepted = ", ".join(k.value for k in FFNKind)
            _require(
                self.ffn_kind in {k.value for k in FFNKind}, "ffn_kind", self.ffn_kind, accepted
            )
            self.ffn_kind = FFNKind(self.ffn_kind)
        _require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a float in [0, 1)")
        _require(self.rope_theta > 0, "rope_theta", self.rope_theta, "a float > 0")
        _require(self.init_std > 0, "init_std", self.init_std, "a float > 0")
        _require(self.norm_eps > 0, "norm_eps", self.norm_eps, "a float > 0")
        _require(self.clip_qkv >= 0, "clip_qkv", self.clip_qkv, "0 (off) or a float > 0")
        if not isinstance(self.qk_norm, QKNorm):
            accepted = ", ".join(k.value for k in QKNorm)
            _require(self.qk_norm in {k.value for k in QKNorm}, "qk_norm", self.qk_norm, accepted)
            self.qk_norm = QKNorm(self.qk_norm)
        _require(
            isinstance(self.shared_expert_hidden, int) and self.shared_expert_hidden >= 0,
            "shared_expert_hidden",
            self.shared_expert_hidden,
            "0 (no shared expert) or an integer >= 1",
        )
        _require(
            not self.shared_expert_hidden or num_moe > 0,
            "shared_expert_hidden",
            self.shared_expert_hidden,
            "0 when the model has no MoE layer",
        )

    def moe_layer_indices(self) -> list[int]:
        """Indices of the blocks whose FFN is an MoE layer: (i + 1) % moe_every == 0 and
        not in `dense_layers`."""
        if self.moe_every == 0:
            return []
        dense = set(self.dense_layers)
        return [i for i in range(self.n_layers) if (i + 1) % self.moe_every == 0 and i not in dense]

    def experts_per_block(self) -> list[int]:
        """Expert count of every block's FFN, 0 for a dense block."""
        counts = [0] * self.n_layers
        indices = self.moe_layer_indices()
        schedule = self.expert_schedule or [self.num_experts] * len(indices)
        for block, count in zip(indices, schedule):
            counts[block] = count
        return counts


def pyramid_schedule(num_moe_layers: int, first: int, last: int) -> list[int]:
    """A PR-MoE pyramid: the first half of the MoE layers get `first` experts, the rest
    `last` (DeepSpeed-MoE's 350M+PR-MoE: 32 experts early, 64 in the last layers).

    With an odd count the middle layer joins the later, larger half.
    """
    if num_moe_layers < 1:
        raise ValueError(f"num_moe_layers={num_moe_layers} is invalid; accepted: >= 1")
    if not 1 <= first <= last:
        raise ValueError(f"first={first}, last={last} are invalid; accepted: 1 <= first <= last")
    num_first = num_moe_layers // 2
    return [first] * num_first + [last] * (num_moe_layers - num_first)


def dense_equivalent(config: ModelConfig, top_k: int) -> ModelConfig:
    """The dense model with (about) the active parameters per token of an MoE model.

    Each MoE layer activates K experts of width H (plus the residual MLP of width H when
    `residual_mlp`, plus the shared expert), i.e. an FFN of width K*H (+H, +shared); a
    dense block activates `ffn_hidden`.
    The dense model gets one width for all blocks: the mean of those widths, rounded, so
    that with `moe_every=1` it is exactly K*H (+H). Router weights (D*E per layer) and the
    PR-MoE combine gate (a D x 2 linear) have no dense counterpart and are not matched.
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid; accepted: an integer >= 1")
    moe_width = top_k * config.expert_hidden + (config.expert_hidden if config.residual_mlp else 0)
    moe_width += config.shared_expert_hidden
    widths = [moe_width if n else config.ffn_hidden for n in config.experts_per_block()]
    ffn_hidden = max(1, math.floor(sum(widths) / len(widths) + 0.5))
    # Everything outside the FFNs (attention options included) stays the MoE model's.
    return dataclasses.replace(
        config,
        ffn_hidden=ffn_hidden,
        expert_schedule=[],
        moe_every=0,
        residual_mlp=False,
        ffn_kind=FFNKind.MLP,
        shared_expert_hidden=0,
        dense_layers=[],
    )
