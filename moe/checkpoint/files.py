"""The files of a checkpoint: names, sha256-checked reads, durable writes, meta.json,
and nested state (optimizer state, `extra`) as JSON + safetensors (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

FORMAT = "moe-checkpoint"
FORMAT_VERSION = 2
# Version 1 recorded each rank's experts as (offset, count) and had no per-layer
# `expert_ids` / `quantization`; `read_meta` upgrades it in memory.
META_FILE = "meta.json"
DENSE_FILE = "dense.safetensors"
EXTRA_FILE = "extra.safetensors"
LATEST_FILE = "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")


def replaced_dir(directory: Path, name: str) -> Path:
    """Where a re-save of step directory `name` moves the old one aside before moving the
    new one in. A kill between those two renames leaves the step only here, while
    `latest` may still name it; `resolve_latest` then takes this copy."""
    return directory / f".{name}.replaced"


def expert_file(layer: int, expert: int) -> str:
    """Path (relative to a step directory) of global expert `expert` of MoE layer `layer`."""
    return f"experts/layer_{layer:03d}_expert_{expert:04d}.safetensors"


# --- nested state (optimizer, extra) as JSON + safetensors; never pickle -----------------


def encode_state(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able form of `value`; its tensors go into `tensors` under fresh keys ("0", "1",
    ...). `path` only names the position of a bad value in errors."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise ValueError(f"state key {key!r} at {path!r} is invalid; accepted: str, int")
        return {
            "__dict__": [[k, encode_state(v, tensors, f"{path}/{k}")] for k, v in value.items()]
        }
    if isinstance(value, list | tuple):
        items = [encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(
        f"state value at {path!r} has type {type(value).__name__}; accepted: tensors, dicts, "
        "lists, tuples, str, int, float, bool, None"
    )


def decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode_state`."""
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(decode_state(v, tensors) for v in value["__tuple__"])
        return {k: decode_state(v, tensors) for k, v in value["__dict__"]}
    return value


# --- files -------------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes(path: Path, data: bytes) -> None:
    """Write durably: a unique temp name, fsync, then os.replace (replicas of one expert on
    several data-parallel ranks may write the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.part")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_tensors(root: Path, relative: str, tensors: dict[str, torch.Tensor]) -> str:
    data = safetensors.torch.save(tensors)
    write_bytes(root / relative, data)
    return sha256_hex(data)


def read_verified(checkpoint: Path, relative: str, meta: dict[str, Any]) -> bytes:
    expected = meta["files"].get(relative)
    path = checkpoint / relative
    if expected is None:
        raise ValueError(f"checkpoint {checkpoint} lists no file {relative!r} in {META_FILE}")
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing (listed in {META_FILE})")
    data = path.read_bytes()
    if sha256_hex(data) != expected:
        raise ValueError(
            f"checkpoint file {path} is corrupt: sha256 {sha256_hex(data)} differs from "
            f"{expected} in {META_FILE}"
        )
    return data


def load_tensors(checkpoint: Path, relative: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(read_verified(checkpoint, relative, meta))


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    """The parsed meta.json of a step directory (ValueError if missing or not ours)."""
    path = Path(checkpoint) / META_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: {checkpoint} is not a complete checkpoint")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"checkpoint file {path} is corrupt: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} meta file (format={FORMAT!r} expected)")
    if meta.get("version") not in (1, FORMAT_VERSION):
        raise ValueError(
            f"{path} has version {meta.get('version')}; this code reads 1 and {FORMAT_VERSION}"
        )
    if meta["version"] == 1:
        for entry in meta["ranks"]:
            entry["experts"] = {
                name: list(range(offset, offset + count))
                for name, (offset, count) in entry["experts"].items()
            }
        meta["version"] = FORMAT_VERSION
    for layer in meta["moe_layers"]:
        layer.setdefault("expert_ids", list(range(layer["num_experts"])))
        layer.setdefault("quantization", "none")
    return meta


def verify_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """Check every file listed in meta.json against its sha256; return the meta."""
    meta = read_meta(checkpoint)
    for relative in meta["files"]:
        read_verified(Path(checkpoint), relative, meta)
    return meta
