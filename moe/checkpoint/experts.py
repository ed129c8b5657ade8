"""A checkpoint's float experts read by global id, without building a model: an
expert-parallel or task-subset model holds only some experts, the files hold them all
(distillation's `top` and `merge` initialisation read the teacher's this way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe.checkpoint.files import expert_file, load_tensors


class CheckpointExperts:
    """A teacher's float experts, read (sha256-checked) from its checkpoint files: an
    expert-parallel teacher holds only its own experts, the files hold them all."""

    def __init__(self, checkpoint: str | Path, meta: dict[str, Any]) -> None:
        self.checkpoint = Path(checkpoint)
        self.meta = meta
        self.layers = {layer["module"]: layer for layer in meta["moe_layers"]}

    def _layer(self, block: int) -> dict[str, Any]:
        module = f"blocks.{block}.ffn.experts"
        if module not in self.layers:
            raise ValueError(f"teacher checkpoint {self.checkpoint} has no expert stack {module}")
        layer = self.layers[module]
        if layer["quantization"] != "none":
            raise ValueError(
                f"teacher checkpoint {self.checkpoint} stores {module} as "
                f"{layer['quantization']}; distill.init=top or merge needs float experts "
                "(use distill.init=random)"
            )
        return layer

    def ids(self, block: int) -> list[int]:
        """The global ids of the experts the checkpoint holds in block `block`."""
        return list(self._layer(block)["expert_ids"])

    def read(self, block: int, expert_ids: list[int]) -> dict[str, Tensor]:
        """Block `block`'s expert tensors for `expert_ids`, stacked in that order."""
        layer = self._layer(block)
        parts = [
            load_tensors(self.checkpoint, expert_file(layer["index"], i), self.meta)
            for i in expert_ids
        ]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
