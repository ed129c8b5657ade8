"""A text corpus as byte streams per task, split into train and validation; folder loader.

`TaskCorpus` is what the byte sources read into memory produce (the KJV Bible, a user's
folder of text files, the synthetic generator) and what `TokenStreams.from_corpus` reads:
for each task, one uint8 stream of training bytes and one of validation bytes, plus the
names of the documents that went into each (so that tests and users can see the split).
Corpora with a tokenizer, or larger than memory, go through `moe.data.shards` instead;
`task_folders` and `read_utf8` are the folder rules both share.

Shape legend: N bytes in a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class TaskCorpus:
    """Byte streams of a text collection, one train and one validation stream per task.

    `train_N[t]` / `val_N[t]` are 1-D uint8 tensors holding task t's text; a window of a
    training batch never crosses from one task into another. `train_documents[t]` /
    `val_documents[t]` name the documents (books, files) concatenated into each stream.
    """

    name: str
    task_names: tuple[str, ...]
    train_N: tuple[torch.Tensor, ...]
    val_N: tuple[torch.Tensor, ...]
    train_documents: tuple[tuple[str, ...], ...]
    val_documents: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        num_tasks = len(self.task_names)
        if num_tasks == 0:
            raise ValueError(f"corpus {self.name!r} has no task; accepted: at least one task")
        for field_name in ("train_N", "val_N", "train_documents", "val_documents"):
            value = getattr(self, field_name)
            if len(value) != num_tasks:
                raise ValueError(
                    f"corpus {self.name!r}: {field_name} has {len(value)} entries; "
                    f"accepted: one per task ({num_tasks})"
                )
        for task, stream in enumerate((*self.train_N, *self.val_N)):
            if stream.dtype != torch.uint8 or stream.dim() != 1:
                raise ValueError(
                    f"corpus {self.name!r}: stream {task} is {stream.dtype} of shape "
                    f"{tuple(stream.shape)}; accepted: a 1-D torch.uint8 tensor"
                )

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)


def bytes_to_stream(data: bytes) -> torch.Tensor:
    """A uint8 tensor [N] holding `data` (a copy; the tensor owns its memory)."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def join_documents(texts: list[str]) -> bytes:
    """UTF-8 bytes of the documents, each ending in a newline, separated by a blank line."""
    parts = [text if text.endswith("\n") else text + "\n" for text in texts if text]
    return "\n".join(parts).encode("utf-8")


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _text_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file under `folder` (recursively), in sorted order."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            files.append(path)
    return files


def task_folders(path: str | Path) -> list[tuple[str, list[Path]]]:
    """A folder's tasks as (name, files): each immediate subfolder is a task, in sorted
    order (hidden entries, starting with '.', are skipped), its files read recursively in
    sorted path order; a folder without subfolders is a single task (named after the
    folder) made of its files. With subfolders, a file directly in the root is an error
    (it belongs to no task)."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} is not a directory; accepted: a folder")
    entries = [entry for entry in sorted(root.iterdir()) if not _is_hidden(entry)]
    subfolders = [entry for entry in entries if entry.is_dir()]
    if not subfolders:
        return [(root.name, [entry for entry in entries if entry.is_file()])]
    loose = [entry for entry in entries if entry.is_file()]
    if loose:
        raise ValueError(
            f"data folder {str(root)!r} has task subfolders and also the file "
            f"{str(loose[0])!r} directly in it; accepted: every file inside a task "
            "subfolder (or no subfolders at all, for a single task)"
        )
    return [(folder.name, _text_files(folder)) for folder in subfolders]


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (ValueError naming the file otherwise)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); accepted: "
            "UTF-8 text files only (convert it, e.g. `iconv -t UTF-8`, or move it out)"
        ) from None


def tail_split_size(num_tokens: int, val_fraction: float) -> int:
    """How many of a task stream's last tokens (bytes) are its validation stream: a
    contiguous tail, at least one when the stream is not empty."""
    return max(1, round(num_tokens * val_fraction)) if num_tokens else 0


def load_text_folder(path: str | Path, val_fraction: float = 0.1) -> TaskCorpus:
    """Load a folder of UTF-8 text files (tasks: see `task_folders`) into memory.

    The last `val_fraction` of each task's bytes is its validation stream (a contiguous
    tail, so no text is shared between the splits).
    """
    root = Path(path)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid; accepted: 0 < x < 1")
    tasks = task_folders(root)
    train_N, val_N, train_documents, val_documents = [], [], [], []
    total_bytes = 0
    for name, files in tasks:
        texts = [read_utf8(file) for file in files]
        data = join_documents(texts)
        total_bytes += len(data)
        if len(tasks) > 1 and len(data) == 0:
            raise ValueError(
                f"task folder {str(root / name)!r} holds no text; accepted: at least one "
                "non-empty UTF-8 file per task subfolder"
            )
        num_val = tail_split_size(len(data), val_fraction)
        train_N.append(bytes_to_stream(data[: len(data) - num_val]))
        val_N.append(bytes_to_stream(data[len(data) - num_val :]))
        names = tuple(str(file.relative_to(root)) for file in files)
        train_documents.append(names)
        val_documents.append(names)
    if total_bytes == 0:
        raise ValueError(
            f"data folder {str(root)!r} holds no text; accepted: a folder with non-empty "
            "UTF-8 text files (directly, or in one subfolder per task)"
        )
    return TaskCorpus(
        name=f"folder:{root}",
        task_names=tuple(name for name, _ in tasks),
        train_N=tuple(train_N),
        val_N=tuple(val_N),
        train_documents=tuple(train_documents),
        val_documents=tuple(val_documents),
    )
