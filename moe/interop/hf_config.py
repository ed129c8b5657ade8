"""HuggingFace `config.json` <-> this project's `ModelConfig` and `RoutingConfig`.

`configs_from_hf(config_json)` reads a Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE config (by
`model_type`) into the one model's options, or refuses, naming the field and what is
supported, anything the model would not compute exactly: an unknown `model_type` or
architecture, active sliding-window attention, a rope scaling type, partial rotary
embeddings, an activation other than SwiGLU's SiLU, attention dropout, router jitter, a
quantized checkpoint. Absent fields take the defaults of transformers' own config
classes (`FAMILY_DEFAULTS`; a test checks them against transformers).
`mixtral_config_json(model, routing)` is the way back, for a model whose every feature
Mixtral has (`mixtral_refusals` names the others).

The per-family differences, as transformers' modeling files compute them, are written
down in docs/MODELS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe.config import Activation, ModelConfig, QKNorm
from routing import CapacityKind, RouterKind, RoutingConfig


@dataclass(frozen=True)
class Family:
    """One HF MoE family: its `model_type`, causal-LM class and config defaults."""

    model_type: str
    architecture: str
    defaults: dict[str, Any]


_COMMON: dict[str, Any] = {
    "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
    "initializer_range": 0.02, "tie_word_embeddings": False, "attention_dropout": 0.0,
    "rope_parameters": None, "rope_scaling": None, "quantization_config": None,
}  # fmt: skip
FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", "MixtralForCausalLM", {
        **_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "sliding_window": None,
        "num_experts_per_tok": 2, "num_local_experts": 8, "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0, "rope_theta": 1e6,
    }),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", {
        **_COMMON, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "use_sliding_window": False,
        "layer_types": None, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
        "norm_topk_prob": False, "router_aux_loss_coef": 0.001, "mlp_only_layers": [],
        "qkv_bias": True, "rope_theta": 10000.0,
    }),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", {
        **_COMMON, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 4,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "attention_bias": False,
        "use_sliding_window": False, "decoder_sparse_step": 1, "moe_intermediate_size": 768,
        "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False,
        "router_aux_loss_coef": 0.001, "mlp_only_layers": [], "rope_theta": 10000.0,
    }),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", {
        **_COMMON, "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048,
        "num_hidden_layers": 16, "num_attention_heads": 16, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "attention_bias": False, "clip_qkv": None,
        "num_experts_per_tok": 8, "num_experts": 64, "router_aux_loss_coef": 0.01,
        "norm_topk_prob": False, "rope_theta": 10000.0,
    }),
}  # fmt: skip


def _refuse(field: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"config.json: {field}={value!r} cannot be imported exactly; {supported}")


class HFConfig:
    """A config.json with its family's defaults for absent (or null) fields."""

    def __init__(self, data: dict[str, Any]) -> None:
        model_type = data.get("model_type")
        if model_type not in FAMILIES:
            raise _refuse("model_type", model_type, f"supported: {', '.join(sorted(FAMILIES))}")
        self.data = data
        self.family = FAMILIES[model_type]

    def get(self, key: str) -> Any:
        value = self.data.get(key)
        return self.family.defaults.get(key) if value is None else value

    def experts(self) -> int:
        """The routed expert count (Mixtral and Qwen3-MoE may write num_local_experts)."""
        for key in ("num_local_experts", "num_experts"):
            if self.data.get(key) is not None:
                return int(self.data[key])
        key = "num_local_experts" if "num_local_experts" in self.family.defaults else "num_experts"
        return int(self.family.defaults[key])

    def rope_theta(self) -> float:
        """theta of the default RoPE; any other rope type or partial rotation refused."""
        # transformers 5 writes rope_parameters; older files rope_theta and rope_scaling.
        theta = float(self.get("rope_theta"))
        for field in ("rope_scaling", "rope_parameters"):
            parameters = self.data.get(field) or {}
            rope_type = parameters.get("rope_type", parameters.get("type", "default"))
            if rope_type != "default":
                raise _refuse(f"{field}.rope_type", rope_type, "supported: default")
            if float(parameters.get("partial_rotary_factor", 1.0)) != 1.0:
                raise _refuse(
                    f"{field}.partial_rotary_factor",
                    parameters["partial_rotary_factor"],
                    "supported: 1.0 (every channel rotated)",
                )
            theta = float(parameters.get("rope_theta", theta))
        return theta

    def check_supported(self) -> None:
        """Refuse what the model cannot compute exactly (see the module docstring)."""
        family = self.family
        architectures = self.data.get("architectures") or [family.architecture]
        if list(architectures) != [family.architecture]:
            raise _refuse("architectures", architectures, f"supported: [{family.architecture}]")
        if self.data.get("quantization_config"):
            raise _refuse(
                "quantization_config", self.data["quantization_config"], "supported: none"
            )
        if self.get("hidden_act") != "silu":
            raise _refuse("hidden_act", self.get("hidden_act"), "supported: silu (SwiGLU)")
        if float(self.get("attention_dropout")):
            raise _refuse("attention_dropout", self.get("attention_dropout"), "supported: 0.0")
        if float(self.get("router_jitter_noise") or 0.0):
            raise _refuse("router_jitter_noise", self.get("router_jitter_noise"), "supported: 0.0")
        window = self.data.get("sliding_window")
        max_positions = int(self.get("max_position_embeddings"))
        if family.model_type == "mixtral" and window is not None and window < max_positions:
            raise _refuse(
                "sliding_window", window,
                f"supported: null or >= max_position_embeddings={max_positions} (inactive)",
            )  # fmt: skip
        if self.get("use_sliding_window"):
            raise _refuse("use_sliding_window", True, "supported: false")
        layer_types = self.get("layer_types") or []
        if any(kind != "full_attention" for kind in layer_types):
            raise _refuse("layer_types", layer_types, "supported: full_attention only")
        self.rope_theta()


def configs_from_hf(data: dict[str, Any]) -> tuple[ModelConfig, RoutingConfig | None, Family]:
    """The model and routing configs of a HF config.json (refusals: module docstring)."""
    config = HFConfig(data)
    config.check_supported()
    family = config.family
    kind = family.model_type
    hidden, heads = int(config.get("hidden_size")), int(config.get("num_attention_heads"))
    head_dim = int(config.get("head_dim") or hidden // heads)
    if kind == "olmoe" and head_dim * heads != hidden:
        raise _refuse(
            "head_dim", head_dim, f"OLMoE normalises q over hidden_size: head_dim * "
            f"num_attention_heads must equal hidden_size={hidden}",
        )  # fmt: skip
    num_experts = config.experts()
    is_qwen = kind in ("qwen2_moe", "qwen3_moe")
    sparse_step = int(config.get("decoder_sparse_step")) if is_qwen else 1
    layers = int(config.get("num_hidden_layers"))
    moe_every = sparse_step if num_experts > 0 and sparse_step <= layers else 0
    expert_key = "moe_intermediate_size" if is_qwen else "intermediate_size"
    shared = int(config.get("shared_expert_intermediate_size")) if kind == "qwen2_moe" else 0
    attention_bias = bool(config.get("attention_bias")) if kind != "qwen2_moe" else False
    clip = config.get("clip_qkv") if kind == "olmoe" else None
    qk_norm = {"qwen3_moe": QKNorm.HEAD, "olmoe": QKNorm.PROJECTION}.get(kind, QKNorm.NONE)
    model = ModelConfig(
        vocab_size=int(config.get("vocab_size")),
        d_model=hidden,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        max_seq_len=int(config.get("max_position_embeddings")),
        ffn_hidden=int(config.get("intermediate_size")),
        expert_hidden=int(config.get(expert_key)),
        num_experts=max(num_experts, 1),
        moe_every=moe_every,
        activation=Activation.SWIGLU,
        tie_embeddings=bool(config.get("tie_word_embeddings")),
        rope_theta=config.rope_theta(),
        init_std=float(config.get("initializer_range")),
        norm_eps=float(config.get("rms_norm_eps")),
        head_dim=head_dim,
        qkv_bias=bool(config.get("qkv_bias")) if kind == "qwen2_moe" else attention_bias,
        out_bias=attention_bias,
        qk_norm=qk_norm,
        clip_qkv=float(clip) if clip is not None else 0.0,
        shared_expert_hidden=shared if moe_every else 0,
        dense_layers=list(config.get("mlp_only_layers") or []) if moe_every else [],
    )
    if not model.moe_layer_indices():
        return model, None, family
    # Mixtral always renormalises the kept top-k probabilities; the others when asked.
    normalize = True if kind == "mixtral" else bool(config.get("norm_topk_prob"))
    routing = RoutingConfig(
        router=RouterKind.TOPK,
        top_k=int(config.get("num_experts_per_tok")),
        capacity=CapacityKind.DROPLESS,
        normalize_weights=normalize,
        normalize_top1=normalize,
        aux_loss_weight=float(config.get("router_aux_loss_coef")),
        z_loss_weight=0.0,
    )
    routing.validate_for(model.num_experts)
    return model, routing, family


# --- the way back: Mixtral --------------------------------------------------------------


def mixtral_refusals(model: ModelConfig, routing: RoutingConfig | None) -> list[str]:
    """What of `model` / `routing` the Mixtral layout cannot hold, by feature (empty: it
    can). Capacity-limited routing is not among them: Mixtral routes dropless, as the
    engine does at inference (docs/MODELS.md)."""
    out = []
    if routing is None or not model.moe_layer_indices():
        out.append("a dense model (Mixtral has an MoE layer in every block)")
    elif model.moe_layer_indices() != list(range(model.n_layers)):
        out.append(
            f"dense blocks (moe_every={model.moe_every}, dense_layers={model.dense_layers}; "
            "Mixtral has an MoE layer in every block)"
        )
    if model.expert_schedule and len(set(model.expert_schedule)) > 1:
        out.append(f"a PR-MoE pyramid (expert_schedule={model.expert_schedule})")
    if model.residual_mlp:
        out.append("the PR-MoE residual MLP (residual_mlp=true)")
    if model.shared_expert_hidden:
        out.append(f"a shared expert (shared_expert_hidden={model.shared_expert_hidden})")
    if model.activation != Activation.SWIGLU:
        out.append(f"{model.activation.value} experts (Mixtral's experts are SwiGLU)")
    if model.qkv_bias or model.out_bias:
        out.append("attention biases (qkv_bias / out_bias)")
    if model.qk_norm != QKNorm.NONE:
        out.append(f"q/k norm (qk_norm={model.qk_norm.value})")
    if model.clip_qkv:
        out.append(f"q/k/v clipping (clip_qkv={model.clip_qkv})")
    if routing is not None:
        if routing.router != RouterKind.TOPK:
            out.append(f"the {routing.router.value} router (Mixtral routes softmax top-k)")
        if not routing.normalize_weights or (routing.top_k == 1 and not routing.normalize_top1):
            out.append(
                "top-k weights that are not renormalised (normalize_weights=false, or top-1 "
                "without normalize_top1; Mixtral divides by the kept sum)"
            )
    return out


def mixtral_config_json(
    model: ModelConfig, routing: RoutingConfig | None, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The config.json of the Mixtral model that computes what `model` computes; a
    ValueError naming every feature it cannot hold."""
    refused = mixtral_refusals(model, routing)
    if refused:
        raise ValueError("the Mixtral layout cannot hold this model's " + "; ".join(refused))
    assert routing is not None
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": model.vocab_size, "hidden_size": model.d_model,
        "intermediate_size": model.expert_hidden, "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads, "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.head_dim, "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len, "initializer_range": model.init_std,
        "rms_norm_eps": model.norm_eps, "tie_word_embeddings": model.tie_embeddings,
        "rope_parameters": {"rope_theta": model.rope_theta, "rope_type": "default"},
        "sliding_window": None, "attention_dropout": 0.0,
        "num_experts_per_tok": routing.top_k,
        "num_local_experts": model.expert_schedule[0] if model.expert_schedule
        else model.num_experts,
        "router_aux_loss_coef": routing.aux_loss_weight, "router_jitter_noise": 0.0,
        "output_router_logits": False, "use_cache": True, "dtype": "float32",
        "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": None,
    }  # fmt: skip
