"""Token streams: what a `TokenDataset` cuts windows from, wherever the tokens live.

For each task, one 1-D integer array of training tokens and one of validation tokens:
NumPy views of an in-memory byte corpus (`from_corpus`), or read-only memory maps of
token shards on disk (`moe.data.shards`), of which only the pages a window touches are
ever read. `val_bytes` counts the UTF-8 bytes of each task's validation text, so that a
loss per token converts to bits per byte.

Shape legend: N tokens in a stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moe.data.corpus import TaskCorpus
from moe.interop.tokenizer import ByteTokenizer, Tokenizer


@dataclass(frozen=True)
class TokenStreams:
    """Per task: `train_N[t]`, `val_N[t]` (1-D integer arrays, ids < the tokenizer's
    vocabulary) and `val_bytes[t]` (UTF-8 bytes of `val_N[t]`'s text); `tokenizer` made
    them (bytes: `ByteTokenizer`)."""

    name: str
    task_names: tuple[str, ...]
    train_N: tuple[np.ndarray, ...]
    val_N: tuple[np.ndarray, ...]
    val_bytes: tuple[int, ...]
    tokenizer: Tokenizer = field(default_factory=ByteTokenizer)

    def __post_init__(self) -> None:
        count = len(self.task_names)
        if count == 0:
            raise ValueError(f"corpus {self.name!r} has no task; accepted: at least one task")
        for key in ("train_N", "val_N", "val_bytes"):
            if len(getattr(self, key)) != count:
                raise ValueError(
                    f"corpus {self.name!r}: {key} has {len(getattr(self, key))} entries; "
                    f"accepted: one per task ({count})"
                )

    @classmethod
    def from_corpus(cls, corpus: TaskCorpus) -> TokenStreams:
        """A byte corpus as token streams (no copy: views of its tensors)."""
        return cls(
            name=corpus.name,
            task_names=corpus.task_names,
            train_N=tuple(stream.numpy() for stream in corpus.train_N),
            val_N=tuple(stream.numpy() for stream in corpus.val_N),
            val_bytes=tuple(len(stream) for stream in corpus.val_N),
        )

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size
