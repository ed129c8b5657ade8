"""A corpus as a stream of documents, read one at a time: what the tokenizer trainer and the
token-shard writer consume, so that no corpus is ever held whole in memory.

`document_source(config)` gives the `DocumentSource` of a `DataConfig`:
- `kjv`: one document per book, its task the book's group, its split by book
  (`moe.data.kjv`);
- `folder`: one document per file, its task the file's subfolder (`task_folders`);
- `jsonl` / `parquet`: one document per row of the files at `path` (a file, or a folder
  searched recursively for `*.jsonl` / `*.parquet`), read by pyarrow (`moe.data.tables`).

Sources that do not say a document's split (folders, tables) leave it to the reader: the
last `val_fraction` of each task's stream is its validation stream, as `load_text_folder`
does. A single document must fit in memory; the corpus need not.

`content_digest()` hashes what the documents are made of (file names and contents, the
KJV database), so that a cache of its tokens is rebuilt when any of it changes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from moe.data.config import DataConfig, DataSource
from moe.data.corpus import read_utf8, task_folders
from moe.data.kjv import TASK_NAMES as KJV_TASK_NAMES
from moe.data.kjv import VALIDATION_BOOKS, book_task, default_database_path, read_books

HASH_CHUNK = 1 << 20


class Split(str, Enum):
    TRAIN = "train"
    VALIDATION = "val"


@dataclass(frozen=True)
class Document:
    """One document: its text, its task's name, its split (None: the tail rule decides),
    and where it comes from (`source`: an index into `DocumentSource.source_names`;
    `row`: the row in that file, 0 for whole files and books)."""

    text: str
    task: str
    split: Split | None
    source: int
    row: int = 0


class DocumentSource(Protocol):
    """A corpus read document by document."""

    @property
    def kind(self) -> str:
        """`DataSource` value (the cache directory's prefix)."""
        ...

    @property
    def task_order(self) -> tuple[str, ...] | None:
        """The task names in task-id order, or None when the tasks are discovered while
        reading (then ordered by `ordered_task_names`)."""
        ...

    @property
    def source_names(self) -> list[str]: ...

    @property
    def num_documents(self) -> int | None:
        """How many documents `documents()` yields at most (None: unknown before reading)."""
        ...

    def documents(self) -> Iterator[Document]: ...

    def describe(self) -> dict[str, Any]:
        """The settings that change the documents (part of the cache key)."""
        ...

    def content_digest(self) -> str:
        """sha256 of what the documents are made of."""
        ...


def ordered_task_names(names: Iterable[str]) -> tuple[str, ...]:
    """Discovered task names in task-id order: numerically when every name is an integer
    (task field values 0, 1, ..., 10), else sorted as strings."""
    unique = set(names)
    if all(re.fullmatch(r"-?\d+", name) for name in unique):
        return tuple(sorted(unique, key=int))
    return tuple(sorted(unique))


def files_digest(root: Path, files: list[Path]) -> str:
    """sha256 over each file's path relative to `root` and its bytes, read in chunks."""
    digest = hashlib.sha256()
    for path in files:
        name = str(path.relative_to(root)) if path != root else path.name
        digest.update(json.dumps([name, path.stat().st_size]).encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


class KJVDocuments:
    """The books of the KJV (`moe.data.kjv`), split by book."""

    kind = DataSource.KJV.value
    task_order = KJV_TASK_NAMES

    def __init__(self, database: Path | None = None) -> None:
        self.database = database or default_database_path()
        self._books = read_books(self.database)  # 4 MB: small enough to read at once

    @property
    def source_names(self) -> list[str]:
        return [name for _, _, name, _ in self._books]

    @property
    def num_documents(self) -> int:
        return len(self._books)

    def documents(self) -> Iterator[Document]:
        for index, (testament, book, name, text) in enumerate(self._books):
            split = Split.VALIDATION if name in VALIDATION_BOOKS else Split.TRAIN
            yield Document(text, KJV_TASK_NAMES[book_task(testament, book)], split, index)

    def describe(self) -> dict[str, Any]:
        return {"source": self.kind, "validation_books": list(VALIDATION_BOOKS)}

    def content_digest(self) -> str:
        return files_digest(self.database.parent, [self.database])


class FolderDocuments:
    """The files of a folder, one task per subfolder (`task_folders`)."""

    kind = DataSource.FOLDER.value

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self.tasks = task_folders(self.root)
        self.files = [file for _, files in self.tasks for file in files]

    @property
    def task_order(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tasks)

    @property
    def source_names(self) -> list[str]:
        return [str(file.relative_to(self.root)) for file in self.files]

    @property
    def num_documents(self) -> int:
        return len(self.files)

    def documents(self) -> Iterator[Document]:
        index = 0
        for name, files in self.tasks:
            for file in files:
                yield Document(read_utf8(file), name, None, index)
                index += 1

    def describe(self) -> dict[str, Any]:
        return {"source": self.kind}

    def content_digest(self) -> str:
        return files_digest(self.root, self.files)


def table_files(path: str | Path, suffix: str) -> list[Path]:
    """The files a `path` names: the file itself, or every `*{suffix}` under the folder
    (recursively, sorted, hidden ones skipped)."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(
            f"data.path={str(root)!r} does not exist; accepted: a {suffix} file or a folder "
            f"holding {suffix} files"
        )
    files = [
        file
        for file in sorted(root.rglob(f"*{suffix}"))
        if file.is_file() and not any(p.startswith(".") for p in file.relative_to(root).parts)
    ]
    if not files:
        raise ValueError(f"data.path={str(root)!r} holds no {suffix} file; accepted: at least one")
    return files


class TableDocuments:
    """The rows of JSONL or Parquet files: `text_field` is the text, `task_field` (when
    set) the task's name, else every row is task `DEFAULT_TASK`."""

    DEFAULT_TASK = "default"

    def __init__(self, config: DataConfig) -> None:
        from moe.data.tables import SUFFIXES, count_rows

        assert config.path is not None  # DataConfig checks it
        self.config = config
        self.kind = config.source.value
        self.root = Path(config.path)
        self.files = table_files(self.root, SUFFIXES[config.source])
        self._num_rows = count_rows(config.source, self.files)

    @property
    def task_order(self) -> tuple[str, ...] | None:
        return None if self.config.task_field else (self.DEFAULT_TASK,)

    @property
    def source_names(self) -> list[str]:
        return [
            file.name if file == self.root else str(file.relative_to(self.root))
            for file in self.files
        ]

    @property
    def num_documents(self) -> int | None:
        return self._num_rows

    def documents(self) -> Iterator[Document]:
        from moe.data.tables import read_rows

        for index, file in enumerate(self.files):
            rows = read_rows(
                self.config.source, file, self.config.text_field, self.config.task_field
            )
            for row, (text, task) in enumerate(rows):
                if text:
                    yield Document(
                        text, self.DEFAULT_TASK if task is None else task, None, index, row
                    )

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.kind,
            "text_field": self.config.text_field,
            "task_field": self.config.task_field,
        }

    def content_digest(self) -> str:
        return files_digest(self.root, self.files)


def document_source(config: DataConfig) -> DocumentSource:
    """The documents of `config`'s corpus (ValueError for the generated synthetic one)."""
    if config.source == DataSource.KJV:
        return KJVDocuments()
    if config.source == DataSource.FOLDER:
        assert config.path is not None  # DataConfig checks it
        return FolderDocuments(config.path)
    if config.source in (DataSource.JSONL, DataSource.PARQUET):
        return TableDocuments(config)
    raise ValueError(
        f"data.source={config.source.value} is generated byte by byte; accepted for documents "
        "(tokenizer training, token shards): kjv, folder, jsonl, parquet"
    )
