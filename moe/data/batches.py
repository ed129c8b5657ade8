"""Batches of byte windows with task ids: a seeded, resumable, rank-sharded sampler and a
fixed validation sequence.

A batch row is a window of T+1 consecutive bytes of one task's stream (inputs are
`tokens_BT[:, :-1]`, targets `tokens_BT[:, 1:]`) and the row's task id.

Determinism and sharding: the global batch of step s is a pure function of (corpus,
seq_len, seed, global batch size, s); it is drawn from a NumPy generator seeded with
(seed, s), so no generator state has to be carried between steps. Data-parallel rank r
of W takes rows [r*B/W, (r+1)*B/W) of it, so the ranks' batches at a step concatenate
to the single-process batch, whatever W is. Resuming needs only the step counter
(`TrainSampler.state_dict()`), and a run may resume at another world size.

Shape legend: B rows in a batch (global, or per rank where said), T sequence length
(`seq_len`; a row holds T+1 bytes), N bytes in a stream, W world size (data-parallel
ranks).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from moe.data.corpus import TaskCorpus

VOCAB_SIZE = 256  # byte-level: every uint8 value is a token


class Batch(NamedTuple):
    """`tokens_BT` int64 [B, T+1] byte windows; `task_ids_B` int64 [B]; `sample_ids_B`
    int64 [B]: a training row's sample index (its window's start in the concatenated
    training bytes, the same window whatever the step), None for validation batches."""

    tokens_BT: torch.Tensor
    task_ids_B: torch.Tensor
    sample_ids_B: torch.Tensor | None = None


def _check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} is invalid; accepted: an integer >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is invalid; accepted: 0..world_size-1={world_size - 1}")
    if batch_size < 1 or batch_size % world_size != 0:
        raise ValueError(
            f"batch_size={batch_size} is invalid; accepted: a positive multiple of "
            f"world_size={world_size} (the global batch is split evenly over the ranks)"
        )


class ByteDataset:
    """A `TaskCorpus` cut into windows of `seq_len + 1` bytes.

    Every task needs at least `seq_len + 1` training bytes (a window never crosses tasks).
    Validation windows start at multiples of `seq_len` in each task's validation stream,
    so every validation byte after a stream's first is a target exactly once (up to the
    stream's incomplete tail).
    """

    def __init__(self, corpus: TaskCorpus, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} is invalid; accepted: an integer >= 1")
        self.corpus = corpus
        self.seq_len = seq_len
        window = seq_len + 1
        for task, stream in enumerate(corpus.train_N):
            if len(stream) < window:
                raise ValueError(
                    f"task {task} ({corpus.task_names[task]!r}) of corpus {corpus.name!r} has "
                    f"{len(stream)} training bytes; accepted: at least seq_len+1={window} "
                    "(lower seq_len or add text)"
                )
        self.train_bytes_N = torch.cat(list(corpus.train_N))
        lengths = torch.tensor([len(stream) for stream in corpus.train_N], dtype=torch.int64)
        self.train_offsets = torch.cumsum(lengths, 0) - lengths
        # Number of window starts per task; a task is drawn in proportion to it.
        self.train_starts_per_task = (lengths - seq_len).numpy()

        val_starts, val_tasks, val_offset = [], [], 0
        for task, stream in enumerate(corpus.val_N):
            count = (len(stream) - 1) // seq_len
            val_starts.append(val_offset + seq_len * torch.arange(count, dtype=torch.int64))
            val_tasks.append(torch.full((count,), task, dtype=torch.int64))
            val_offset += len(stream)
        self.val_bytes_N = torch.cat(list(corpus.val_N))
        # A fixed shuffle, so that a prefix of the validation batches (max_batches) samples
        # every task in proportion to its share of the validation bytes.
        order = torch.from_numpy(np.random.default_rng(0).permutation(sum(map(len, val_tasks))))
        self.val_starts = torch.cat(val_starts)[order]
        self.val_task_ids = torch.cat(val_tasks)[order]

    @property
    def num_tasks(self) -> int:
        return self.corpus.num_tasks

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def num_validation_windows(self) -> int:
        return len(self.val_starts)

    def _windows(self, stream_N: torch.Tensor, starts_B: torch.Tensor) -> torch.Tensor:
        index_BT = starts_B[:, None] + torch.arange(self.seq_len + 1, dtype=torch.int64)
        return stream_N[index_BT].to(torch.int64)

    def global_batch(self, step: int, batch_size: int, seed: int, balance_tasks: bool) -> Batch:
        """The global training batch [B, T+1] of `step` (see the module docstring).

        `balance_tasks=False` draws a window start uniformly over all training bytes (tasks
        in proportion to their size); `True` draws the task uniformly first.
        """
        if step < 0:
            raise ValueError(f"step={step} is invalid; accepted: an integer >= 0")
        rng = np.random.default_rng([seed, step])
        starts = self.train_starts_per_task
        if balance_tasks:
            task_B = rng.integers(len(starts), size=batch_size)
            local_B = rng.integers(starts[task_B])
        else:
            flat_B = rng.integers(int(starts.sum()), size=batch_size)
            task_B = np.searchsorted(np.cumsum(starts), flat_B, side="right")
            local_B = flat_B - (np.cumsum(starts) - starts)[task_B]
        task_ids_B = torch.from_numpy(task_B.astype(np.int64))
        starts_B = self.train_offsets[task_ids_B] + torch.from_numpy(local_B)
        return Batch(self._windows(self.train_bytes_N, starts_B), task_ids_B, starts_B)

    def sampler(
        self,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        balance_tasks: bool = False,
    ) -> TrainSampler:
        """A `TrainSampler` of global batch size `batch_size`, yielding rank `rank`'s rows."""
        return TrainSampler(self, batch_size, seed, rank, world_size, balance_tasks)

    def validation_batches(
        self,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
    ) -> Iterator[Batch]:
        """The fixed validation batches (global size `batch_size`, rank's rows of each).

        Always the same sequence; an incomplete last global batch is left out so that
        every rank gets a batch of the same size (EP needs every rank at every step).
        """
        _check_shard(batch_size, rank, world_size)
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches={max_batches} is invalid; accepted: None or >= 1")
        num_batches = self.num_validation_windows // batch_size
        if num_batches == 0:
            raise ValueError(
                f"corpus {self.corpus.name!r} has {self.num_validation_windows} validation "
                f"windows of seq_len+1={self.seq_len + 1} bytes, fewer than batch_size="
                f"{batch_size}; accepted: a smaller batch_size or seq_len, or more text"
            )
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        rows = batch_size // world_size
        for index in range(num_batches):
            begin = index * batch_size + rank * rows
            starts_B = self.val_starts[begin : begin + rows]
            yield Batch(
                self._windows(self.val_bytes_N, starts_B), self.val_task_ids[begin : begin + rows]
            )


class TrainSampler:
    """Rank `rank`'s share of the global training batches, step after step.

    `next_batch()` returns the batch of the current step and advances it; `batch_at(step)`
    peeks without advancing. The state is the step counter (plus the seed and global batch
    size, checked on load), independent of the rank and world size.
    """

    def __init__(
        self,
        dataset: ByteDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        balance_tasks: bool = False,
    ) -> None:
        _check_shard(batch_size, rank, world_size)
        if seed < 0:
            raise ValueError(f"seed={seed} is invalid; accepted: an integer >= 0")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.balance_tasks = balance_tasks
        self.step = 0

    def batch_at(self, step: int) -> Batch:
        """This rank's rows [B/W, T+1] of the global batch of `step`."""
        batch = self.dataset.global_batch(step, self.batch_size, self.seed, self.balance_tasks)
        rows = self.batch_size // self.world_size
        begin = self.rank * rows
        sample_ids_B = batch.sample_ids_B
        return Batch(
            batch.tokens_BT[begin : begin + rows],
            batch.task_ids_B[begin : begin + rows],
            None if sample_ids_B is None else sample_ids_B[begin : begin + rows],
        )

    def next_batch(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "balance_tasks": self.balance_tasks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state["step"]`; the seed, global batch size and task balancing must
        match this sampler's (else the resumed run would see other data)."""
        for key in ("seed", "batch_size", "balance_tasks"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state.get(key)!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; accepted: the same {key} as the saved run"
                )
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"sampler state has step={step!r}; accepted: an integer >= 0")
        self.step = step
