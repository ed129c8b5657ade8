"""Reading a checkpoint into a model at any expert-parallel size.

For each expert stack (`moe.experts.Experts`) the loader reads the files of exactly the
experts the module holds, by global id, so resharding (saved at EP=4, loaded at EP=2 or
1) and loading a task subset are a choice of files. Every file read is checked against
its sha256 in meta.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe.checkpoint.files import (
    DENSE_FILE,
    EXTRA_FILE,
    LATEST_FILE,
    META_FILE,
    STEP_DIR,
    decode_state,
    expert_file,
    load_tensors,
    read_meta,
    read_verified,
    replaced_dir,
)
from moe.experts import Experts, expert_modules


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_checkpoint` read besides the weights it put into the model."""

    directory: Path
    step: int
    config: dict[str, Any]
    extra: dict[str, Any]
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None = field(default=None)


# --- loading ---------------------------------------------------------------------------


def resolve_latest(directory: str | Path) -> Path | None:
    """The step directory `directory/latest` points to; None when there is no checkpoint
    yet (no `latest`); ValueError when `latest` points to nothing. If a re-save of that
    step was killed between moving the old directory aside and moving the new one in,
    the old one, aside (`files.replaced_dir`)."""
    pointer = Path(directory) / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    target = Path(directory) / name
    aside = replaced_dir(Path(directory), name)
    if STEP_DIR.match(name) and not target.exists() and (aside / META_FILE).is_file():
        return aside
    if not STEP_DIR.match(name) or not (target / META_FILE).is_file():
        raise ValueError(f"{pointer} points to {name!r}, which is not a complete checkpoint")
    return target


def _expert_state(
    checkpoint: Path, meta: dict[str, Any], name: str, module: Experts
) -> dict[str, torch.Tensor]:
    layers = {layer["module"]: layer for layer in meta["moe_layers"]}
    if name not in layers:
        raise ValueError(
            f"checkpoint {checkpoint} has no MoE layer {name!r}; it has {list(layers)}"
        )
    layer = layers[name]
    missing = sorted(set(module.expert_ids) - set(layer["expert_ids"]))
    if missing:
        raise ValueError(
            f"{name} holds experts {list(module.expert_ids)} but checkpoint {checkpoint} has "
            f"only {layer['expert_ids']} of {layer['num_experts']} in that layer (missing "
            f"{missing})"
        )
    if layer["quantization"] != module.quantization:
        raise ValueError(
            f"checkpoint {checkpoint} stores {name} as quantization={layer['quantization']!r} "
            f"but the model's experts are {module.quantization!r}; build the model to match"
        )
    parts = [
        load_tensors(checkpoint, expert_file(layer["index"], global_id), meta)
        for global_id in module.expert_ids
    ]
    return {f"{name}.{key}": torch.cat([part[key] for part in parts]) for key in parts[0]}


def _check_fits(
    checkpoint: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{key}: {tuple(state[key].shape)} vs model {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the model: missing {missing}, unexpected "
            f"{unexpected}, shape mismatches {mismatched}"
        )


def load_checkpoint(
    checkpoint: str | Path,
    model: nn.Module,
    *,
    load_optimizer: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> LoadedCheckpoint:
    """Load a step directory into `model`: the dense weights and, for each expert stack,
    the experts it holds (any EP size, or a subset by global id). Every file read is checked
    against its sha256. With `load_optimizer`, also rank `rank`'s optimizer state, which
    needs the layout it was saved with (same world size and experts per rank). On any
    error the model is left unchanged."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    state = load_tensors(checkpoint, DENSE_FILE, meta)
    for alias, key in meta["dense_aliases"].items():
        state[alias] = state[key]
    modules = expert_modules(model)
    for name, module in modules:
        state.update(_expert_state(checkpoint, meta, name, module))
    _check_fits(checkpoint, state, model.state_dict())
    extra_tensors = (
        load_tensors(checkpoint, EXTRA_FILE, meta) if EXTRA_FILE in meta["files"] else {}
    )
    optimizer_state = None
    if load_optimizer:
        saved = {entry["rank"]: entry for entry in meta["ranks"]}
        here = {name: list(module.expert_ids) for name, module in modules}
        layout_saved = {k: list(v) for k, v in saved.get(rank, {}).get("experts", {}).items()}
        if meta["world_size"] != world_size or layout_saved != here:
            raise ValueError(
                f"optimizer state of {checkpoint} was saved by {meta['world_size']} ranks with "
                f"rank {rank} holding {layout_saved}; this run has world_size={world_size} and "
                f"holds {here}. Optimizer state does not reshard: load with load_optimizer=False"
            )
        if not saved[rank]["optimizer"]:
            raise ValueError(f"checkpoint {checkpoint} has no optimizer state for rank {rank}")
        stem = f"optimizer/rank_{rank:05d}"
        tensors = load_tensors(checkpoint, f"{stem}.safetensors", meta)
        encoded = json.loads(read_verified(checkpoint, f"{stem}.json", meta))
        optimizer_state = decode_state(encoded, tensors)
    # Everything was read and checked: only now change the model.
    model.load_state_dict(state, strict=True)
    return LoadedCheckpoint(
        directory=checkpoint,
        step=int(meta["step"]),
        config=meta["config"],
        extra=decode_state(meta["extra"], extra_tensors),
        meta=meta,
        optimizer_state=optimizer_state,
    )
