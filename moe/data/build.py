"""A `DataConfig` made into what training reads: a `TokenDataset`.

Bytes of the KJV, a folder or the synthetic generator are read into memory
(`build_corpus`, as a `TaskCorpus`); a corpus with a tokenizer, or a JSONL/Parquet one, is
tokenized once into memory-mapped token shards (`moe.data.shards`) and read from there.
`DataConfig.storage` chooses otherwise when asked.
"""

from __future__ import annotations

from pathlib import Path

from moe.data.batches import TokenDataset
from moe.data.config import DataConfig, DataSource
from moe.data.corpus import TaskCorpus, load_text_folder
from moe.data.kjv import load_kjv
from moe.data.shards import open_token_shards
from moe.data.streams import TokenStreams
from moe.data.synthetic import make_synthetic_corpus
from moe.interop.tokenizer import TOKENIZER_FILE, ByteTokenizer, HFTokenizer, Tokenizer


def data_tokenizer(config: DataConfig) -> Tokenizer:
    """`data.tokenizer`'s tokenizer (a directory with tokenizer.json, or the file), bytes
    when None; ValueError naming the path when it holds no tokenizer."""
    if config.tokenizer is None:
        return ByteTokenizer()
    path = Path(config.tokenizer).expanduser()
    directory = path.parent if path.is_file() and path.name == TOKENIZER_FILE else path
    if not (directory / TOKENIZER_FILE).is_file():
        raise ValueError(
            f"data.tokenizer={config.tokenizer!r} holds no {TOKENIZER_FILE}; accepted: a "
            f"directory with {TOKENIZER_FILE} (as launch.tokenizer writes it) or the file"
        )
    return HFTokenizer.from_dir(directory)


def build_corpus(config: DataConfig) -> TaskCorpus:
    """The byte corpus `config` names, in memory (read from disk or generated; nothing
    is downloaded). ValueError for a config whose corpus lives in token shards."""
    if config.uses_shards:
        raise ValueError(
            f"data.source={config.source.value} with data.tokenizer={config.tokenizer!r} "
            f"(data.storage={config.storage.value}) is read as token shards, not as bytes in "
            "memory; accepted here: a byte-level kjv, folder or synthetic corpus"
        )
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


def build_streams(config: DataConfig, progress: bool = False) -> TokenStreams:
    """The token streams of `config`: bytes in memory, or token shards (built first when
    the cache has none for this corpus and tokenizer; `progress` shows a bar)."""
    if config.uses_shards:
        return open_token_shards(config, data_tokenizer(config), progress=progress)
    return TokenStreams.from_corpus(build_corpus(config))


def build_dataset(config: DataConfig, progress: bool = False) -> TokenDataset:
    """`TokenDataset(build_streams(config), config.seq_len)`."""
    return TokenDataset(build_streams(config, progress), config.seq_len)
