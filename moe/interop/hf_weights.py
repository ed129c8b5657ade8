"""Which HF tensors make each tensor of the model, and how (the import's recipes).

Every tensor of a checkpoint (the dense state-dict keys, and each expert's `w1_EDH`,
`w3_EDH`, `w2_EHD` sliced to one expert) gets a `Recipe`: the HF tensors it is made of
(`HFSlice`: a key, the shape the HF file must hold, and for stacked experts which row)
and how they combine (`Combine`):

    COPY        the one source as it is (embeddings, norms, o_proj, routers, dense MLPs);
    ROWS        sources concatenated along dim 0 (q, k, v -> the fused `qkv_proj`);
    EXPERT      the source's last two dims transposed, a leading 1 added: an HF
                nn.Linear weight [H, D] (or one expert row of a fused stack) becomes our
                x @ w layout [1, D, H].

Expert layouts on disk, both read: per expert (`experts.{e}.w1/w3/w2.weight`, Mixtral's
names, or `experts.{e}.gate_proj/up_proj/down_proj.weight`) and fused stacks
(`experts.gate_up_proj` [E, 2H, D], gate rows first, and `experts.down_proj` [E, D, H]),
under `block_sparse_moe.` (Mixtral as saved by transformers) or `mlp.`. Our SwiGLU is
silu(x w1) * (x w3) -> w2, so w1 is HF's gate, w3 its up; `moe.experts.DenseMLP` calls
the silu'd projection `up` and the multiplier `gate` (HF's gate_proj and up_proj).

Legend: D model width, H expert hidden width, E experts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

import torch

from moe.config import ModelConfig


class Combine(str, Enum):
    COPY = "copy"
    ROWS = "rows"
    EXPERT = "expert"


@dataclass(frozen=True)
class HFSlice:
    """HF tensor `key`, which must have `shape`; `expert`: read only that row of a
    stacked [E, ...] tensor; `half`: then only the gate (0) or up (1) half of its rows."""

    key: str
    shape: tuple[int, ...]
    expert: int | None = None
    half: int | None = None

    def read(self, get_slice: Callable[[str], object]) -> torch.Tensor:
        """The slice, read through `get_slice(key)` (a safetensors slice: only the
        requested rows are read from disk)."""
        source = get_slice(self.key)
        if self.expert is None:
            return source[:]  # type: ignore[index]
        rows = self.shape[1] // 2
        if self.half is None:
            return source[self.expert : self.expert + 1][0]  # type: ignore[index]
        start = self.expert, self.half * rows
        return source[start[0] : start[0] + 1, start[1] : start[1] + rows][0]  # type: ignore[index]


@dataclass(frozen=True)
class Recipe:
    """How our tensor `name` (shape `shape`) is made of `sources`."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[HFSlice, ...]
    combine: Combine

    def build(self, get_slice: Callable[[str], object]) -> torch.Tensor:
        parts = [source.read(get_slice) for source in self.sources]
        if self.combine == Combine.ROWS:
            tensor = torch.cat(parts, dim=0)
        elif self.combine == Combine.EXPERT:
            tensor = parts[0].transpose(-1, -2).unsqueeze(0)
        else:
            tensor = parts[0]
        tensor = tensor.contiguous()
        assert tuple(tensor.shape) == self.shape, (self.name, tuple(tensor.shape), self.shape)
        return tensor


@dataclass(frozen=True)
class ExpertLayout:
    """Where one MoE layer's experts live in the HF files."""

    prefix: str  # "model.layers.{i}.mlp" or "...block_sparse_moe"
    fused: bool
    names: tuple[str, str, str]  # (gate, up, down) per-expert names: w1/w3/w2 or *_proj


_PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def expert_layout(keys: Mapping[str, object], block: int) -> ExpertLayout:
    """The layout of block `block`'s experts in `keys` (the HF tensor names), or a
    ValueError naming the router key that is missing."""
    for name in ("mlp", "block_sparse_moe"):
        prefix = f"model.layers.{block}.{name}"
        if f"{prefix}.gate.weight" not in keys:
            continue
        if f"{prefix}.experts.gate_up_proj" in keys:
            return ExpertLayout(prefix, True, ("gate_up_proj", "gate_up_proj", "down_proj"))
        for names in _PER_EXPERT_NAMES:
            if f"{prefix}.experts.0.{names[0]}.weight" in keys:
                return ExpertLayout(prefix, False, names)
        raise ValueError(
            f"missing tensor {prefix}.experts.gate_up_proj (or per-expert "
            f"{prefix}.experts.0.gate_proj.weight / .w1.weight)"
        )
    raise ValueError(f"missing tensor model.layers.{block}.mlp.gate.weight (the router)")


def expert_recipes(
    layout: ExpertLayout, expert: int, num_experts: int, d_model: int, d_hidden: int
) -> list[Recipe]:
    """The recipes of one expert's file: w1_EDH, w3_EDH [1, D, H] and w2_EHD [1, H, D]."""
    D, H = d_model, d_hidden
    gate, up, down = layout.names
    base = f"{layout.prefix}.experts"
    if layout.fused:
        gate_up = (num_experts, 2 * H, D)
        sources = {
            "w1_EDH": HFSlice(f"{base}.{gate}", gate_up, expert, 0),
            "w3_EDH": HFSlice(f"{base}.{up}", gate_up, expert, 1),
            "w2_EHD": HFSlice(f"{base}.{down}", (num_experts, D, H), expert),
        }
    else:
        sources = {
            "w1_EDH": HFSlice(f"{base}.{expert}.{gate}.weight", (H, D)),
            "w3_EDH": HFSlice(f"{base}.{expert}.{up}.weight", (H, D)),
            "w2_EHD": HFSlice(f"{base}.{expert}.{down}.weight", (D, H)),
        }
    shapes = {"w1_EDH": (1, D, H), "w3_EDH": (1, D, H), "w2_EHD": (1, H, D)}
    return [Recipe(k, shapes[k], (sources[k],), Combine.EXPERT) for k in shapes]


def dense_recipe(
    name: str, shape: tuple[int, ...], config: ModelConfig, layouts: Mapping[int, ExpertLayout]
) -> Recipe:
    """The recipe of dense state-dict key `name` (of shape `shape` in our model)."""
    parts = name.split(".")
    if parts[0] != "blocks" or parts[2:4] != ["attn", "qkv_proj"]:
        return Recipe(name, shape, (HFSlice(_dense_key(name, layouts), shape),), Combine.COPY)
    block, kind = int(parts[1]), parts[4]  # weight or bias
    q_rows = config.n_heads * config.head_dim
    kv_rows = config.n_kv_heads * config.head_dim
    tail = shape[1:]
    sources = tuple(
        HFSlice(f"model.layers.{block}.self_attn.{proj}_proj.{kind}", (rows, *tail))
        for proj, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))
    )
    return Recipe(name, shape, sources, Combine.ROWS)


# Our DenseMLP's names -> HF's (the silu'd projection is our `up`, HF's gate_proj).
_MLP_NAMES = {"up": "gate_proj", "gate": "up_proj", "down": "down_proj"}


def _dense_key(name: str, layouts: Mapping[int, ExpertLayout]) -> str:
    """The HF key of a dense tensor that is copied as it is."""
    top = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if name in top or name == "lm_head.weight":
        return top.get(name, name)
    parts = name.split(".")
    block, rest = int(parts[1]), parts[2:]
    layer = f"model.layers.{block}"
    simple = {
        "attn_norm.weight": f"{layer}.input_layernorm.weight",
        "ffn_norm.weight": f"{layer}.post_attention_layernorm.weight",
        "attn.out_proj.weight": f"{layer}.self_attn.o_proj.weight",
        "attn.out_proj.bias": f"{layer}.self_attn.o_proj.bias",
        "attn.q_norm.weight": f"{layer}.self_attn.q_norm.weight",
        "attn.k_norm.weight": f"{layer}.self_attn.k_norm.weight",
    }
    joined = ".".join(rest)
    if joined in simple:
        return simple[joined]
    if rest[0] != "ffn":
        raise AssertionError(f"no HF tensor for {name}")
    if block in layouts:  # an MoE layer: router, shared expert and its gate
        prefix = layouts[block].prefix
        if rest[1:] == ["router", "gate", "weight"]:
            return f"{prefix}.gate.weight"
        if rest[1:] == ["shared_expert_gate", "weight"]:
            return f"{prefix}.shared_expert_gate.weight"
        if rest[1] == "shared_expert":
            return f"{prefix}.shared_expert.{_MLP_NAMES[rest[2]]}.weight"
        raise AssertionError(f"no HF tensor for {name}")
    return f"{layer}.mlp.{_MLP_NAMES[rest[1]]}.weight"  # a dense block's MLP


def ignorable(key: str) -> bool:
    """HF tensors that hold nothing the model needs: RoPE frequency buffers (derived from
    rope_theta) that old checkpoints saved."""
    return key.endswith("rotary_emb.inv_freq")
