"""A text corpus as byte streams per task, split into train and validation; folder loader.

`TaskCorpus` is what every data source produces (the KJV Bible, a user's folder of text
files, the synthetic generator) and what `ByteDataset` consumes: for each task, one
uint8 stream of training bytes and one of validation bytes, plus the names of the
documents that went into each (so that tests and users can see the split).

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


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); accepted: "
            "UTF-8 text files only (convert it, e.g. `iconv -t UTF-8`, or move it out)"
        ) from None


def load_text_folder(path: str | Path, val_fraction: float = 0.1) -> TaskCorpus:
    """Load a folder of UTF-8 text files; each immediate subfolder is a task.

    Task ids follow the sorted subfolder names (hidden entries, starting with '.', are
    skipped); a task's files are read recursively in sorted path order and joined. A
    folder without subfolders is a single task 0 made of its files. With subfolders, a
    file directly in the root is an error (it belongs to no task).

    The last `val_fraction` of each task's bytes is its validation stream (a contiguous
    tail, so no text is shared between the splits).
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} is not a directory; accepted: a folder")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid; accepted: 0 < x < 1")
    entries = [entry for entry in sorted(root.iterdir()) if not _is_hidden(entry)]
    task_folders = [entry for entry in entries if entry.is_dir()]
    if task_folders:
        loose = [entry for entry in entries if entry.is_file()]
        if loose:
            raise ValueError(
                f"data folder {str(root)!r} has task subfolders and also the file "
                f"{str(loose[0])!r} directly in it; accepted: every file inside a task "
                "subfolder (or no subfolders at all, for a single task)"
            )
    else:
        task_folders = [root]

    train_N, val_N, train_documents, val_documents = [], [], [], []
    total_bytes = 0
    for folder in task_folders:
        files = _text_files(folder) if folder != root else [e for e in entries if e.is_file()]
        texts = [_read_utf8(file) for file in files]
        data = join_documents(texts)
        total_bytes += len(data)
        if task_folders != [root] and len(data) == 0:
            raise ValueError(
                f"task folder {str(folder)!r} holds no text; accepted: at least one "
                "non-empty UTF-8 file per task subfolder"
            )
        num_val = max(1, round(len(data) * val_fraction)) if data else 0
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
        task_names=tuple(folder.name for folder in task_folders),
        train_N=tuple(train_N),
        val_N=tuple(val_N),
        train_documents=tuple(train_documents),
        val_documents=tuple(val_documents),
    )
