"""Build a model for inference from a checkpoint: full, expert-parallel, a task subset,
or int8.

The model's shape and routing come from the checkpoint's own `meta.json` (the run
config it was saved with), never from the user. A subset checkpoint (its meta lists,
per MoE layer, the global ids of the experts it holds) builds each MoE layer with only
those experts (a `LocalDispatcher` over the ids) and restricts the layer's router to
them. A checkpoint stored int8 builds int8 experts; `quantize="int8"` quantizes a float
checkpoint's experts after loading. `precision="bf16"` casts the parameters to bf16
(half the weight memory and half the bytes a decode step reads; the engine then keeps
its KV cache in bf16 and samples from fp32 logits); the int8 experts' scales are
buffers and stay fp32, their activations are bf16. A checkpoint pruned 2:4
(`launch.prune`) runs its experts on sparse tensor cores (`moe.pruning.semi_structured`)
when it is loaded onto a CUDA device of compute capability 8.0 or more
(`semi_structured`: None = then, True = always, or fail, False = never), in the
precision's half type (fp16 for fp16, bf16 otherwise: the sparse kernels take no fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe.checkpoint import load_checkpoint, read_meta, resolve_latest
from moe.checkpoint.files import read_verified
from moe.config import ModelConfig
from moe.dispatchers import Dispatcher, LocalDispatcher
from moe.interop.tokenizer import TOKENIZER_FILES, ByteTokenizer, Tokenizer, tokenizer_from_files
from moe.precision import FULL_PRECISION, ComputePrecision, ResolvedPrecision, resolve_precision
from moe.transformer import DispatcherFactory, MoETransformer
from routing import RoutingConfig

QUANTIZATIONS = ("none", "int8")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the engine, and what its checkpoint says about it.

    `subset`: the subset description a subset checkpoint carries (task, routing,
    coverage, expert ids per layer), None for a whole model. `task_ids`: the task ids
    requests may name (None: the model does not restrict them)."""

    model: MoETransformer
    checkpoint: Path
    step: int
    run_config: dict[str, Any]
    subset: dict[str, Any] | None
    task_ids: list[int] | None
    tokenizer: Tokenizer = field(default_factory=ByteTokenizer)
    precision: ResolvedPrecision = FULL_PRECISION


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from a step directory, a run's `checkpoints/` directory or a
    run directory (their latest step)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for directory in (path, path / "checkpoints"):
        if (directory / "latest").is_file():
            latest = resolve_latest(directory)
            assert latest is not None
            return latest
    raise ValueError(
        f"checkpoint={str(path)!r} is not a checkpoint; accepted: a step directory (with "
        "meta.json), a checkpoints/ directory or a run directory (with checkpoints/latest)"
    )


def configs_of(meta: dict[str, Any]) -> tuple[ModelConfig, RoutingConfig | None]:
    """The model and routing configs a checkpoint was saved with."""
    config = meta.get("config", {})
    if "model" not in config:
        raise ValueError(
            "the checkpoint's meta.json has no config.model; accepted: checkpoints written by "
            "launch.train, launch.subset or launch.distill"
        )
    model_config = ModelConfig(**config["model"])
    routing = RoutingConfig(**config["routing"]) if config.get("routing") else None
    if not model_config.moe_layer_indices():
        routing = None
    return model_config, routing


def subset_ids(meta: dict[str, Any]) -> dict[str, list[int]] | None:
    """Module name -> global expert ids, when the checkpoint holds a subset."""
    held = {layer["module"]: list(layer["expert_ids"]) for layer in meta["moe_layers"]}
    whole = all(
        ids == list(range(layer["num_experts"]))
        for ids, layer in zip(held.values(), meta["moe_layers"])
    )
    return None if whole else held


def load_model(
    checkpoint: str | Path,
    *,
    quantize: str = "none",
    dispatcher_factory: DispatcherFactory | None = None,
    device: torch.device | str = "cpu",
    precision: ComputePrecision | str = ComputePrecision.FP32,
    semi_structured: bool | None = None,
) -> LoadedModel:
    """Build the checkpoint's model (dispatchers from `dispatcher_factory` for expert
    parallelism; a subset's own dispatchers otherwise), load it, quantize its experts
    when asked or when the checkpoint stores them int8, and cast its parameters to
    `precision` (`moe.precision`: fp32, bf16, fp16 on CUDA, or auto); 2:4 experts go
    semi-structured (module docstring). Eval mode."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is invalid; accepted: {', '.join(QUANTIZATIONS)}")
    resolved = resolve_precision(precision, torch.device(device), key="precision")
    directory = resolve_checkpoint(checkpoint)
    meta = read_meta(directory)
    model_config, routing = configs_of(meta)
    held = subset_ids(meta)
    factory = dispatcher_factory
    if held is not None:
        if dispatcher_factory is not None:
            raise ValueError(
                f"checkpoint {directory} is a task subset; it runs in one process (no expert "
                "parallelism): launch it without torchrun"
            )
        factory = _subset_factory(held)
    seed = int(meta["config"].get("train", {}).get("seed", 0))
    model = MoETransformer(model_config, routing, factory, seed=seed)
    if held is not None:
        for block, layer in model.moe_layers():
            layer.router.restrict(held[f"blocks.{block}.ffn.experts"])
    stored = {layer["quantization"] for layer in meta["moe_layers"]}
    if stored - {"none"}:
        _quantize(model)
    loaded = load_checkpoint(directory, model)
    if quantize == "int8" and stored == {"none"}:
        _quantize(model)
    model.to(device).eval()
    cast_parameters(model, resolved.dtype)
    pruned = loaded.extra.get("pruning") or {}
    if semi_structured is None:
        from moe.pruning.semi_structured import semi_structured_available

        semi_structured = pruned.get("pattern") == "2:4" and semi_structured_available(device)
    if semi_structured:
        from moe.pruning.semi_structured import use_semi_structured

        use_semi_structured(model, resolved.dtype if resolved.mixed else torch.bfloat16)
    subset = loaded.extra.get("subset")
    task_ids: list[int] | None = None
    if subset is not None and subset.get("task") is not None:
        task_ids = [int(subset["task"])]
    elif routing is not None and routing.needs_task_ids:
        task_ids = list(range(routing.num_tasks))
    tokenizer = checkpoint_tokenizer(directory, meta)
    return LoadedModel(
        model, directory, loaded.step, meta["config"], subset, task_ids, tokenizer, resolved
    )


@torch.no_grad()
def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Every parameter of `model` to `dtype`, in place, for inference. Buffers keep their
    dtype: the int8 experts' per-channel scales are buffers and stay fp32 (bf16 scales
    would add a rounding error of up to 2^-9 to every output channel)."""
    for param in model.parameters():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)


def checkpoint_tokenizer(directory: Path, meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a checkpoint carries (its tokenizer files, checksums verified, among
    the files of meta.json), or bytes when it carries none."""
    files = {
        name: read_verified(directory, name, meta)
        for name in TOKENIZER_FILES
        if name in meta.get("files", {})
    }
    return tokenizer_from_files(files, f"checkpoint {directory}")


def _subset_factory(held: dict[str, list[int]]) -> DispatcherFactory:
    def factory(block: int, num_experts: int) -> Dispatcher:
        name = f"blocks.{block}.ffn.experts"
        if name not in held:
            raise ValueError(f"the subset checkpoint lists no experts for MoE layer {name}")
        return LocalDispatcher(num_experts, held[name])

    return factory


def _quantize(model: MoETransformer) -> None:
    from moe.inference.quant import quantize_experts

    quantize_experts(model)
