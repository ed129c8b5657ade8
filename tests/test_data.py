"""Tests of moe.data: KJV split and labels, folder loader, synthetic corpus, batches."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from moe.data import (
    KJV_TASK_NAMES,
    KJV_VALIDATION_BOOKS,
    DataConfig,
    TaskCorpus,
    TokenDataset,
    build_dataset,
    entropy_rate_bits,
    load_kjv,
    load_text_folder,
    make_synthetic_corpus,
    make_synthetic_tasks,
)
from moe.data.kjv import book_task, read_books
from moe.data.synthetic import sample_markov


@pytest.fixture(scope="module")
def kjv() -> TaskCorpus:
    return load_kjv()


@pytest.fixture(scope="module")
def synthetic() -> TokenDataset:
    corpus = make_synthetic_corpus(
        num_tasks=3, train_bytes_per_task=3000, val_bytes_per_task=700, seed=11
    )
    return TokenDataset.from_corpus(corpus, seq_len=16)


def _contains(stream_N: torch.Tensor, row: torch.Tensor) -> bool:
    return bytes(row.to(torch.uint8).tolist()) in bytes(stream_N.tolist())


def test_kjv_split_is_by_book_and_every_task_is_in_both_splits(kjv: TaskCorpus) -> None:
    books = read_books()
    assert len(books) == 66
    train = [name for names in kjv.train_documents for name in names]
    val = [name for names in kjv.val_documents for name in names]
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(name for _, _, name, _ in books)
    assert sorted(val) == sorted(KJV_VALIDATION_BOOKS)
    assert kjv.task_names == KJV_TASK_NAMES
    for task in range(6):
        assert len(kjv.val_documents[task]) == 1
        assert len(kjv.train_N[task]) > 100_000 and len(kjv.val_N[task]) > 10_000
    # Hand-checked group boundaries.
    expected = {
        "Genesis": 0,
        "Deuteronomy": 0,
        "Joshua": 1,
        "Esther": 1,
        "Job": 2,
        "Song of Solomon": 2,
        "Isaiah": 3,
        "Malachi": 3,
        "Matthew": 4,
        "Acts": 4,
        "Romans": 5,
        "Revelation": 5,
    }
    for name, task in expected.items():
        assert name in kjv.train_documents[task] + kjv.val_documents[task]
    with pytest.raises(ValueError, match="book=40"):
        book_task(1, 40)


def test_kjv_text_is_clean_and_in_its_task(kjv: TaskCorpus) -> None:
    law = bytes(kjv.train_N[0].tolist()).decode("utf-8")
    assert law.startswith("In the beginning God created the heaven")
    assert re.search(r"\d+:\d+", law) is None
    revelation = bytes(kjv.train_N[5].tolist()).decode("utf-8")
    assert "The grace of our Lord Jesus Christ be with you all. Amen." in revelation
    mark = bytes(kjv.val_N[4].tolist()).decode("utf-8")
    assert mark.startswith("The beginning of the gospel of Jesus Christ")
    assert "The beginning of the gospel of Jesus Christ" not in bytes(
        kjv.train_N[4].tolist()
    ).decode("utf-8")


def test_kjv_dataset_batches_hold_text_of_their_task(kjv: TaskCorpus) -> None:
    dataset = TokenDataset.from_corpus(kjv, seq_len=32)
    assert dataset.num_tasks == 6 and dataset.vocab_size == 256
    batch = dataset.sampler(batch_size=12, seed=3).next_batch()
    assert batch.tokens_BT.dtype == torch.int64 and batch.tokens_BT.shape == (12, 33)
    for row, task in zip(batch.tokens_BT, batch.task_ids_B.tolist()):
        assert _contains(kjv.train_N[task], row)


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)


def test_folder_loader_tasks_are_sorted_subfolders(tmp_path: Path) -> None:
    _write(tmp_path / "poems" / "a.txt", "roses are red\n" * 20)
    _write(tmp_path / "code" / "x.py", "print('hi')\n" * 20)
    _write(tmp_path / "code" / "deeper" / "y.md", "# héllo\n" * 20)
    _write(tmp_path / ".hidden" / "z.txt", "never read")
    corpus = load_text_folder(tmp_path, val_fraction=0.25)
    assert corpus.task_names == ("code", "poems")
    assert corpus.train_documents[0] == ("code/deeper/y.md", "code/x.py")
    code = ("# héllo\n" * 20 + "\n" + "print('hi')\n" * 20).encode("utf-8")
    joined = bytes(corpus.train_N[0].tolist()) + bytes(corpus.val_N[0].tolist())
    assert joined == code
    assert len(corpus.val_N[0]) == round(0.25 * len(code))
    poems = bytes(corpus.train_N[1].tolist()) + bytes(corpus.val_N[1].tolist())
    assert poems == ("roses are red\n" * 20).encode()
    batch = TokenDataset.from_corpus(corpus, seq_len=8).sampler(batch_size=6, seed=0).next_batch()
    for row, task in zip(batch.tokens_BT, batch.task_ids_B.tolist()):
        assert _contains(corpus.train_N[task], row)


def test_folder_loader_root_files_are_one_task(tmp_path: Path) -> None:
    _write(tmp_path / "b.txt", "second")
    _write(tmp_path / "a.txt", "first")
    corpus = load_text_folder(tmp_path, val_fraction=0.5)
    assert corpus.num_tasks == 1 and corpus.train_documents == (("a.txt", "b.txt"),)
    assert bytes(corpus.train_N[0].tolist()) + bytes(corpus.val_N[0].tolist()) == (
        b"first\n\nsecond\n"
    )


def test_folder_loader_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{re.escape(str(empty))}.*holds no text"):
        load_text_folder(empty)
    _write(tmp_path / "blank" / "nothing.txt", "")
    with pytest.raises(ValueError, match="holds no text"):
        load_text_folder(tmp_path / "blank")

    bad = tmp_path / "bad"
    _write(bad / "task" / "good.txt", "fine text")
    _write(bad / "task" / "latin1.txt", "café".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(str(bad / "task" / "latin1.txt"))):
        load_text_folder(bad)

    gap = tmp_path / "gap"
    _write(gap / "full" / "a.txt", "text")
    (gap / "hollow").mkdir()
    with pytest.raises(ValueError, match=f"{re.escape(str(gap / 'hollow'))}.*holds no text"):
        load_text_folder(gap)

    loose = tmp_path / "loose"
    _write(loose / "task" / "a.txt", "text")
    _write(loose / "stray.txt", "text")
    with pytest.raises(ValueError, match=r"stray\.txt"):
        load_text_folder(loose)
    with pytest.raises(ValueError, match="not a directory"):
        load_text_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="val_fraction"):
        load_text_folder(loose / "task", val_fraction=1.0)


def test_too_short_task_is_an_error() -> None:
    corpus = make_synthetic_corpus(num_tasks=2, train_bytes_per_task=10, val_bytes_per_task=10)
    with pytest.raises(ValueError, match=r"task 0 .* 10 training tokens.*seq_len\+1=17"):
        TokenDataset.from_corpus(corpus, seq_len=16)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_batches_concatenate_to_the_global_batch(
    synthetic: TokenDataset, world_size: int
) -> None:
    single = synthetic.sampler(batch_size=8, seed=5)
    ranks = [synthetic.sampler(8, 5, rank, world_size) for rank in range(world_size)]
    for _ in range(3):
        expected = single.next_batch()
        parts = [sampler.next_batch() for sampler in ranks]
        assert parts[0].tokens_BT.shape == (8 // world_size, 17)
        assert torch.equal(torch.cat([p.tokens_BT for p in parts]), expected.tokens_BT)
        assert torch.equal(torch.cat([p.task_ids_B for p in parts]), expected.task_ids_B)


def test_batches_are_windows_of_their_task_and_vary(synthetic: TokenDataset) -> None:
    sampler = synthetic.sampler(batch_size=16, seed=1)
    first, second = sampler.next_batch(), sampler.next_batch()
    assert not torch.equal(first.tokens_BT, second.tokens_BT)
    assert set(torch.cat([first.task_ids_B, second.task_ids_B]).tolist()) == {0, 1, 2}
    for batch in (first, second):
        for row, task in zip(batch.tokens_BT, batch.task_ids_B.tolist()):
            assert _contains(synthetic.streams.train_N[task], row)
    other_seed = synthetic.sampler(batch_size=16, seed=2).next_batch()
    assert not torch.equal(other_seed.tokens_BT, first.tokens_BT)


def test_balance_tasks_draws_tasks_uniformly() -> None:
    corpus = make_synthetic_corpus(num_tasks=2, train_bytes_per_task=200, seed=0)
    lopsided = TaskCorpus(
        name="lopsided",
        task_names=corpus.task_names,
        train_N=(corpus.train_N[0], torch.cat([corpus.train_N[1]] * 40)),
        val_N=corpus.val_N,
        train_documents=corpus.train_documents,
        val_documents=corpus.val_documents,
    )
    dataset = TokenDataset.from_corpus(lopsided, seq_len=8)
    proportional = dataset.sampler(2000, seed=0).next_batch().task_ids_B.float().mean()
    balanced = dataset.sampler(2000, seed=0, balance_tasks=True).next_batch()
    assert proportional > 0.95  # task 1 holds ~40/41 of the window starts
    assert abs(balanced.task_ids_B.float().mean() - 0.5) < 0.05
    for row, task in zip(balanced.tokens_BT[:50], balanced.task_ids_B[:50].tolist()):
        assert _contains(lopsided.train_N[task], row)


def test_resume_gives_the_same_next_batches(synthetic: TokenDataset) -> None:
    uninterrupted = synthetic.sampler(batch_size=4, seed=9)
    for _ in range(5):
        uninterrupted.next_batch()
    state = uninterrupted.state_dict()
    # Resume at another world size: rank 1 of 2 sees the second half of the same rows.
    resumed = synthetic.sampler(batch_size=4, seed=9, rank=1, world_size=2)
    resumed.load_state_dict(dict(state))
    for _ in range(3):
        expected = uninterrupted.next_batch()
        got = resumed.next_batch()
        assert torch.equal(got.tokens_BT, expected.tokens_BT[2:])
        assert torch.equal(got.task_ids_B, expected.task_ids_B[2:])
    with pytest.raises(ValueError, match="seed=9"):
        synthetic.sampler(batch_size=4, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=4"):
        synthetic.sampler(batch_size=8, seed=9).load_state_dict(state)


def test_validation_batches_are_fixed_sharded_and_cover_each_window_once(
    synthetic: TokenDataset,
) -> None:
    full = list(synthetic.validation_batches(batch_size=4))
    assert len(full) == synthetic.num_validation_windows // 4
    again = list(synthetic.validation_batches(batch_size=4))
    assert all(torch.equal(a.tokens_BT, b.tokens_BT) for a, b in zip(full, again))
    shards = [list(synthetic.validation_batches(4, rank, 2)) for rank in range(2)]
    for index, batch in enumerate(full):
        merged = torch.cat([shards[0][index].tokens_BT, shards[1][index].tokens_BT])
        assert torch.equal(merged, batch.tokens_BT)
    # Every window is a slice of its task's validation stream at a multiple of T; each
    # appears at most once, and with batch_size=1 all of them appear.
    every = list(synthetic.validation_batches(batch_size=1))
    seen: set[tuple[int, bytes]] = set()
    for batch in every:
        task = int(batch.task_ids_B[0])
        row = bytes(batch.tokens_BT[0].tolist())
        stream = bytes(synthetic.streams.val_N[task].tolist())
        assert stream.find(row) >= 0
        seen.add((task, row))
    expected = {
        (task, bytes(stream[k * 16 : k * 16 + 17].tolist()))
        for task, stream in enumerate(synthetic.streams.val_N)
        for k in range((len(stream) - 1) // 16)
    }
    assert seen == expected and len(every) == sum(
        (len(s) - 1) // 16 for s in synthetic.streams.val_N
    )
    assert len(list(synthetic.validation_batches(4, max_batches=2))) == 2
    with pytest.raises(ValueError, match="multiple of world_size=3"):
        next(synthetic.validation_batches(batch_size=4, world_size=3))


def test_synthetic_corpus_is_deterministic_and_tasks_differ() -> None:
    first = make_synthetic_corpus(num_tasks=3, train_bytes_per_task=2000, seed=4)
    second = make_synthetic_corpus(num_tasks=3, train_bytes_per_task=2000, seed=4)
    other = make_synthetic_corpus(num_tasks=3, train_bytes_per_task=2000, seed=5)
    for a, b, c in zip(first.train_N, second.train_N, other.train_N):
        assert torch.equal(a, b) and not torch.equal(a, c)
    alphabets = [set(stream.tolist()) for stream in first.train_N]
    assert len(alphabets) == 3
    assert all(len(alphabet) <= 32 for alphabet in alphabets)
    # Every pair of tasks differs (a chained `!=` would never compare the first with the last).
    for i, j in itertools.combinations(range(len(alphabets)), 2):
        assert alphabets[i] != alphabets[j], (i, j)


def test_synthetic_entropy_rate_matches_the_empirical_conditional_entropy() -> None:
    task = make_synthetic_tasks(1, alphabet_size=16, branching=3, seed=2)[0]
    x = sample_markov(task, 1 << 20, np.random.default_rng(0)).astype(np.int64)
    pairs = np.zeros((256, 256))
    np.add.at(pairs, (x[:-1], x[1:]), 1.0)
    joint = pairs / pairs.sum()
    conditional = pairs / np.maximum(pairs.sum(axis=1, keepdims=True), 1.0)
    empirical = -(joint[pairs > 0] * np.log2(conditional[pairs > 0])).sum()
    assert abs(empirical - entropy_rate_bits(task)) < 0.02
    assert 0.0 < entropy_rate_bits(task) <= np.log2(3) + 1e-9


def test_data_config_validation(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"DataConfig\.source=.tweets.*kjv, folder, jsonl, parquet, synthetic"
    ):
        DataConfig(source="tweets")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"DataConfig\.path=None"):
        DataConfig(source="folder")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"DataConfig\.seq_len=0"):
        DataConfig(seq_len=0)
    _write(tmp_path / "t" / "a.txt", "abcdefgh" * 10)
    dataset = build_dataset(DataConfig(source="folder", path=str(tmp_path), seq_len=4))  # type: ignore[arg-type]
    assert dataset.num_tasks == 1 and dataset.seq_len == 4
    synthetic = build_dataset(DataConfig(source="synthetic", seq_len=8, synthetic_num_tasks=2))  # type: ignore[arg-type]
    assert synthetic.num_tasks == 2
