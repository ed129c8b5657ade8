"""Rows of local JSONL and Parquet files, read in batches by pyarrow (never a whole file).

JSONL goes through pyarrow's streaming JSON reader (`pyarrow.json.open_json`, one block
of about a megabyte at a time), Parquet through `ParquetFile.iter_batches` (only the
text and task columns are read). Each row gives (text, task name): a null or missing
text is an empty document (skipped by the caller); the task is the field's value as a
string. Anything pyarrow cannot read is a ValueError naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from moe.data.config import DataSource

SUFFIXES = {DataSource.JSONL: ".jsonl", DataSource.PARQUET: ".parquet"}
BATCH_ROWS = 64  # rows of a Parquet batch: a few MB of text, not a whole row group
JSON_BLOCK_BYTES = 1 << 20


def count_rows(source: DataSource, files: list[Path]) -> int | None:
    """The number of rows (Parquet: from the files' metadata; JSONL: unknown, None)."""
    if source != DataSource.PARQUET:
        return None
    return sum(_parquet_file(file).metadata.num_rows for file in files)


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path} is not a Parquet file: {error}") from None


def _batches(
    source: DataSource, path: Path, text_field: str, task_field: str | None
) -> Iterator[pa.RecordBatch]:
    if source == DataSource.PARQUET:
        file = _parquet_file(path)
        names = file.schema_arrow.names
        missing = [f for f in (text_field, task_field) if f is not None and f not in names]
        if missing:
            raise ValueError(
                f"{path} has no field {missing[0]!r}; accepted: one of its fields {names} "
                "(data.text_field, data.task_field)"
            )
        columns = [text_field] + ([task_field] if task_field else [])
        yield from file.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        return
    # The text's type is given so that a number where text belongs fails here, by name.
    options = pa_json.ParseOptions(explicit_schema=pa.schema([(text_field, pa.string())]))
    reader = pa_json.open_json(
        path, read_options=pa_json.ReadOptions(block_size=JSON_BLOCK_BYTES), parse_options=options
    )
    yield from reader


def read_rows(
    source: DataSource, path: Path, text_field: str, task_field: str | None
) -> Iterator[tuple[str | None, str | None]]:
    """(text, task) of every row of `path`, in file order."""
    row = 0
    try:
        for batch in _batches(source, path, text_field, task_field):
            if batch.num_rows == 0:
                continue
            names = batch.schema.names
            if task_field is not None and task_field not in names:
                raise ValueError(
                    f"{path}: rows {row}.. have no field {task_field!r} (data.task_field); "
                    f"accepted: every row with a task"
                )
            text_column = batch.column(names.index(text_field))
            if not pa.types.is_string(text_column.type) and not pa.types.is_large_string(
                text_column.type
            ):
                raise ValueError(
                    f"{path}: field {text_field!r} holds {text_column.type}; accepted: text "
                    "(a string field, data.text_field)"
                )
            texts = text_column.to_pylist()
            tasks: list[object] = (
                batch.column(names.index(task_field)).to_pylist()
                if task_field is not None
                else [None] * batch.num_rows
            )
            for offset, (text, task) in enumerate(zip(texts, tasks)):
                if task_field is not None and task is None and text:
                    raise ValueError(
                        f"{path}: row {row + offset} has no {task_field!r} (data.task_field); "
                        "accepted: every row with a task"
                    )
                yield text, None if task is None else str(task)
            row += batch.num_rows
    except MemoryError:
        raise  # pyarrow's ArrowMemoryError is both: out of memory is no bad input
    except pa.ArrowException as error:
        raise ValueError(f"{path} (after row {row}) cannot be read: {error}") from None
