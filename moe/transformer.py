"""The decoder-only MoE transformer language model.

Legend: B batch, T positions, D model width, V vocabulary, F dense FFN hidden width.

Block i: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)) (pre-norm), where FFN is an
`MoELayer` when (i + 1) % moe_every == 0 (see `moe.config`) and a dense FFN otherwise
(`DenseMLP`, or with `ffn_kind=expert` an `ExpertFFN`: one expert of the expert code).
A final RMSNorm precedes the output head, which reuses the embedding matrix when
`tie_embeddings` (computed as `F.linear(h, embed.weight)`, so no tensor is stored twice).

Initialisation (deterministic given `seed`): the embedding, the attention projections
and the untied output head ~ N(0, init_std^2), except the attention `out_proj`, which
writes into the residual stream, ~ N(0, init_std^2 / (2 * n_layers)) (GPT-2); RMSNorm
gains 1 (the q/k norms included), biases 0. Each of those parameters draws from its own generator seeded by (seed,
parameter name). Every FFN, dense or MoE, keeps its own initialisation (`moe.experts`: a
dense MLP is initialised like one expert, so the dense baseline starts like the MoE) and
is built under the global RNG forked and seeded by (seed, block index); so the weights
outside the experts do not depend on how many experts a rank holds. Construction never
advances the caller's global RNG.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.attention import AttentionCache, CausalSelfAttention, KVCache
from moe.config import FFNKind, ModelConfig
from moe.dispatchers import Dispatcher
from moe.experts import DenseMLP, ExpertFFN
from moe.layer import ExpertLayout, MoELayer
from routing import (
    CapacityOverride,
    PolicyState,
    RoutingConfig,
    RoutingStats,
    model_policy_state,
)
from routing.config import parse_enum

# (block index, the layer's expert count) -> the MoE layer's dispatcher.
DispatcherFactory = Callable[[int, int], Dispatcher]


class Block(nn.Module):
    """One pre-norm transformer block; the FFN is a `DenseMLP`, an `ExpertFFN` (dense,
    one expert of the expert code) or an `MoELayer`."""

    def __init__(self, config: ModelConfig, ffn: DenseMLP | ExpertFFN | MoELayer) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(
            config.d_model, config.n_heads, config.n_kv_heads, config.rope_theta,
            config.dropout, head_dim=config.head_dim, qkv_bias=config.qkv_bias,
            out_bias=config.out_bias, qk_norm=config.qk_norm, norm_eps=config.norm_eps,
            clip_qkv=config.clip_qkv,
        )  # fmt: skip
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = ffn
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x_BTD: torch.Tensor,
        task_ids_BT: torch.Tensor | None,
        cache: AttentionCache | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new residual stream and the MoE aux loss (None for a dense FFN).
        `rotary`: the positions' (cos, sin), shared by every block of one call."""
        y_BTD = self.attn(self.attn_norm(x_BTD), cache, rotary)
        x_BTD = x_BTD + self.residual_dropout(y_BTD)
        h_BTD = self.ffn_norm(x_BTD)
        aux_loss = None
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(h_BTD, task_ids_BT)
            y_BTD, aux_loss = out.y, out.aux_loss
        else:
            y_BTD = self.ffn(h_BTD)
        return x_BTD + self.residual_dropout(y_BTD), aux_loss


@dataclass(frozen=True)
class ModelOutput:
    """logits_BTV: next-token logits; aux_loss: sum of the MoE layers' (weighted) aux
    losses, a scalar (zero for a dense model)."""

    logits_BTV: torch.Tensor
    aux_loss: torch.Tensor


def _derived_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class MoETransformer(nn.Module):
    """Decoder-only LM over `config.vocab_size` tokens (bytes by default).

    `routing` configures every MoE layer (required when the model has one);
    `dispatcher_factory(block_index, num_experts)` builds each MoE layer's dispatcher
    (expert parallelism, task subsets); None keeps all experts local. `seed` makes construction deterministic.

    Causality: with dropless routing every position sees only its past. Capacity-limited
    routing (fixed, priority) is not strictly causal: which slots a token keeps depends on
    the other tokens of the batch, later positions included (as in GShard/Switch
    decoders), and so KV-cache decoding matches a full forward only when dropless.
    """

    def __init__(
        self,
        config: ModelConfig,
        routing: RoutingConfig | None = None,
        dispatcher_factory: DispatcherFactory | None = None,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if config.moe_layer_indices() and routing is None:
            raise ValueError(
                f"routing=None but moe_every={config.moe_every} gives MoE layers at blocks "
                f"{config.moe_layer_indices()}; pass a RoutingConfig or set moe_every=0"
            )
        self.config = config
        self.routing = routing
        # Built under a forked RNG: construction leaves the caller's global RNG alone.
        with torch.random.fork_rng(devices=[]):
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
            self.blocks = nn.ModuleList(
                self._build_block(index, num_experts, dispatcher_factory, seed)
                for index, num_experts in enumerate(config.experts_per_block())
            )
            self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
            self.lm_head = (
                None
                if config.tie_embeddings
                else nn.Linear(config.d_model, config.vocab_size, bias=False)
            )
        self._init_dense_weights(seed)

    def _build_block(
        self,
        index: int,
        num_experts: int,
        dispatcher_factory: DispatcherFactory | None,
        seed: int,
    ) -> Block:
        config = self.config
        torch.manual_seed(_derived_seed(seed, f"blocks.{index}"))
        ffn: DenseMLP | ExpertFFN | MoELayer
        if num_experts == 0 and config.ffn_kind == FFNKind.EXPERT:
            ffn = ExpertFFN(config.d_model, config.ffn_hidden, config.activation)
        elif num_experts == 0:
            ffn = DenseMLP(config.d_model, config.ffn_hidden, config.activation)
        else:
            assert self.routing is not None
            ffn = MoELayer(
                config.d_model,
                config.expert_hidden,
                num_experts,
                self.routing,
                activation=config.activation,
                residual_mlp=config.residual_mlp,
                dispatcher=(dispatcher_factory(index, num_experts) if dispatcher_factory else None),
                shared_expert_hidden=config.shared_expert_hidden,
                shared_expert_gate=config.shared_expert_gate,
            )
        return Block(config, ffn)

    @torch.no_grad()
    def _init_dense_weights(self, seed: int) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            # A model built on the meta device (a checkpoint's skeleton) has no values.
            if ".ffn." in name or param.is_meta:
                continue
            if "norm." in name:
                param.fill_(1.0)
                continue
            if name.endswith(".bias"):
                param.zero_()
                continue
            scale = residual_std if name.endswith("out_proj.weight") else std
            generator = torch.Generator().manual_seed(_derived_seed(seed, name))
            param.copy_(torch.randn(param.shape, generator=generator) * scale)

    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        """(block index, MoELayer) of every MoE block, in order."""
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoELayer)]

    def override_capacity(self, override: CapacityOverride | str) -> None:
        """Route every MoE layer with `override` from now on: `dropless` keeps every
        choice whatever the trained policy (DynaMoE included; its state is left alone),
        `trained` goes back to the policy the model was built with. The one switch for
        inference, distillation teachers and usage measurement."""
        chosen = parse_enum(CapacityOverride, override, "capacity override")
        for _, layer in self.moe_layers():
            layer.capacity_override = chosen

    @contextlib.contextmanager
    def capacity_override(self, override: CapacityOverride | str) -> Iterator[MoETransformer]:
        """`override_capacity(override)` inside the block; each layer's previous
        setting comes back afterwards."""
        previous = [(layer, layer.capacity_override) for _, layer in self.moe_layers()]
        self.override_capacity(override)
        try:
            yield self
        finally:
            for layer, setting in previous:
                layer.capacity_override = setting

    @contextlib.contextmanager
    def expert_layout(self, layout: ExpertLayout | str) -> Iterator[MoETransformer]:
        """Every MoE layer lays out its expert rows as `layout` inside the block
        (`moe.layer.ExpertLayout`: `padded` where every slot is kept and the experts are
        local, the usual layouts elsewhere); each layer's previous setting comes back."""
        chosen = parse_enum(ExpertLayout, layout, "expert layout")
        previous = [(layer, layer.expert_layout) for _, layer in self.moe_layers()]
        for layer, _ in previous:
            layer.expert_layout = chosen
        try:
            yield self
        finally:
            for layer, setting in previous:
                layer.expert_layout = setting

    def policy_state(self) -> PolicyState:
        """The state of the model's stateful routing policies, as the training loop
        drives it (`routing.PolicyState`; a no-op object when there is none)."""
        return model_policy_state(
            [(block, layer.capacity_state) for block, layer in self.moe_layers()]
        )

    def routing_stats(self) -> dict[int, RoutingStats]:
        """The last forward's RoutingStats of every MoE layer, by block index."""
        return {
            i: layer.last_stats for i, layer in self.moe_layers() if layer.last_stats is not None
        }

    def take_comm_time(self) -> float:
        """Seconds this rank spent in the MoE all-to-alls (counts and rows, forward and
        backward) since the last call, over all layers; 0 without expert parallelism."""
        total = 0.0
        for _, layer in self.moe_layers():
            timer = getattr(layer.dispatcher, "comm_timer", None)  # only EP dispatchers time
            if timer is not None:
                total += timer.take()
        return total

    def init_caches(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        """Empty KV caches (one per block) for incremental decoding."""
        param = self.embed.weight
        return [
            KVCache.empty(
                batch,
                self.config.n_kv_heads,
                max_len or self.config.max_seq_len,
                self.config.head_dim,
                param.device,
                param.dtype,
            )
            for _ in self.blocks
        ]

    def forward(
        self,
        tokens_BT: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        caches: list[AttentionCache] | None = None,
    ) -> ModelOutput:
        """tokens_BT (int64 in [0, V)) -> ModelOutput. `task_ids` is [B] (one task per
        sequence, broadcast to its tokens) or [B, T] (one per token: the inference
        engine packs several sequences into one row). With `caches` (one per block) the
        tokens continue what the caches hold, at the positions the caches give."""
        if tokens_BT.dim() != 2 or tokens_BT.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens have shape {tuple(tokens_BT.shape)} and dtype {tokens_BT.dtype}; "
                "expected an integer tensor [batch, seq_len]"
            )
        B, T = tokens_BT.shape
        if caches is None and tokens_BT.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {T} positions exceeds max_seq_len={self.config.max_seq_len}"
            )
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"got {len(caches)} KV caches for {len(self.blocks)} blocks")
        task_ids_BT = None
        if task_ids is not None:
            if task_ids.shape == (B,):
                task_ids_BT = task_ids[:, None].expand(B, T)
            elif task_ids.shape == (B, T):
                task_ids_BT = task_ids
            else:
                raise ValueError(
                    f"task_ids have shape {tuple(task_ids.shape)}; expected [{B}] (one task "
                    f"id per sequence) or [{B}, {T}] (one per token)"
                )
        x_BTD = self.embed(tokens_BT)
        aux_loss = x_BTD.new_zeros(())
        # Every block's cache holds the same positions: the rotary angles once per call
        # (one sin and cos instead of one per block; as transformers does).
        first = self.blocks[0]
        assert isinstance(first, Block)
        rotary = first.attn.rotary(T, caches[0] if caches else None, tokens_BT.device)
        for index, block in enumerate(self.blocks):
            cache = caches[index] if caches else None
            x_BTD, block_aux = block(x_BTD, task_ids_BT, cache, rotary)
            if block_aux is not None:
                aux_loss = aux_loss + block_aux
        h_BTD = self.final_norm(x_BTD)
        if self.lm_head is None:
            logits_BTV = F.linear(h_BTD, self.embed.weight)
        else:
            logits_BTV = self.lm_head(h_BTD)
        return ModelOutput(logits_BTV=logits_BTV, aux_loss=aux_loss)


@dataclass(frozen=True)
class LMLoss:
    """loss = ce + aux_loss (what to backpropagate); ce: mean next-token cross entropy
    in nats; aux_loss: the MoE layers' summed aux losses."""

    loss: torch.Tensor
    ce: torch.Tensor
    aux_loss: torch.Tensor


def lm_loss(output: ModelOutput, targets_BT: torch.Tensor, ignore_index: int = -100) -> LMLoss:
    """Cross entropy of `output.logits_BTV` against `targets_BT` (positions equal to
    `ignore_index` are skipped) plus the aux loss."""
    logits_BTV = output.logits_BTV
    if targets_BT.shape != logits_BTV.shape[:2]:
        raise ValueError(
            f"targets have shape {tuple(targets_BT.shape)}; expected {tuple(logits_BTV.shape[:2])}"
        )
    ce = F.cross_entropy(
        logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=ignore_index
    )
    return LMLoss(loss=ce + output.aux_loss, ce=ce, aux_loss=output.aux_loss)


def bits_per_byte(ce_nats: float, tokens_per_byte: float = 1.0) -> float:
    """Bits per byte from a mean cross entropy in nats per token: ce / ln 2 bits per token
    times the text's tokens per byte (1 for a byte-level model; about 1/4 for a BPE)."""
    return ce_nats / math.log(2) * tokens_per_byte
