"""Training on a BPE: `launch.tokenizer` writes a tokenizer that transformers reads the
same way; a run on `data.tokenizer` checks the model's vocabulary, carries the tokenizer
in every checkpoint, resumes exactly and refuses another tokenizer; and a run on a corpus
whose token shards exceed the process's memory cap trains (the corpus is never read
whole)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_train import tiny_config

from launch.config import RunConfig, register_configs
from launch.tokenizer import TokenizerRunConfig, to_tokenizer_config, train_tokenizer
from launch.training.checkpointing import config_dict
from launch.training.loop import train
from moe.checkpoint import LATEST_FILE, read_meta
from moe.data import DataConfig, build_dataset
from moe.data.kjv import read_books
from moe.inference import load_model
from moe.interop.bpe import BPEConfig
from moe.interop.tokenizer import HFTokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 384


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tasks of KJV text (about 40 KB each), a few files per task."""
    root = tmp_path_factory.mktemp("texts")
    books = read_books()
    for task, first in (("law", 0), ("gospels", 39)):
        (root / task).mkdir()
        for index in range(3):
            text = books[first + index][3][:14_000] + "\nnaïve café 🙂\n"
            (root / task / f"{index}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    register_configs()
    config = to_tokenizer_config(
        {
            "data": {"source": "folder", "path": str(corpus)},
            "tokenizer": {"vocab_size": VOCAB},
            "out": str(out),
            "progress": False,
        }
    )
    train_tokenizer(config)
    return out


def test_launch_tokenizer_writes_what_transformers_reads(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    ours = HFTokenizer.from_dir(tokenizer_dir)
    assert ours.vocab_size == VOCAB and ours.eos_token == "<|endoftext|>"
    assert ours.eos_token_id == 0
    theirs = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = "And God said, Let there be light: naïve café 🙂 日本"
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert theirs.eos_token_id == ours.eos_token_id
    assert ours.decode(ours.encode(text)) == text
    merged = [i for i in ours.encode("And God said unto Moses") if i > 256]
    assert merged, "no merge learned from the corpus"


def test_launch_tokenizer_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.vocab_size=200 is invalid; accepted: >= 257"):
        BPEConfig(vocab_size=200)
    with pytest.raises(ValueError, match="out is required"):
        TokenizerRunConfig(out="")
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "blank.txt").write_text("")
    config = TokenizerRunConfig(
        data=DataConfig(source="folder", path=str(empty)),  # type: ignore[arg-type]
        out=str(tmp_path / "out"),
        progress=False,
    )
    with pytest.raises(ValueError, match="holds no text"):
        train_tokenizer(config)
    assert not (tmp_path / "out").exists()


def _config(run_dir: Path, corpus: Path, tokenizer: Path, cache: Path, *more: str) -> RunConfig:
    return tiny_config(
        run_dir,
        "data=folder",
        f"data.path={corpus}",
        f"data.tokenizer={tokenizer}",
        f"data.cache_dir={cache}",
        "data.seq_len=32",
        f"model.vocab_size={VOCAB}",
        "train.batch_size=8",
        "train.eval_batches=2",
        "train.warmup_steps=1",
        *more,
    )


@pytest.mark.slow
def test_a_run_on_a_tokenizer_checks_carries_and_resumes(
    corpus: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    steps = ("train.steps=6", "train.checkpoint_every=3", "train.eval_every=3")
    with pytest.raises(ValueError, match=rf"model\.vocab_size=256 .*set model\.vocab_size={VOCAB}"):
        train(_config(tmp_path / "bad", corpus, tokenizer_dir, cache, "model.vocab_size=256"))
    assert not (tmp_path / "bad").exists()

    full = train(_config(tmp_path / "full", corpus, tokenizer_dir, cache, *steps))
    # Every checkpoint carries the tokenizer files, and load_model gives them back.
    expected = HFTokenizer.from_dir(tokenizer_dir).files()
    for step in (3, 6):
        directory = tmp_path / "full" / "checkpoints" / f"step_{step}"
        assert {name: (directory / name).read_bytes() for name in expected} == expected
        assert set(expected) <= set(read_meta(directory)["files"])
    loaded = load_model(tmp_path / "full")
    assert loaded.tokenizer.files() == expected and loaded.model.config.vocab_size == VOCAB
    # Bits per byte: per token over ln 2, times the validation text's tokens per byte.
    dataset = build_dataset(_config(tmp_path / "x", corpus, tokenizer_dir, cache).data)
    last = full.evaluations[-1]
    assert last["val_bpb"] == pytest.approx(
        last["val_loss"] / math.log(2) * dataset.val_tokens_per_byte
    )
    assert 0.3 < dataset.val_tokens_per_byte < 0.7

    # An interrupted run resumes at the same window: the same losses, bit for bit.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_3", resumed_dir / "step_3")
    (resumed_dir / LATEST_FILE).write_text("step_3\n")
    resumed = train(_config(tmp_path / "resumed", corpus, tokenizer_dir, cache, *steps))
    assert resumed.start_step == 3 and resumed.losses == full.losses[3:]

    # Resuming on another tokenizer (or on bytes) is refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    with pytest.raises(ValueError, match="was trained on the tokenizer files"):
        train(_config(tmp_path / "full", corpus, other, cache, "train.steps=9"))
    with pytest.raises(ValueError, match=r"trained on the tokenizer files .* tokenized by bytes"):
        train(_config(tmp_path / "full", corpus, tokenizer_dir, cache, "train.steps=9",
                      "data.tokenizer=null"))  # fmt: skip
    # So is fine-tuning it (train.init_from) on another tokenizer or on bytes, even where
    # the vocabulary fits; on its own tokenizer it starts from the checkpoint's weights.
    init = f"train.init_from={tmp_path / 'full'}"
    with pytest.raises(ValueError, match=r"tokenizer files .*or another train\.init_from"):
        train(_config(tmp_path / "ft_other", corpus, other, cache, init))
    with pytest.raises(ValueError, match=r"trained on the tokenizer files .* tokenized by bytes"):
        train(_config(tmp_path / "ft_bytes", corpus, tokenizer_dir, cache, init,
                      "data.tokenizer=null"))  # fmt: skip
    tuned = train(_config(tmp_path / "ft", corpus, tokenizer_dir, cache, init, "train.steps=1"))
    assert tuned.start_step == 0 and tuned.losses[0] < full.losses[0] - 0.5


CORPUS_MIB = 640  # of text, stored as uint8 byte tokens: shards of 640 MiB
MARGIN_MIB = 192  # private memory allowed beyond what the imports hold (~290 MiB)


def _write_large_parquet(path: Path) -> None:
    """CORPUS_MIB of text in rows of 64 KiB, compressed to well under a megabyte."""
    passage = read_books()[0][3][:4096]
    row_bytes = 1 << 16
    rows_total = (CORPUS_MIB << 20) // row_bytes
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows_total, 64):
            rows = [
                f"row {i}\n" + passage * (row_bytes // len(passage))
                for i in range(start, min(start + 64, rows_total))
            ]
            writer.write_table(pa.table({"text": rows}, schema=schema), row_group_size=64)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA semantics")
def test_training_on_shards_larger_than_the_memory_cap(tmp_path: Path) -> None:
    """A subprocess caps its private memory (RLIMIT_DATA, see tests/capped_training.py)
    at its imports plus MARGIN_MIB, tokenizes a Parquet corpus into byte shards larger
    than the whole cap, trains a few steps on them, and checks that allocating the
    corpus's size would have failed."""
    corpus = tmp_path / "corpus.parquet"
    _write_large_parquet(corpus)
    cache = tmp_path / "cache"
    config = tiny_config(
        tmp_path / "run", "data=parquet", f"data.path={corpus}", f"data.cache_dir={cache}",
        "data.seq_len=32", "train.steps=3", "train.batch_size=8", "train.eval_every=3",
        "train.eval_batches=1", "train.checkpoint_every=3", "train.warmup_steps=1",
    )  # fmt: skip
    request = {
        "config": config_dict(config),
        "margin": MARGIN_MIB << 20,
        "check_bytes": CORPUS_MIB << 20,
    }
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "capped_training.py"), json.dumps(request)],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    shard_bytes = sum(path.stat().st_size for path in cache.rglob("shard_*.bin"))
    assert shard_bytes >= CORPUS_MIB << 20
    assert shard_bytes > report["cap"], (shard_bytes, report)
    assert report["final_step"] == 3 and report["cap_bites"], report
