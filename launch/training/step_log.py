"""What the training loop records per step, kept off the step's critical path.

- `StepLosses`: each step's loss terms stay on the device, summed over the micro-batches;
  `flush` turns every step recorded since the last flush into global means with one
  all-reduce. Logging every `log_every` steps thus costs one collective (and one host
  sync) per window, not one per step: at EP=2 on gloo a small all-reduce takes about
  2 ms, and on a GPU each `float(loss)` stalls the host until the step has run.
- `MoETimer`: wall time inside the MoE layers, from forward hooks.
- `take_comm_time`: seconds in the MoE all-to-alls since the last call.
- `progress_bar`: the tqdm bar of the main rank.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from routing import AllReduce


class StepLosses:
    """Per-step loss terms, reduced over the ranks in batches (see the module docstring).

    `add(parts, scale)` once per micro-batch adds scale * each term (the step's mean over
    its micro-batches); `end_step()` closes the step. `flush()` (every rank, at the same
    steps: it is a collective over `all_reduce`'s group) returns {term: mean over ranks} for each closed step, in
    order, and forgets them."""

    def __init__(self, world_size: int, all_reduce: AllReduce | None) -> None:
        self.world_size = world_size
        self.all_reduce = all_reduce
        self._keys: list[str] | None = None
        self._current: list[Tensor] | None = None
        self._rows: list[Tensor] = []

    def add(self, parts: dict[str, Tensor], scale: float) -> None:
        keys = list(parts)
        if self._keys is None:
            self._keys = keys
        elif keys != self._keys:
            raise ValueError(f"the loss terms changed from {self._keys} to {keys} within a run")
        values = [value.detach().float() * scale for value in parts.values()]
        if self._current is None:
            self._current = values
        else:
            self._current = [a + b for a, b in zip(self._current, values, strict=True)]

    def end_step(self) -> None:
        assert self._current is not None, "end_step without add"
        self._rows.append(torch.stack(self._current))
        self._current = None

    def flush(self) -> list[dict[str, float]]:
        if not self._rows:
            return []
        assert self._keys is not None
        table_SK = torch.stack(self._rows).double()
        if self.all_reduce is not None:
            table_SK = self.all_reduce(table_SK) / self.world_size
        self._rows = []
        return [dict(zip(self._keys, row, strict=True)) for row in table_SK.tolist()]


def take_comm_time(model: Any) -> float:
    """Seconds this rank spent in the MoE all-to-alls since the last call
    (`MoETransformer.take_comm_time`); 0 at EP=1."""
    return float(model.take_comm_time())


class MoETimer:
    """Wall time spent inside the MoE layers (router, all-to-all, experts), from
    forward hooks; on CUDA it is the host time of the launches, a lower bound."""

    def __init__(self, model: Any, enabled: bool = True) -> None:
        self.total = 0.0
        self._started: dict[int, float] = {}
        self._handles = []
        for block, layer in model.moe_layers() if enabled else []:
            self._handles.append(layer.register_forward_pre_hook(self._pre(block)))
            self._handles.append(layer.register_forward_hook(self._post(block)))

    def _pre(self, block: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._started[block] = time.perf_counter()

        return hook

    def _post(self, block: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.total += time.perf_counter() - self._started.pop(block, time.perf_counter())

        return hook

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def progress_bar(enabled: bool, start: int, total: int, name: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=name, file=sys.stderr, dynamic_ncols=True)
