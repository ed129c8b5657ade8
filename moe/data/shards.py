"""Token shards: a corpus tokenized once into memory-mapped files, cached per corpus and
tokenizer, so that corpora larger than memory train without ever being read whole.

`open_token_shards(config, tokenizer)` gives the corpus's `TokenStreams`: read-only
memory maps, of which a batch touches only the pages of its windows. The first call for a
(corpus, tokenizer) pair builds the shards; later calls, from any process, reuse them.

Layout of `<cache_dir>/<source>-<key>/`:
    index.json       format, what was hashed, token dtype, task names, shard files, and per
                     task and split its segment (shard, first token, tokens, UTF-8 bytes)
    shard_NNNNN.bin  raw token ids (little-endian `dtype`): one task's documents of one
                     split, or of both for sources split by the tail rule (the last
                     `val_fraction` of the task's tokens are then its validation segment)
    documents.bin    int64 rows [D, 6], one per document: shard, first token, tokens,
                     bytes, source (index into index.json's `sources`), row in the source

Streams: each document's text ends in a newline; documents are separated by the
tokenizer's eos token, or by "\\n" when it has none. For bytes that is exactly the text
`load_kjv` and `load_text_folder` hold in memory, so both give the same batches.

Cache key: sha256 of the format version, the source's settings, a content hash of the
corpus (every file's name and bytes; the KJV database), the tokenizer files and
`val_fraction`. A change to any of them builds a new directory; the
old one stays until deleted. Hashing reads the corpus once per start (at disk speed, in
1 MB chunks). Building runs under a file lock (`<dir>.lock`): one process builds, the
others wait and then read; it writes into a temporary directory renamed when complete.

The validation bytes of a tail-split segment that starts inside a document are counted
by decoding that document's part, exact up to the one UTF-8 character the split may cut.

Shape legend: N tokens, D documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from tqdm import tqdm

from moe.data.config import DataConfig
from moe.data.corpus import tail_split_size
from moe.data.documents import Document, DocumentSource, Split, document_source, ordered_task_names
from moe.data.streams import TokenStreams
from moe.interop.tokenizer import Tokenizer

FORMAT = "moe-token-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
DOCUMENTS_FILE = "documents.bin"
DOCUMENT_COLUMNS = ("shard", "first_token", "tokens", "bytes", "source", "row")
ALL = "all"  # a shard of both splits (tail rule)
BATCH_CHARACTERS = 1 << 22  # documents are encoded in batches of about this much text
BATCH_DOCUMENTS = 256


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type holding ids 0..vocab_size-1: uint8 for bytes,
    uint16 up to 65536 tokens, uint32 beyond."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} is invalid; accepted: >= 1")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype).newbyteorder("<")
    raise ValueError(f"vocab_size={vocab_size} is invalid; accepted: < 2**32")


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's files ("bytes" for the byte tokenizer, which has none)."""
    files = tokenizer.files()
    if not files:
        return "bytes"
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(json.dumps([name, len(files[name])]).encode())
        digest.update(files[name])
    return digest.hexdigest()


def cache_key(source: DocumentSource, tokenizer: Tokenizer, val_fraction: float) -> str:
    """The cache key of a corpus and tokenizer (see the module docstring)."""
    described = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": source.describe(),
        "content": source.content_digest(),
        "tokenizer": tokenizer_digest(tokenizer),
        "val_fraction": val_fraction,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def open_token_shards(
    config: DataConfig, tokenizer: Tokenizer, progress: bool = False
) -> TokenStreams:
    """The token streams of `config`'s corpus tokenized by `tokenizer`, from the cache
    under `config.cache_dir` (built first when absent; see the module docstring)."""
    source = document_source(config)
    key = cache_key(source, tokenizer, config.val_fraction)
    cache = Path(config.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    directory = cache / f"{source.kind}-{key[:24]}"
    if not (directory / INDEX_FILE).is_file():
        lock = FileLock(str(directory) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if progress:
                print(f"waiting for another process to build {directory}", flush=True)
            lock.acquire()
        try:
            if not (directory / INDEX_FILE).is_file():
                build_token_shards(directory, source, tokenizer, config.val_fraction, progress)
        finally:
            lock.release()
    return read_token_shards(directory, tokenizer)


@dataclass
class _Shard:
    task: str
    part: str  # Split value, or ALL
    tokens: int = 0
    documents: int = 0


class _ShardWriter:
    """Appends documents to one shard file per (task, split), a batch at a time."""

    def __init__(self, directory: Path, tokenizer: Tokenizer) -> None:
        self.directory = directory
        self.tokenizer = tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        eos = tokenizer.eos_token_id
        self.separator_N = np.asarray(
            [eos] if eos is not None else tokenizer.encode("\n"), dtype=np.int64
        )
        self.separator_bytes = 0 if eos is not None else 1
        self.shards: list[_Shard] = []
        self.by_key: dict[tuple[str, str], int] = {}
        (directory / DOCUMENTS_FILE).touch()

    def add(self, documents: list[Document]) -> int:
        """Tokenize and append `documents`; returns how many tokens were written."""
        texts = [doc.text if doc.text.endswith("\n") else doc.text + "\n" for doc in documents]
        pending: dict[int, list[bytes]] = {}
        rows: list[list[int]] = []
        written = 0
        for doc, text, ids_N in zip(documents, texts, self.tokenizer.encode_batch(texts)):
            part = doc.split.value if doc.split is not None else ALL
            index = self.by_key.get((doc.task, part))
            if index is None:
                index = self.by_key[(doc.task, part)] = len(self.shards)
                self.shards.append(_Shard(doc.task, part))
            shard = self.shards[index]
            num_bytes = len(text.encode("utf-8"))
            if shard.documents:
                ids_N = np.concatenate([self.separator_N, ids_N])
                num_bytes += self.separator_bytes
            if len(ids_N) and not 0 <= int(ids_N.min()) <= int(ids_N.max()) < (
                self.tokenizer.vocab_size
            ):
                raise ValueError(f"{self.tokenizer!r} gave ids outside its vocabulary")
            pending.setdefault(index, []).append(ids_N.astype(self.dtype).tobytes())
            rows.append([index, shard.tokens, len(ids_N), num_bytes, doc.source, doc.row])
            shard.tokens += len(ids_N)
            shard.documents += 1
            written += len(ids_N)
        for index, chunks in pending.items():
            with open(self.directory / shard_file(index), "ab") as handle:
                handle.writelines(chunks)
        with open(self.directory / DOCUMENTS_FILE, "ab") as handle:
            handle.write(np.asarray(rows, dtype="<i8").tobytes())
        return written


def shard_file(index: int) -> str:
    return f"shard_{index:05d}.bin"


def _batched(documents: Iterable[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    characters = 0
    for document in documents:
        if not document.text:
            continue  # as `join_documents`: an empty document is no document
        batch.append(document)
        characters += len(document.text)
        if characters >= BATCH_CHARACTERS or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, characters = [], 0
    if batch:
        yield batch


def build_token_shards(
    directory: Path,
    source: DocumentSource,
    tokenizer: Tokenizer,
    val_fraction: float,
    progress: bool = False,
) -> None:
    """Tokenize `source` into `directory` (which must not exist yet), streaming: one
    batch of documents in memory at a time. ValueError for a corpus without text."""
    temp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.tmp")
    temp.mkdir(parents=True)
    try:
        writer = _ShardWriter(temp, tokenizer)
        bar = tqdm(
            total=source.num_documents,
            unit="doc",
            desc=f"tokenizing {source.kind} into {directory.name}",
            disable=not progress,
        )
        tokens = 0
        with bar:
            for batch in _batched(source.documents()):
                tokens += writer.add(batch)
                bar.update(len(batch))
                bar.set_postfix(tokens=f"{tokens:,}")
        index = _index(temp, source, writer, tokenizer, val_fraction)
        (temp / INDEX_FILE).write_text(json.dumps(index, indent=1))
        os.replace(temp, directory)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _index(
    directory: Path,
    source: DocumentSource,
    writer: _ShardWriter,
    tokenizer: Tokenizer,
    val_fraction: float,
) -> dict[str, Any]:
    """index.json's contents: the task order and each task's train and val segments."""
    found = {shard.task for shard in writer.shards}
    if not found:
        raise ValueError(
            f"the {source.kind} corpus ({source.describe()}) holds no text; accepted: a "
            "corpus with non-empty documents (for jsonl/parquet: rows with data.text_field)"
        )
    tasks = source.task_order or ordered_task_names(found)
    empty = [task for task in tasks if task not in found]
    if empty:
        raise ValueError(
            f"task {empty[0]!r} of the {source.kind} corpus holds no text; accepted: at "
            "least one non-empty document per task"
        )
    segments: dict[str, list[dict[str, int | None]]] = {Split.TRAIN.value: [], "val": []}
    for task in tasks:
        whole = writer.by_key.get((task, ALL))
        if whole is None:
            for split in (Split.TRAIN, Split.VALIDATION):
                index = writer.by_key.get((task, split.value))
                segments[split.value].append(_whole_segment(directory, writer, index))
        else:
            train, val = _tail_segments(directory, writer, whole, tokenizer, val_fraction)
            segments[Split.TRAIN.value].append(train)
            segments[Split.VALIDATION.value].append(val)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": source.describe(),
        "tokenizer": tokenizer_digest(tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "dtype": writer.dtype.str,
        "task_names": list(tasks),
        "shards": [
            {"file": shard_file(i), "task": s.task, "part": s.part, "tokens": s.tokens}
            for i, s in enumerate(writer.shards)
        ],
        "segments": segments,
        "documents": {"file": DOCUMENTS_FILE, "columns": list(DOCUMENT_COLUMNS)},
        "sources": source.source_names,
    }


def _documents(directory: Path) -> np.ndarray:
    """documents.bin as int64 [D, 6] (memory-mapped)."""
    path = directory / DOCUMENTS_FILE
    if path.stat().st_size == 0:
        return np.zeros((0, len(DOCUMENT_COLUMNS)), dtype=np.int64)
    return np.memmap(path, dtype="<i8", mode="r").reshape(-1, len(DOCUMENT_COLUMNS))


def _whole_segment(directory: Path, writer: _ShardWriter, index: int | None) -> dict[str, Any]:
    if index is None:
        return {"shard": None, "start": 0, "tokens": 0, "bytes": 0}
    rows = _documents(directory)
    mine = rows[rows[:, 0] == index]
    return {
        "shard": index,
        "start": 0,
        "tokens": writer.shards[index].tokens,
        "bytes": int(mine[:, 3].sum()),
    }


def _tail_segments(
    directory: Path, writer: _ShardWriter, index: int, tokenizer: Tokenizer, val_fraction: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The train and val segments of a tail-split shard and their UTF-8 bytes."""
    total = writer.shards[index].tokens
    split = total - tail_split_size(total, val_fraction)
    rows = _documents(directory)
    mine = rows[rows[:, 0] == index]
    ends = mine[:, 1] + mine[:, 2]
    before = mine[ends <= split]
    train_bytes = int(before[:, 3].sum())
    cut = mine[(mine[:, 1] < split) & (ends > split)]
    if len(cut):
        first = int(cut[0, 1])
        tokens_N = np.memmap(directory / shard_file(index), dtype=writer.dtype, mode="r")
        prefix = tokenizer.decode(tokens_N[first:split].tolist(), skip_special_tokens=True)
        train_bytes += len(prefix.encode("utf-8"))
    total_bytes = int(mine[:, 3].sum())
    return (
        {"shard": index, "start": 0, "tokens": split, "bytes": train_bytes},
        {
            "shard": index,
            "start": split,
            "tokens": total - split,
            "bytes": total_bytes - train_bytes,
        },
    )


def read_token_shards(directory: Path, tokenizer: Tokenizer) -> TokenStreams:
    """The `TokenStreams` of a shard directory (memory maps; nothing is read yet)."""
    index = json.loads((directory / INDEX_FILE).read_text())
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory} is not a token shard directory of version {FORMAT_VERSION}; delete it "
            "and it is rebuilt"
        )
    if index["tokenizer"] != tokenizer_digest(tokenizer):
        raise ValueError(f"{directory} was tokenized by another tokenizer than {tokenizer!r}")
    dtype = np.dtype(index["dtype"])
    maps: dict[int, np.ndarray] = {}

    def segment(entry: dict[str, Any]) -> np.ndarray:
        shard = entry["shard"]
        if shard is None or entry["tokens"] == 0:
            return np.zeros(0, dtype=dtype)
        if shard not in maps:
            maps[shard] = np.memmap(directory / shard_file(shard), dtype=dtype, mode="r")
        return maps[shard][entry["start"] : entry["start"] + entry["tokens"]]

    train, val = index["segments"][Split.TRAIN.value], index["segments"][Split.VALIDATION.value]
    return TokenStreams(
        name=f"{index['source']['source']}:{directory.name}",
        task_names=tuple(index["task_names"]),
        train_N=tuple(segment(entry) for entry in train),
        val_N=tuple(segment(entry) for entry in val),
        val_bytes=tuple(int(entry["bytes"]) for entry in val),
        tokenizer=tokenizer,
    )
