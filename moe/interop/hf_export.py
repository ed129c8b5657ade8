"""Export a checkpoint of this project in the Mixtral layout that transformers loads.

    result = export_hf("runs/demo", "exported/demo")
    transformers.AutoModelForCausalLM.from_pretrained("exported/demo")

Writes `config.json` (`moe.interop.hf_config.mixtral_config_json`, which refuses by
feature what Mixtral cannot hold: dense blocks, a shared expert, the PR-MoE residual MLP,
the task or sigma router, unnormalised top-k weights, biases, q/k norm, clipping),
`generation_config.json`, the weights as `transformers`' `save_pretrained` writes a
Mixtral (`model.layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3.weight`, one
`model.safetensors` or shards of at most `shard_bytes` with their index) and the
checkpoint's tokenizer files (none for a byte-level model: its token ids are byte
values). A task subset (experts missing) and int8 experts are refused too.

Streaming, as the import: every checkpoint file is checked against its sha256 in chunks,
then read one tensor at a time through `safe_open`; each output tensor is written as it
is made. The directory appears complete or not at all (written aside, then renamed).
Routing: Mixtral routes dropless, as this project's engine does at inference; a model
trained with capacity limits computes there what it computes in the engine.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moe.checkpoint import read_meta
from moe.checkpoint.files import DENSE_FILE, expert_file, fsync_dir
from moe.checkpoint.stream import StreamingSafetensorsWriter, sha256_of_file, tensor_bytes
from moe.config import ModelConfig
from moe.inference.loading import checkpoint_tokenizer, configs_of, resolve_checkpoint, subset_ids
from moe.interop.hf_config import mixtral_config_json
from moe.interop.hf_import import CONFIG_FILE, INDEX_FILE, SINGLE_FILE

SHARD_BYTES = 5 * 2**30


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    tensors: int
    files: list[str]
    weight_bytes: int


@dataclass(frozen=True)
class Source:
    """One HF tensor: made from tensor `key` of checkpoint file `file` by `make`."""

    name: str
    file: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[torch.Tensor], torch.Tensor]


def _sources(
    config: ModelConfig, layers: list[dict[str, Any]], dtypes: dict[str, Any]
) -> list[Source]:
    """Every HF tensor of the Mixtral layout, in `save_pretrained`'s naming."""
    D, C, H = config.d_model, config.head_dim, config.expert_hidden
    q_rows, kv_rows = config.n_heads * C, config.n_kv_heads * C

    def dense(name: str, key: str, shape: tuple[int, ...], rows: slice | None = None) -> Source:
        make = (lambda t: t) if rows is None else (lambda t, r=rows: t[r])  # type: ignore[misc]
        return Source(name, DENSE_FILE, key, dtypes[key], shape, make)

    out = [dense("model.embed_tokens.weight", "embed.weight", (config.vocab_size, D))]
    for block in range(config.n_layers):
        layer, ours = f"model.layers.{block}", f"blocks.{block}"
        qkv = f"{ours}.attn.qkv_proj.weight"
        out += [
            dense(f"{layer}.input_layernorm.weight", f"{ours}.attn_norm.weight", (D,)),
            dense(f"{layer}.self_attn.q_proj.weight", qkv, (q_rows, D), slice(0, q_rows)),
            dense(f"{layer}.self_attn.k_proj.weight", qkv, (kv_rows, D),
                  slice(q_rows, q_rows + kv_rows)),
            dense(f"{layer}.self_attn.v_proj.weight", qkv, (kv_rows, D),
                  slice(q_rows + kv_rows, q_rows + 2 * kv_rows)),
            dense(f"{layer}.self_attn.o_proj.weight", f"{ours}.attn.out_proj.weight", (D, q_rows)),
            dense(f"{layer}.post_attention_layernorm.weight", f"{ours}.ffn_norm.weight", (D,)),
        ]  # fmt: skip
        moe = f"{layer}.block_sparse_moe"
        info = layers[block]
        out.append(dense(f"{moe}.gate.weight", f"{ours}.ffn.router.gate.weight",
                         (info["num_experts"], D)))  # fmt: skip
        for expert in range(info["num_experts"]):
            file = expert_file(info["index"], expert)
            for name, key, shape in (("w1", "w1_EDH", (H, D)), ("w2", "w2_EHD", (D, H)),
                                     ("w3", "w3_EDH", (H, D))):  # fmt: skip
                out.append(Source(f"{moe}.experts.{expert}.{name}.weight", file, key,
                                  dtypes[f"{file}:{key}"], shape, lambda t: t[0].t()))  # fmt: skip
    out.append(dense("model.norm.weight", "final_norm.weight", (D,)))
    if not config.tie_embeddings:
        out.append(dense("lm_head.weight", "lm_head.weight", (config.vocab_size, D)))
    return out


def _stored_dtypes(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Each stored tensor's dtype (dense keys, and `file:key` for expert files), from the
    safetensors headers; every file's sha256 checked first."""
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16}  # fmt: skip
    dtypes: dict[str, Any] = {}
    for relative, digest in meta["files"].items():
        if not relative.endswith(".safetensors") or relative.startswith("optimizer/"):
            continue
        path = directory / relative
        if not path.is_file() or sha256_of_file(path) != digest:
            raise ValueError(f"checkpoint file {path} is missing or corrupt (sha256 differs)")
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                stored = names.get(handle.get_slice(key).get_dtype())
                if stored is None:
                    raise ValueError(
                        f"{path}: {key} is not a float tensor; accepted: float experts"
                    )
                dtypes[key if relative == DENSE_FILE else f"{relative}:{key}"] = stored
    return dtypes


def _shards(sources: list[Source], shard_bytes: int) -> list[list[Source]]:
    shards: list[list[Source]] = [[]]
    size = 0
    for source in sources:
        nbytes = tensor_bytes(source.dtype, source.shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(source)
        size += nbytes
    return shards


def export_hf(
    checkpoint: str | Path, out: str | Path, *, shard_bytes: int = SHARD_BYTES
) -> ExportResult:
    """Write the Mixtral directory `out` of `checkpoint` (a step, checkpoints or run
    directory); refusals and streaming: see the module docstring."""
    directory = resolve_checkpoint(checkpoint)
    meta = read_meta(directory)
    model_config, routing = configs_of(meta)
    if subset_ids(meta) is not None:
        raise ValueError(
            f"checkpoint {directory} is a task subset (experts of each layer missing); "
            "accepted: a whole model"
        )
    stored = sorted({layer["quantization"] for layer in meta["moe_layers"]} - {"none"})
    if stored:
        raise ValueError(f"checkpoint {directory} stores {stored} experts; accepted: float experts")
    tokenizer = checkpoint_tokenizer(directory, meta)
    config_json = mixtral_config_json(model_config, routing, tokenizer.eos_token_id)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out={str(out)!r} exists and is not empty; accepted: a new directory")
    dtypes = _stored_dtypes(directory, meta)
    layers = {int(layer["module"].split(".")[1]): layer for layer in meta["moe_layers"]}
    sources = _sources(model_config, [layers[b] for b in range(model_config.n_layers)], dtypes)
    config_json["dtype"] = str(dtypes["embed.weight"]).removeprefix("torch.")
    temp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    temp.mkdir(parents=True)
    try:
        shards = _shards(sources, shard_bytes)
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]  # fmt: skip
        for name, shard in zip(names, shards):
            _write_shard(temp / name, shard, directory)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(tensor_bytes(s.dtype, s.shape) for s in sources)},
                "weight_map": {s.name: name for name, shard in zip(names, shards) for s in shard},
            }
            (temp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (temp / CONFIG_FILE).write_text(json.dumps(config_json, indent=2))
        generation = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
        (temp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        for name, data in tokenizer.files().items():
            (temp / name).write_bytes(data)
        fsync_dir(temp)
        if out.exists():
            out.rmdir()
        os.replace(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return ExportResult(out, len(sources), sorted(p.name for p in out.iterdir()),
                        sum(tensor_bytes(s.dtype, s.shape) for s in sources))  # fmt: skip


def _write_shard(path: Path, sources: list[Source], checkpoint: Path) -> None:
    specs = [(s.name, s.dtype, s.shape) for s in sources]
    with StreamingSafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer:
        for source in sources:
            with safe_open(checkpoint / source.file, framework="pt") as handle:
                tensor = source.make(handle.get_tensor(source.key)).contiguous()
            writer.write(source.name, tensor)
        writer.close()
