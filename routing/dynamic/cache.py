"""DynaMoE assignment cache: per sample, the experts its token-slots were sent to.

Keyed by sample index (the data loader's `Batch.sample_ids_B`), one cache per MoE layer,
bounded: at most `max_entries` samples, least recently used evicted first. A sample's
entry is *converged* once the share of its token-slots whose expert changed since it was
last seen (`routing.changed_share`) is below `threshold`; a converged sample is served
its cached assignment, which then fixes its experts (and so the expert counts) before
the router's choice is known. Every time a sample is seen the router's own choice is
compared with the stored assignment: at or past the threshold the entry is invalidated
(it stores the new choice and is not converged until it settles again).

Shapes: B samples, S tokens per sample, K experts per token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from routing.dynamic.controller import changed_share


@dataclass
class _Entry:
    expert_ids_SK: Tensor  # int16, CPU
    converged: bool = False


class AssignmentCache:
    """LRU cache of per-sample assignments (see the module docstring)."""

    def __init__(self, max_entries: int, threshold: float) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries} must be >= 1")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be in (0, 1]")
        self.max_entries = max_entries
        self.threshold = threshold
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self.lookups = 0
        self.hits = 0
        self.invalidations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, sample_ids: list[int], shape_SK: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(cached ids int64 [B, S, K] (zeros where missed), hit_B bool): a hit is a
        converged sample whose stored assignment has the shape [S, K]."""
        cached_BSK = torch.zeros((len(sample_ids), *shape_SK), dtype=torch.int64)
        hit_B = torch.zeros(len(sample_ids), dtype=torch.bool)
        for row, sample in enumerate(sample_ids):
            entry = self._entries.get(sample)
            if entry is not None and entry.converged and entry.expert_ids_SK.shape == shape_SK:
                cached_BSK[row] = entry.expert_ids_SK
                hit_B[row] = True
        self.lookups += len(sample_ids)
        self.hits += int(hit_B.sum())
        return cached_BSK, hit_B

    def update(self, sample_ids: list[int], router_ids_BSK: Tensor) -> None:
        """Record the router's own choice for each sample (convergence, invalidation)."""
        router_ids_BSK = router_ids_BSK.detach().to("cpu", torch.int16)
        for row, sample in enumerate(sample_ids):
            new_SK = router_ids_BSK[row]
            entry = self._entries.get(sample)
            if entry is None or entry.expert_ids_SK.shape != new_SK.shape:
                self._entries[sample] = _Entry(new_SK.clone())
            else:
                moved = float(changed_share(entry.expert_ids_SK[None], new_SK[None])[0])
                if moved < self.threshold:
                    entry.converged = True
                else:
                    if entry.converged:
                        self.invalidations += 1
                    entry.expert_ids_SK = new_SK.clone()
                    entry.converged = False
            self._entries.move_to_end(sample)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def state_dict(self) -> dict[str, Any]:
        """The entries, least recently used first, as tensors (a checkpoint's): sample
        ids, convergence flags, [S, K] shapes and the assignments flattened."""
        entries = list(self._entries.items())
        return {
            "samples": torch.tensor([sample for sample, _ in entries], dtype=torch.int64),
            "converged": torch.tensor([e.converged for _, e in entries], dtype=torch.bool),
            "shapes": torch.tensor(
                [list(e.expert_ids_SK.shape) for _, e in entries], dtype=torch.int64
            ).view(-1, 2),
            "ids": torch.cat([e.expert_ids_SK.reshape(-1) for _, e in entries])
            if entries
            else torch.zeros(0, dtype=torch.int16),
            "invalidations": self.invalidations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (the newest `max_entries` entries)."""
        sizes = state["shapes"].prod(dim=1)
        if int(sizes.sum()) != state["ids"].numel():
            raise ValueError("assignment cache state: the shapes do not match the stored ids")
        self._entries.clear()
        chunks = torch.split(state["ids"].to(torch.int16), sizes.tolist())
        for sample, converged, shape, ids in zip(
            state["samples"].tolist(), state["converged"].tolist(), state["shapes"].tolist(), chunks
        ):
            self._entries[int(sample)] = _Entry(ids.reshape(shape).clone(), bool(converged))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        self.invalidations = int(state["invalidations"])

    def is_converged(self, sample: int) -> bool:
        entry = self._entries.get(sample)
        return entry is not None and entry.converged

    def take_counts(self) -> tuple[int, int]:
        """(hits, lookups) since the last call."""
        counts = (self.hits, self.lookups)
        self.hits = self.lookups = 0
        return counts
