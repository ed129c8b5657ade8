"""Token shards (`moe.data.shards`) against obvious references: windows equal windows cut
from the whole token stream (each document encoded alone, joined by hand); byte shards
give exactly the batches of the bytes in memory; the token dtype; the cache rebuilt when
the corpus or the tokenizer changes (and only then); ranks read only their own rows;
the sampler resumes at the same window; JSONL and Parquet rows as documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import moe.data.shards as shards_module
from moe.data import DataConfig, TokenDataset, build_dataset, build_streams
from moe.data.kjv import read_books
from moe.data.shards import DOCUMENT_COLUMNS, INDEX_FILE, token_dtype
from moe.interop.bpe import BPEConfig, train_bpe
from moe.interop.tokenizer import HFTokenizer

SEQ_LEN = 16


def _texts() -> dict[str, list[str]]:
    """Two tasks of a few documents each: KJV verses with non-ASCII text mixed in."""
    books = [text for _, _, _, text in read_books()[:4]]
    accents = "naïve café — «ünïcödé» 日本語 🙂 "
    return {
        "alpha": [books[0][:1500], accents + books[1][:900], "", books[2][:700] + accents],
        "beta": [books[3][:2500] + accents, accents * 3],
    }


def _write_folder(root: Path, texts: dict[str, list[str]]) -> Path:
    for task, documents in texts.items():
        for index, text in enumerate(documents):
            path = root / task / f"doc_{index:02d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("corpus"), _texts())


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE of 320 tokens (eos id 0) written as launch.tokenizer writes it."""
    texts = [text for documents in _texts().values() for text in documents]
    tokenizer = train_bpe(texts, BPEConfig(vocab_size=320), progress=False)
    directory = tmp_path_factory.mktemp("bpe")
    for name, data in tokenizer.files().items():
        (directory / name).write_bytes(data)
    return directory


def _reference_streams(
    tokenizer: HFTokenizer, texts: dict[str, list[str]], val_fraction: float
) -> dict[str, tuple[list[int], list[int]]]:
    """Per task (train ids, val ids): every non-empty document, newline-terminated,
    encoded alone; the eos id between documents; the last val_fraction of ids for val."""
    eos = tokenizer.eos_token_id
    assert eos is not None
    out = {}
    for task, documents in texts.items():
        ids: list[int] = []
        for text in documents:
            if not text:
                continue
            if ids:
                ids.append(eos)
            ids += tokenizer.encode(text if text.endswith("\n") else text + "\n")
        num_val = max(1, round(len(ids) * val_fraction))
        out[task] = (ids[: len(ids) - num_val], ids[len(ids) - num_val :])
    return out


def test_token_dtype_is_the_smallest_that_holds_the_vocabulary() -> None:
    assert token_dtype(256) == np.uint8 and token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="vocab_size=0"):
        token_dtype(0)


def test_bpe_windows_equal_windows_of_the_whole_token_stream(
    corpus: Path, bpe: Path, tmp_path: Path
) -> None:
    config = DataConfig(
        source="folder", path=str(corpus), seq_len=SEQ_LEN, tokenizer=str(bpe),  # type: ignore[arg-type]
        cache_dir=str(tmp_path),
    )  # fmt: skip
    dataset = build_dataset(config)
    tokenizer = HFTokenizer.from_dir(bpe)
    reference = _reference_streams(tokenizer, _texts(), config.val_fraction)
    assert dataset.task_names == ("alpha", "beta") and dataset.vocab_size == 320
    train = [reference[name][0] for name in dataset.task_names]
    val = [reference[name][1] for name in dataset.task_names]
    offsets = np.cumsum([0] + [len(ids) for ids in train])
    for step in range(4):
        batch = dataset.global_batch(step, 8, seed=1, balance_tasks=step % 2 == 1)
        assert batch.sample_ids_B is not None
        for row, task, sample in zip(batch.tokens_BT, batch.task_ids_B, batch.sample_ids_B):
            start = int(sample) - offsets[int(task)]
            assert row.tolist() == train[int(task)][start : start + SEQ_LEN + 1]
    windows = {
        (task, tuple(ids[k * SEQ_LEN : k * SEQ_LEN + SEQ_LEN + 1]))
        for task, ids in enumerate(val)
        for k in range((len(ids) - 1) // SEQ_LEN)
    }
    seen = [
        (int(batch.task_ids_B[0]), tuple(batch.tokens_BT[0].tolist()))
        for batch in dataset.validation_batches(batch_size=1)
    ]
    assert len(seen) == len(windows) and set(seen) == windows
    # The fixed shuffle: the first batch already samples both tasks.
    first = next(dataset.validation_batches(batch_size=8))
    assert set(first.task_ids_B.tolist()) == {0, 1}
    # Bits per byte: validation tokens per byte of the validation text.
    val_text_bytes = sum(
        len(tokenizer.decode(ids, skip_special_tokens=True).encode()) for ids in val
    )
    assert dataset.val_tokens_per_byte == pytest.approx(
        sum(map(len, val)) / val_text_bytes, rel=1e-3
    )
    assert 0.2 < dataset.val_tokens_per_byte < 0.9  # a BPE token covers several bytes


def test_the_document_index_locates_every_document(corpus: Path, bpe: Path, tmp_path: Path) -> None:
    config = DataConfig(
        source="folder", path=str(corpus), tokenizer=str(bpe), cache_dir=str(tmp_path)
    )  # type: ignore[arg-type]
    build_streams(config)
    (directory,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    index = json.loads((directory / INDEX_FILE).read_text())
    rows = np.fromfile(directory / "documents.bin", dtype="<i8").reshape(-1, len(DOCUMENT_COLUMNS))
    texts = _texts()
    expected = [(task, text) for task, documents in texts.items() for text in documents]
    nonempty = [(task, text) for task, text in expected if text]
    assert len(rows) == len(nonempty)
    tokenizer = HFTokenizer.from_dir(bpe)
    dtype = np.dtype(index["dtype"])
    for (task, text), (shard, first, count, num_bytes, source, _) in zip(nonempty, rows):
        assert index["shards"][shard]["task"] == task
        assert index["sources"][source].startswith(task + "/")
        ids = np.fromfile(directory / index["shards"][shard]["file"], dtype=dtype)[first:][:count]
        decoded = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        assert decoded == text + ("" if text.endswith("\n") else "\n")
        assert num_bytes == len(decoded.encode())


@pytest.mark.parametrize("source", ["kjv", "folder"])
def test_byte_shards_give_the_batches_of_the_bytes_in_memory(
    source: str, corpus: Path, tmp_path: Path
) -> None:
    settings = {"source": source, "seq_len": 32, "cache_dir": str(tmp_path)}
    if source == "folder":
        settings["path"] = str(corpus)
    memory = build_dataset(DataConfig(**settings, storage="memory"))  # type: ignore[arg-type]
    shards = build_dataset(DataConfig(**settings, storage="shards"))  # type: ignore[arg-type]
    assert isinstance(shards.streams.train_N[0], np.memmap)
    assert shards.streams.train_N[0].dtype == np.uint8
    assert memory.task_names == shards.task_names
    assert shards.val_tokens_per_byte == memory.val_tokens_per_byte == 1.0
    for step in (0, 3, 10_000):
        for balance in (False, True):
            a = memory.global_batch(step, 12, seed=5, balance_tasks=balance)
            b = shards.global_batch(step, 12, seed=5, balance_tasks=balance)
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    pairs = zip(memory.validation_batches(4, 1, 2), shards.validation_batches(4, 1, 2))
    for a, b in pairs:
        assert torch.equal(a.tokens_BT, b.tokens_BT) and torch.equal(a.task_ids_B, b.task_ids_B)


def test_the_cache_is_rebuilt_when_the_corpus_or_the_tokenizer_changes(
    bpe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _write_folder(tmp_path / "corpus", _texts())
    cache = tmp_path / "cache"
    builds: list[Path] = []
    build = shards_module.build_token_shards

    def counted_build(directory: Path, *args: object, **kwargs: object) -> None:
        builds.append(directory)
        build(directory, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shards_module, "build_token_shards", counted_build)

    def alpha_text(tokenizer: Path) -> str:
        config = DataConfig(
            source="folder",
            path=str(root),
            seq_len=8,
            tokenizer=str(tokenizer),
            cache_dir=str(cache),
        )  # type: ignore[arg-type]
        streams = build_streams(config)
        return streams.tokenizer.decode(streams.train_N[0].tolist(), skip_special_tokens=True)

    original = alpha_text(bpe)
    assert len(builds) == 1 and alpha_text(bpe) == original and len(builds) == 1
    # The same size and file names, other contents: a new key, and the new text.
    path = root / "alpha" / "doc_00.txt"
    text = path.read_text()
    assert "God" in text
    path.write_text(text.replace("God", "Dog"))
    assert "Dog" in alpha_text(bpe) and "Dog" not in original
    assert len(builds) == 2 and builds[1] != builds[0]
    # Another tokenizer (the eos token renamed in tokenizer_config.json alone): a new key.
    other = tmp_path / "other_bpe"
    other.mkdir()
    (other / "tokenizer.json").write_bytes((bpe / "tokenizer.json").read_bytes())
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "\n"}))
    alpha_text(other)
    assert len(builds) == 3 and len(set(builds)) == 3
    # The corpus restored: the first cache again, without a build.
    path.write_text(text)
    assert alpha_text(bpe) == original and len(builds) == 3


class _RecordingStream:
    """A token stream that records the start of every slice read from it."""

    def __init__(self, tokens: np.ndarray, log: list[tuple[int, int]], task: int) -> None:
        self.tokens, self.log, self.task = tokens, log, task

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: slice) -> np.ndarray:
        self.log.append((self.task, index.start))
        return self.tokens[index]


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_reads_only_its_own_rows(
    corpus: Path, bpe: Path, tmp_path: Path, world_size: int
) -> None:
    config = DataConfig(
        source="folder",
        path=str(corpus),
        seq_len=SEQ_LEN,
        tokenizer=str(bpe),
        cache_dir=str(tmp_path),
    )  # type: ignore[arg-type]
    streams = build_streams(config)
    log: list[tuple[int, int]] = []
    recorded = type(streams)(
        streams.name, streams.task_names,
        tuple(_RecordingStream(s, log, t) for t, s in enumerate(streams.train_N)),  # type: ignore[misc]
        streams.val_N, streams.val_bytes, streams.tokenizer,
    )  # fmt: skip
    dataset = TokenDataset(recorded, SEQ_LEN)
    batch_size = 8
    for step in range(3):
        whole = dataset.global_batch(step, batch_size, seed=2, balance_tasks=False)
        assert whole.sample_ids_B is not None
        global_reads = [
            (int(task), int(sample) - int(dataset.train_offsets[int(task)]))
            for task, sample in zip(whole.task_ids_B, whole.sample_ids_B)
        ]
        rows = batch_size // world_size
        parts = []
        for rank in range(world_size):
            log.clear()
            sampler = dataset.sampler(batch_size, seed=2, rank=rank, world_size=world_size)
            batch = sampler.batch_at(step)
            assert log == global_reads[rank * rows : (rank + 1) * rows]
            parts.append(batch)
        for key in range(3):
            assert torch.equal(torch.cat([part[key] for part in parts]), whole[key])


def test_the_sampler_resumes_at_the_same_window(corpus: Path, bpe: Path, tmp_path: Path) -> None:
    config = DataConfig(
        source="folder",
        path=str(corpus),
        seq_len=SEQ_LEN,
        tokenizer=str(bpe),
        cache_dir=str(tmp_path),
    )  # type: ignore[arg-type]
    dataset = build_dataset(config)
    uninterrupted = dataset.sampler(8, seed=4, world_size=2, rank=1)
    expected = [uninterrupted.next_batch() for _ in range(6)][3:]
    first = dataset.sampler(8, seed=4, world_size=2, rank=1)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_dataset(config).sampler(8, seed=4, world_size=2, rank=1)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def _rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for index, text in enumerate(t for documents in _texts().values() for t in documents):
        rows.append({"text": text or None, "task": [2, 10, 2][index % 3], "id": index})
    return rows


def test_jsonl_and_parquet_rows_are_documents_with_their_tasks(tmp_path: Path) -> None:
    rows = _rows()
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    # Two files of a folder, read in sorted order, as one corpus.
    pq.write_table(pa.Table.from_pylist(rows[:3]), parquet_dir / "a.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(rows[3:]), parquet_dir / "b.parquet")
    datasets = [
        build_dataset(
            DataConfig(
                source=source,
                path=str(path),
                task_field="task",
                seq_len=8,
                cache_dir=str(tmp_path / "cache"),
            )
        )  # type: ignore[arg-type]
        for source, path in (("jsonl", jsonl), ("parquet", parquet_dir))
    ]
    for dataset in datasets:
        assert dataset.task_names == ("2", "10")  # integer task values in numeric order
        for task, name in enumerate(dataset.task_names):
            texts = [str(r["text"]) for r in rows if str(r["task"]) == name and r["text"]]
            data = "\n".join(t if t.endswith("\n") else t + "\n" for t in texts).encode()
            stream = np.concatenate([dataset.streams.train_N[task], dataset.streams.val_N[task]])
            assert stream.tobytes() == data
            assert len(dataset.streams.val_N[task]) == max(1, round(len(data) * 0.1))
    one_task = build_dataset(
        DataConfig(source="jsonl", path=str(jsonl), seq_len=8, cache_dir=str(tmp_path / "cache"))
    )  # type: ignore[arg-type]
    assert one_task.task_names == ("default",)


def test_bad_tables_are_named(tmp_path: Path) -> None:
    def dataset(path: Path, **settings: object) -> TokenDataset:
        source = "parquet" if path.suffix == ".parquet" else "jsonl"
        return build_dataset(
            DataConfig(
                source=source, path=str(path), seq_len=4, cache_dir=str(tmp_path / "c"), **settings
            )
        )  # type: ignore[arg-type]

    table = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"body": "some text here"}]), table)
    with pytest.raises(ValueError, match=r"has no field 'text'.*\['body'\]"):
        dataset(table)
    numbers = tmp_path / "n.jsonl"
    numbers.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"n\.jsonl.*cannot be read"):
        dataset(numbers)
    untasked = tmp_path / "u.jsonl"
    untasked.write_text('{"text": "a b c d e f", "task": "x"}\n{"text": "g h i j k"}\n')
    with pytest.raises(ValueError, match=r"row 1 has no 'task'"):
        dataset(untasked, task_field="task")
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"text": ""}\n{"other": "x"}\n')
    with pytest.raises(ValueError, match="holds no text"):
        dataset(empty)
    with pytest.raises(ValueError, match="does not exist"):
        dataset(tmp_path / "missing.jsonl")
    assert not list((tmp_path / "c").glob("jsonl-*/"))  # nothing half-built is left


def test_uint32_shards_hold_ids_beyond_65535(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    vocab |= {f"unused{index}": len(vocab) + index for index in range(65_600 - len(vocab))}
    rust = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.add_tokens(["<big>"])  # id 65600: needs 32 bits
    (tmp_path / "tok").mkdir()
    rust.save(str(tmp_path / "tok" / "tokenizer.json"))
    text = "a<big>b " * 40
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(text)
    config = DataConfig(
        source="folder",
        path=str(tmp_path / "corpus"),
        seq_len=8,
        tokenizer=str(tmp_path / "tok"),
        cache_dir=str(tmp_path / "c"),
    )  # type: ignore[arg-type]
    streams = build_streams(config)
    assert streams.train_N[0].dtype == np.uint32
    tokenizer = HFTokenizer.from_dir(tmp_path / "tok")
    ids = tokenizer.encode(text + "\n")
    assert 65_600 in ids
    assert np.concatenate([streams.train_N[0], streams.val_N[0]]).tolist() == ids


def _build_in_child(config: DataConfig, arrived: object, go: object, builds: object) -> None:
    """Child of test_concurrent_processes_build_once: signals when it reaches the cache
    lock (or, without one, the build), builds only after `go`, counts its builds."""
    from filelock import FileLock

    class SignallingLock(FileLock):
        def acquire(self, timeout: float | None = None, *args: object, **kwargs: object) -> object:
            if timeout != 0:  # a blocking wait for the lock
                arrived.release()  # type: ignore[attr-defined]
            return super().acquire(timeout, *args, **kwargs)  # type: ignore[arg-type]

    build = shards_module.build_token_shards

    def counted_build(*args: object, **kwargs: object) -> None:
        arrived.release()  # type: ignore[attr-defined]
        assert go.wait(timeout=120)  # type: ignore[attr-defined]
        with builds.get_lock():  # type: ignore[attr-defined]
            builds.value += 1  # type: ignore[attr-defined]
        build(*args, **kwargs)  # type: ignore[arg-type]

    shards_module.FileLock = SignallingLock  # type: ignore[misc]
    shards_module.build_token_shards = counted_build
    build_streams(config)


def test_concurrent_processes_build_once(corpus: Path, tmp_path: Path) -> None:
    """Two processes (two ranks) open the same uncached corpus at once: one builds, the
    other waits for the lock and reads what the first built."""
    import multiprocessing

    from filelock import FileLock

    from moe.data.documents import document_source
    from moe.data.shards import cache_key
    from moe.interop.tokenizer import ByteTokenizer

    config = DataConfig(
        source="folder", path=str(corpus), storage="shards", cache_dir=str(tmp_path)
    )  # type: ignore[arg-type]
    key = cache_key(document_source(config), ByteTokenizer(), config.val_fraction)
    context = multiprocessing.get_context("fork")
    arrived, go, builds = context.Semaphore(0), context.Event(), context.Value("i", 0)
    held = FileLock(str(tmp_path / f"folder-{key[:24]}") + ".lock")
    with held:  # both children pass the "not built yet" check and block on the lock
        children = [
            context.Process(target=_build_in_child, args=(config, arrived, go, builds))
            for _ in range(2)
        ]
        for child in children:
            child.start()
        for _ in children:
            assert arrived.acquire(timeout=120)
        go.set()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    assert builds.value == 1
    assert [path.name for path in tmp_path.iterdir() if path.is_dir()] == [f"folder-{key[:24]}"]


def test_data_config_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"DataConfig\.path=None is invalid for source=jsonl"):
        DataConfig(source="jsonl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"DataConfig\.storage='disk' is invalid; accepted: auto"):
        DataConfig(storage="disk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"storage=memory is invalid .* data\.tokenizer='t'"):
        DataConfig(tokenizer="t", storage="memory")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"source=synthetic is generated in memory"):
        DataConfig(source="synthetic", tokenizer="t")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"text_field='' is invalid"):
        DataConfig(text_field="")
    assert not DataConfig().uses_shards and DataConfig(storage="shards").uses_shards  # type: ignore[arg-type]
    assert DataConfig(source="parquet", path="x").uses_shards  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"data\.tokenizer='.*' holds no tokenizer\.json"):
        build_dataset(DataConfig(tokenizer=str(tmp_path), cache_dir=str(tmp_path)))
    from moe.data import build_corpus

    with pytest.raises(ValueError, match="is read as token shards, not as bytes in memory"):
        build_corpus(DataConfig(tokenizer=str(tmp_path)))
