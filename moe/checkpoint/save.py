"""Writing a checkpoint: each rank writes its shard into a temporary directory, rank 0
merges the manifests into meta.json and publishes the directory atomically.

The phases (`begin_checkpoint`, `write_checkpoint_shard`, `finalize_checkpoint`) are
public so that one process can write the shards of several simulated ranks;
`save_checkpoint` runs them, with an explicit process group when distributed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe.checkpoint.files import (
    DENSE_FILE,
    EXTRA_FILE,
    FORMAT,
    FORMAT_VERSION,
    LATEST_FILE,
    META_FILE,
    STEP_DIR,
    encode_state,
    expert_file,
    fsync_dir,
    replaced_dir,
    save_tensors,
    sha256_hex,
    write_bytes,
)
from moe.experts import expert_modules


@dataclass(frozen=True)
class ShardManifest:
    """What one rank wrote: its experts per module (name -> ascending global ids), in
    module order, their storage (name -> "none" | "int8"), and the sha256 of every file
    it wrote (path relative to the step dir)."""

    rank: int
    experts: dict[str, list[int]]
    files: dict[str, str]
    has_optimizer: bool
    dense_aliases: dict[str, str] = field(default_factory=dict)
    quantization: dict[str, str] = field(default_factory=dict)


# --- saving --------------------------------------------------------------------------


def _temp_dir(directory: Path, step: int) -> Path:
    return directory / f".step_{step}.tmp"


def begin_checkpoint(directory: str | Path, step: int) -> Path:
    """Create a fresh temporary step directory in `directory` (removing leftovers of
    interrupted saves) and return it. Rank 0 only, before the ranks write."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} is invalid; accepted: an integer >= 0")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".step_*.tmp"):
        shutil.rmtree(stale)
    temp = _temp_dir(directory, step)
    temp.mkdir()
    return temp


def write_checkpoint_shard(
    temp_dir: str | Path,
    model: nn.Module,
    optimizer_state: dict[str, Any] | None = None,
    *,
    rank: int = 0,
    write_dense: bool | None = None,
) -> ShardManifest:
    """Write this rank's files: its experts, its optimizer state, and (rank 0 by default)
    the dense weights. Returns the manifest `finalize_checkpoint` needs."""
    temp = Path(temp_dir)
    modules = expert_modules(model)
    expert_keys = {f"{name}.{key}" for name, module in modules for key in module.state_dict()}
    files: dict[str, str] = {}
    aliases: dict[str, str] = {}
    if write_dense is None:
        write_dense = rank == 0
    if write_dense:
        dense: dict[str, torch.Tensor] = {}
        seen: dict[tuple[Any, ...], str] = {}
        for key, tensor in model.state_dict().items():
            if key in expert_keys:
                continue
            identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            if identity in seen and tensor.numel() > 0:  # tied weights: stored once
                aliases[key] = seen[identity]
                continue
            seen[identity] = key
            dense[key] = tensor.detach().to("cpu").contiguous().clone()
        files[DENSE_FILE] = save_tensors(temp, DENSE_FILE, dense)
    experts: dict[str, list[int]] = {}
    quantization: dict[str, str] = {}
    for layer, (name, module) in enumerate(modules):
        experts[name] = list(module.expert_ids)
        quantization[name] = module.quantization
        for key, tensor in module.state_dict().items():
            if tensor.dim() == 0 or tensor.shape[0] != module.num_experts:
                raise ValueError(
                    f"{name}.{key} has shape {tuple(tensor.shape)}; accepted: stacked over the "
                    f"module's {module.num_experts} local experts (leading dimension)"
                )
        for local, global_id in enumerate(module.expert_ids):
            expert = {
                k: t.detach().to("cpu").clone() for k, t in module.expert_state(local).items()
            }
            relative = expert_file(layer, global_id)
            files[relative] = save_tensors(temp, relative, expert)
    if optimizer_state is not None:
        tensors: dict[str, torch.Tensor] = {}
        encoded = encode_state(optimizer_state, tensors)
        stem = f"optimizer/rank_{rank:05d}"
        files[f"{stem}.safetensors"] = save_tensors(temp, f"{stem}.safetensors", tensors)
        data = json.dumps(encoded).encode()
        write_bytes(temp / f"{stem}.json", data)
        files[f"{stem}.json"] = sha256_hex(data)
    return ShardManifest(rank, experts, files, optimizer_state is not None, aliases, quantization)


def _merge_layout(
    manifests: list[ShardManifest], layer_num_experts: dict[str, int] | None
) -> list[dict[str, Any]]:
    """The MoE layers (module, global expert count, the global ids held, storage).

    Without `layer_num_experts` the ranks' experts must tile 0..E-1 (replicas on
    data-parallel ranks hold identical ranges): a whole model. With it (module name ->
    global E), the ranks may hold any subset of 0..E-1: a task subset checkpoint."""
    names = list(manifests[0].experts)
    layers = []
    for manifest in manifests:
        if list(manifest.experts) != names:
            raise ValueError(
                f"rank {manifest.rank} has expert modules {list(manifest.experts)} but rank "
                f"{manifests[0].rank} has {names}; accepted: the same model on every rank"
            )
    for index, name in enumerate(names):
        held = sorted({tuple(manifest.experts[name]) for manifest in manifests})
        expert_ids = sorted({i for ids in held for i in ids})
        if layer_num_experts is None:
            num_experts = sum(len(ids) for ids in held)
            if expert_ids != list(range(num_experts)):
                raise ValueError(f"{name}: the ranks' experts {held} do not tile 0..E-1")
        else:
            num_experts = layer_num_experts[name]
            if not expert_ids or expert_ids[-1] >= num_experts:
                raise ValueError(
                    f"{name}: experts {expert_ids} are not a subset of 0..{num_experts - 1}"
                )
        layers.append({
            "index": index, "module": name, "num_experts": num_experts,
            "expert_ids": expert_ids,
            "quantization": manifests[0].quantization.get(name, "none"),
        })  # fmt: skip
    return layers


def finalize_checkpoint(
    temp_dir: str | Path,
    manifests: list[ShardManifest],
    *,
    step: int,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    layer_num_experts: dict[str, int] | None = None,
    attachments: dict[str, bytes] | None = None,
) -> Path:
    """Rank 0, after every rank wrote its shard: write meta.json, rename the temporary
    directory to `step_N`, point `latest` at it, prune to `keep_last` step directories.
    `layer_num_experts` (module name -> global E) marks a subset checkpoint (see
    `_merge_layout`). `attachments`: more files (name -> contents, e.g. the tokenizer's
    `tokenizer.json`), written beside meta.json and checksummed like the weights."""
    temp = Path(temp_dir)
    directory = temp.parent
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last={keep_last} is invalid; accepted: None or >= 1")
    ranks = sorted(manifest.rank for manifest in manifests)
    if ranks != list(range(len(manifests))):
        raise ValueError(f"manifests come from ranks {ranks}; accepted: 0..world_size-1 once each")
    manifests = sorted(manifests, key=lambda manifest: manifest.rank)
    files: dict[str, str] = {}
    for manifest in manifests:
        for relative, digest in manifest.files.items():
            if files.setdefault(relative, digest) != digest:
                raise ValueError(
                    f"ranks wrote different contents to {relative} (replicas diverged)"
                )
    if DENSE_FILE not in files:
        raise ValueError("no rank wrote the dense weights; accepted: exactly one write_dense rank")
    for name, data in (attachments or {}).items():
        if Path(name).name != name or name in files or name in (META_FILE, EXTRA_FILE):
            raise ValueError(
                f"attachment {name!r} is invalid; accepted: a plain file name that is not "
                f"{META_FILE}, {EXTRA_FILE} or a weight file"
            )
        write_bytes(temp / name, data)
        files[name] = sha256_hex(data)
    tensors: dict[str, torch.Tensor] = {}
    encoded_extra = encode_state(extra or {}, tensors)
    if tensors:
        files[EXTRA_FILE] = save_tensors(temp, EXTRA_FILE, tensors)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "config": config,
        "extra": encoded_extra,
        "world_size": len(manifests),
        "ep_size": len({tuple(tuple(ids) for ids in m.experts.values()) for m in manifests}),
        "moe_layers": _merge_layout(manifests, layer_num_experts),
        "dense_aliases": {k: v for m in manifests for k, v in m.dense_aliases.items()},
        "ranks": [
            {"rank": m.rank, "experts": m.experts, "optimizer": m.has_optimizer} for m in manifests
        ],
        "files": dict(sorted(files.items())),
    }
    try:
        text = json.dumps(meta, indent=1)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"config is not JSON-serialisable ({error}); pass plain containers"
        ) from None
    write_bytes(temp / META_FILE, text.encode())
    final = directory / f"step_{step}"
    if final.exists():
        # A re-save of this step (e.g. a run that crashed after publishing step_N but before
        # moving `latest` resumes and reaches step N again, or a Ray restart from the last
        # checkpoint Ray was told of, older than `latest`): replace the directory whole.
        # Two renames, not one atomic swap: a kill between them leaves the old step only
        # as `trash`, which `resolve_latest` takes while `latest` still names the step.
        trash = replaced_dir(directory, final.name)
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(temp, final)
        shutil.rmtree(trash)
    else:
        os.replace(temp, final)
    write_bytes(directory / LATEST_FILE, f"{final.name}\n".encode())
    fsync_dir(directory)
    # `latest` names the new step: an old step left aside by a killed re-save is no
    # longer anyone's fallback.
    for stale in directory.glob(".step_*.replaced"):
        shutil.rmtree(stale)
    if keep_last is not None:
        steps = sorted(
            (int(m.group(1)), path)
            for path in directory.iterdir()
            if (m := STEP_DIR.match(path.name)) and path.is_dir()
        )
        for _, path in steps[:-keep_last]:
            if path != final:
                shutil.rmtree(path)
    return final


def _in_step(action: Callable[[], Any] | None, group: dist.ProcessGroup) -> list[Any]:
    """Run `action` on the ranks that have one, then tell every rank every result; raise
    on every rank if one failed (the failing rank re-raises its own exception)."""
    outcome: tuple[bool, Any]
    error: BaseException | None = None
    try:
        outcome = (True, action() if action is not None else None)
    except Exception as exception:  # shared with the other ranks, then re-raised below
        error = exception
        outcome = (False, f"{type(exception).__name__}: {exception}")
    outcomes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(outcomes, outcome, group=group)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (ok, message) in enumerate(outcomes) if not ok]
    if failed:
        raise RuntimeError(f"checkpoint save failed on rank {failed[0][0]}: {failed[0][1]}")
    return [value for _, value in outcomes]


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer_state: dict[str, Any] | None,
    step: int,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    keep_last: int | None = None,
    layer_num_experts: dict[str, int] | None = None,
    attachments: dict[str, bytes] | None = None,
) -> Path:
    """Save `model` (and this rank's `optimizer_state`) as `directory/step_{step}`.

    Single process: `group=None`. Distributed: every rank of `group` calls this with its
    own model shard; rank 0 writes the dense weights and meta.json. Returns the step dir.
    `layer_num_experts`, `attachments` (rank 0's are written): see `finalize_checkpoint`.
    """
    directory = Path(directory)
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last={keep_last} is invalid; accepted: None or >= 1")
    if group is None:
        temp = begin_checkpoint(directory, step)
        try:
            manifest = write_checkpoint_shard(temp, model, optimizer_state, rank=0)
            return finalize_checkpoint(
                temp, [manifest], step=step, config=config, extra=extra,
                keep_last=keep_last, layer_num_experts=layer_num_experts,
                attachments=attachments,
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    rank = dist.get_rank(group)
    temp = _temp_dir(directory, step)
    _in_step((lambda: begin_checkpoint(directory, step)) if rank == 0 else None, group)
    try:
        manifests = _in_step(
            lambda: write_checkpoint_shard(temp, model, optimizer_state, rank=rank), group
        )

        def finalize() -> Path:
            return finalize_checkpoint(
                temp, manifests, step=step, config=config, extra=extra,
                keep_last=keep_last, layer_num_experts=layer_num_experts,
                attachments=attachments,
            )  # fmt: skip

        paths = _in_step(finalize if rank == 0 else None, group)
    except BaseException:
        if rank == 0:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    return Path(paths[0])
