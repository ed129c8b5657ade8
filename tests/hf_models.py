"""Tiny random HuggingFace MoE models of every family, written by transformers itself.

`save_family(kind, directory)` builds a model with transformers' own config class (no
download), gives it a byte-level BPE tokenizer trained with `tokenizers` on a few books of
the shipped KJV (`tiny_tokenizer`, its eos token `<|endoftext|>` is the model's eos) and
writes both with `save_pretrained`. `layout="fused"` writes the expert weights as the
fused `gate_up_proj` stacks of transformers' in-memory modules instead of the per-expert
layout `save_pretrained` writes. Widths are chosen so that no two families share a shape
by accident and every q/k/v, expert and shared-expert width differs from the others (a
transposed or swapped tensor cannot fit).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

EOS = "<|endoftext|>"
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moe.data.kjv import read_books

    text = [body for _, _, _, body in read_books()[:3]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(text, trainer)
    return str(tokenizer.to_str())


def write_tokenizer(directory: Path, vocab_size: int = 320) -> int:
    """tokenizer.json + tokenizer_config.json into `directory`; returns the eos id."""
    from tokenizers import Tokenizer

    text = _tokenizer_json(vocab_size)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(text)
    config = {
        "eos_token": EOS,
        "model_max_length": 64,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return int(Tokenizer.from_str(text).token_to_id(EOS))


def family_config(
    kind: str, vocab_size: int = 320, eos: int | None = None, **overrides: Any
) -> Any:
    """A tiny config of `kind` (transformers' class), with `overrides`."""
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=eos,
        bos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    if kind == "mixtral":
        args = dict(common, intermediate_size=40, num_local_experts=6, num_experts_per_tok=2,
                    rope_theta=1e4)  # fmt: skip
        cls = transformers.MixtralConfig
    elif kind == "qwen2_moe":
        args = dict(common, intermediate_size=72, moe_intermediate_size=24,
                    shared_expert_intermediate_size=56, num_experts=6, num_experts_per_tok=2,
                    norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1])  # fmt: skip
        cls = transformers.Qwen2MoeConfig
    elif kind == "qwen3_moe":
        args = dict(common, intermediate_size=72, moe_intermediate_size=24, num_experts=6,
                    num_experts_per_tok=3, head_dim=16, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[])  # fmt: skip
        cls = transformers.Qwen3MoeConfig
    elif kind == "olmoe":
        args = dict(common, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                    clip_qkv=0.5, norm_topk_prob=False)  # fmt: skip
        cls = transformers.OlmoeConfig
    else:
        raise ValueError(kind)
    args.update(overrides)
    return cls(**args)


def build_model(config: Any, seed: int = 0) -> Any:
    """transformers' causal LM of `config`, random, fp32, eval mode. Norm gains and the
    shared-expert gate get random values too (transformers starts them at 1 and 0, which
    would hide a gain read from the wrong tensor)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias") or "shared_expert_gate" in name or ".gate.weight" in name:
                param.copy_(0.3 * torch.randn_like(param))
    return model


def ep_logits(
    rank: int, world_size: int, jobs: list[tuple[str, torch.Tensor]]
) -> list[tuple[torch.Tensor, list[list[int]]]]:
    """One EP rank (`tests.distributed_utils`): for each (checkpoint, tokens), the logits
    of the checkpoint loaded with experts split over the ranks, and the expert ids this
    rank holds per MoE layer. Here (not in a test module) so that spawned ranks import
    no transformers."""
    from launch.config import Backend, CommConfig
    from launch.runtime import ProcessInfo, dispatcher_factory, setup_runtime
    from moe.inference import load_model

    comm = CommConfig(ep_size=world_size, backend=Backend.GLOO)
    runtime = setup_runtime(comm, ProcessInfo(rank, world_size, rank, world_size))
    out = []
    for checkpoint, tokens in jobs:
        loaded = load_model(checkpoint, dispatcher_factory=dispatcher_factory(runtime, comm))
        held = [list(layer.experts.expert_ids) for _, layer in loaded.model.moe_layers()]
        with torch.no_grad():
            out.append((loaded.model(tokens).logits_BTV, held))
    return out


def save_family(
    kind: str, directory: Path, *, layout: str = "per_expert", seed: int = 0, **overrides: Any
) -> Any:
    """Build, and write with its tokenizer into `directory`, a tiny `kind` model."""
    eos = write_tokenizer(directory)
    config = family_config(kind, eos=eos, **overrides)
    model = build_model(config, seed)
    model.save_pretrained(directory)
    if layout == "fused":
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        (directory / "model.safetensors").unlink()
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return model


def train_rank(rank: int, world_size: int, config: Any) -> list[float]:
    """One rank of `launch.training.loop.train(config)` (`tests.distributed_utils`);
    returns its per-step global mean losses."""
    from launch.runtime import ProcessInfo
    from launch.training.loop import train

    info = ProcessInfo(rank=rank, world_size=world_size, local_rank=rank,
                       local_world_size=world_size)  # fmt: skip
    return list(train(config, info).losses)


def save_byte_family(kind: str, directory: Path, seed: int = 0, **overrides: Any) -> Any:
    """A `kind` model over bytes (vocabulary 256, no tokenizer files): what the byte
    corpora of this project can train and distill."""
    model = build_model(family_config(kind, vocab_size=256, **overrides), seed)
    model.save_pretrained(directory)
    return model
