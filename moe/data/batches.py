"""Batches of token windows with task ids: a seeded, resumable, rank-sharded sampler and a
fixed validation sequence.

A batch row is a window of T+1 consecutive tokens of one task's stream (inputs are
`tokens_BT[:, :-1]`, targets `tokens_BT[:, 1:]`) and the row's task id. The streams
(`TokenStreams`) are bytes in memory or memory-mapped token shards; a row is read from
its stream only when a batch needs it, so a rank reads its own rows and nothing else.

Determinism and sharding: the global batch of step s is a pure function of (corpus,
seq_len, seed, global batch size, s); it is drawn from a NumPy generator seeded with
(seed, s), so no generator state has to be carried between steps. Data-parallel rank r
of W takes rows [r*B/W, (r+1)*B/W) of it, so the ranks' batches at a step concatenate
to the single-process batch, whatever W is. Resuming needs only the step counter
(`TrainSampler.state_dict()`), and a run may resume at another world size. The draw
depends on the streams' lengths only, so bytes in memory and bytes from shards give the
same batches.

Shape legend: B rows in a batch (global, or per rank where said), T sequence length
(`seq_len`; a row holds T+1 tokens), N tokens in a stream, W world size (data-parallel
ranks).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from moe.data.corpus import TaskCorpus
from moe.data.streams import TokenStreams
from moe.interop.tokenizer import Tokenizer

VOCAB_SIZE = 256  # byte-level: every uint8 value is a token


class Batch(NamedTuple):
    """`tokens_BT` int64 [B, T+1] token windows; `task_ids_B` int64 [B]; `sample_ids_B`
    int64 [B]: a training row's sample index (its window's start in the concatenated
    training streams, the same window whatever the step), None for validation batches."""

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


class TokenDataset:
    """`TokenStreams` cut into windows of `seq_len + 1` tokens.

    Every task needs at least `seq_len + 1` training tokens (a window never crosses
    tasks). Validation windows start at multiples of `seq_len` in each task's validation
    stream, so every validation token after a stream's first is a target exactly once (up
    to the stream's incomplete tail); their order is one fixed shuffle. Memory: a few
    integers per task, and 8 bytes per validation window (the shuffle); never the tokens.
    """

    def __init__(self, streams: TokenStreams, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} is invalid; accepted: an integer >= 1")
        self.streams = streams
        self.seq_len = seq_len
        window = seq_len + 1
        for task, stream in enumerate(streams.train_N):
            if len(stream) < window:
                raise ValueError(
                    f"task {task} ({streams.task_names[task]!r}) of corpus {streams.name!r} "
                    f"has {len(stream)} training tokens; accepted: at least seq_len+1={window} "
                    "(lower seq_len or add text)"
                )
        lengths = np.array([len(stream) for stream in streams.train_N], dtype=np.int64)
        self.train_offsets = np.cumsum(lengths) - lengths
        # Number of window starts per task; a task is drawn in proportion to it.
        self.train_starts_per_task = lengths - seq_len
        val_counts = np.array(
            [max(len(stream) - 1, 0) // seq_len for stream in streams.val_N], dtype=np.int64
        )
        self._val_window_ends = np.cumsum(val_counts)
        self._val_window_firsts = self._val_window_ends - val_counts
        # A fixed shuffle of all validation windows (indices in task order), so that a
        # prefix of the validation batches (max_batches) samples every task in proportion
        # to its share of the validation tokens.
        self._val_order = np.random.default_rng(0).permutation(int(val_counts.sum()))

    @classmethod
    def from_corpus(cls, corpus: TaskCorpus, seq_len: int) -> TokenDataset:
        """A byte corpus in memory (its own tensors, no copy)."""
        return cls(TokenStreams.from_corpus(corpus), seq_len)

    @property
    def num_tasks(self) -> int:
        return self.streams.num_tasks

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.streams.task_names

    @property
    def tokenizer(self) -> Tokenizer:
        return self.streams.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.streams.vocab_size

    @property
    def num_validation_windows(self) -> int:
        return len(self._val_order)

    @property
    def val_tokens_per_byte(self) -> float:
        """Validation tokens per byte of validation text (1.0 for bytes): bits per token
        times this is bits per byte."""
        return sum(len(stream) for stream in self.streams.val_N) / max(
            sum(self.streams.val_bytes), 1
        )

    def _read(
        self, streams: tuple[np.ndarray, ...], task_B: np.ndarray, starts_B: np.ndarray
    ) -> torch.Tensor:
        """Windows [B, T+1] (int64): row b is `streams[task_B[b]][starts_B[b]:][:T+1]`."""
        window = self.seq_len + 1
        rows = [
            np.asarray(streams[task][start : start + window])
            for task, start in zip(task_B.tolist(), starts_B.tolist())
        ]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def training_windows(
        self, step: int, batch_size: int, seed: int, balance_tasks: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(task [B], window start within the task's training stream [B]) of the global
        batch of `step`: `balance_tasks=False` draws a start uniformly over all training
        windows (tasks in proportion to their size); `True` draws the task uniformly first."""
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
        return task_B.astype(np.int64), local_B.astype(np.int64)

    def training_batch(self, task_B: np.ndarray, local_B: np.ndarray) -> Batch:
        """The training rows of windows (task [B], start within its stream [B])."""
        sample_ids_B = torch.from_numpy(self.train_offsets[task_B] + local_B)
        tokens_BT = self._read(self.streams.train_N, task_B, local_B)
        return Batch(tokens_BT, torch.from_numpy(task_B), sample_ids_B)

    def global_batch(self, step: int, batch_size: int, seed: int, balance_tasks: bool) -> Batch:
        """The whole global training batch [B, T+1] of `step` (see the module docstring)."""
        return self.training_batch(*self.training_windows(step, batch_size, seed, balance_tasks))

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

    def _validation_windows(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(task, start in its validation stream) of validation windows (task-order ids)."""
        task_B = np.searchsorted(self._val_window_ends, order, side="right")
        return task_B.astype(np.int64), (order - self._val_window_firsts[task_B]) * self.seq_len

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
                f"corpus {self.streams.name!r} has {self.num_validation_windows} validation "
                f"windows of seq_len+1={self.seq_len + 1} tokens, fewer than batch_size="
                f"{batch_size}; accepted: a smaller batch_size or seq_len, or more text"
            )
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        rows = batch_size // world_size
        for index in range(num_batches):
            begin = index * batch_size + rank * rows
            task_B, starts_B = self._validation_windows(self._val_order[begin : begin + rows])
            yield Batch(self._read(self.streams.val_N, task_B, starts_B), torch.from_numpy(task_B))

    def task_validation_windows(self, task: int, max_windows: int) -> torch.Tensor:
        """The first `max_windows` validation windows [N, T+1] (int64) of `task` in the
        fixed validation order (per-task evaluations)."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(
                f"task={task} is invalid; accepted: 0..{self.num_tasks - 1} "
                f"({', '.join(self.task_names)})"
            )
        task_all, _ = self._validation_windows(self._val_order)
        chosen = self._val_order[task_all == task][:max_windows]
        task_B, starts_B = self._validation_windows(chosen)
        if len(chosen) == 0:
            return torch.empty(0, self.seq_len + 1, dtype=torch.int64)
        return self._read(self.streams.val_N, task_B, starts_B)


class TrainSampler:
    """Rank `rank`'s share of the global training batches, step after step.

    `next_batch()` returns the batch of the current step and advances it; `batch_at(step)`
    peeks without advancing. The state is the step counter (plus the seed and global batch
    size, checked on load), independent of the rank and world size.
    """

    def __init__(
        self,
        dataset: TokenDataset,
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
        """This rank's rows [B/W, T+1] of the global batch of `step` (only they are read)."""
        task_B, local_B = self.dataset.training_windows(
            step, self.batch_size, self.seed, self.balance_tasks
        )
        rows = self.batch_size // self.world_size
        mine = slice(self.rank * rows, (self.rank + 1) * rows)
        return self.dataset.training_batch(task_B[mine], local_B[mine])

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
