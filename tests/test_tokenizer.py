"""Tokenizers (`moe.interop.tokenizer`): bytes by default, HF `tokenizers` files, and
streaming text that never splits a UTF-8 character."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from moe.interop.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    load_tokenizer,
)

TEXT = "In the beginning God créa le ciel et la terre. 日本語のテキスト 🙂 naïve café, ünïcödé!"


def _train_bpe(directory: Path, vocab_size: int = 300) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([TEXT * 3, "the the the and and God"], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return HFTokenizer.from_dir(directory)


def _stream(tokenizer: object, ids: list[int], prompt: list[int], seed: int) -> list[str]:
    rng = random.Random(seed)
    detok = IncrementalDetokenizer(tokenizer, prompt)  # type: ignore[arg-type]
    pieces, start = [], 0
    while start < len(ids):
        step = rng.randint(1, 3)
        pieces.append(detok.add(ids[start : start + step]))
        start += step
    pieces.append(detok.finish())
    return pieces


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_stream_is_always_a_prefix_and_ends_as_the_whole_text(kind: str, tmp_path: Path) -> None:
    tokenizer = ByteTokenizer() if kind == "bytes" else _train_bpe(tmp_path)
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    for seed in range(5):
        cut = random.Random(seed).randint(0, len(ids) // 2)
        prompt, generated = ids[:cut], ids[cut:]
        want = TEXT[len(tokenizer.decode(prompt)) :] if kind == "bytes" else None
        pieces = _stream(tokenizer, generated, prompt, seed)
        shown = ""
        for piece in pieces:
            shown += piece
            assert "\ufffd" not in shown, "a split UTF-8 character was emitted"
        final = tokenizer.decode(ids)[len(tokenizer.decode(prompt)) :]
        assert shown == final
        if want is not None:
            assert shown == want


def test_invalid_bytes_are_flushed_at_the_end() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.add([0xE6, 0x97]) == ""  # the start of a three-byte character
    assert detok.finish() == "\ufffd"


def test_load_tokenizer_picks_the_files(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    _train_bpe(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.eos_token == "<eos>" and loaded.eos_token_id == 0
    assert loaded.vocab_size == 300


def test_byte_decode_takes_every_kind_of_id_sequence() -> None:
    """Lists, tuples, numpy arrays, tensors and float ids all decode to the text of the
    bytes they name (an array read as a raw buffer would give its 8-byte integers)."""
    import numpy as np
    import torch

    ids = [104, 105, 0xE2, 0x82, 0xAC, 0xFF, 33]
    want = "".join(map(chr, ids[:2])) + "\u20ac\ufffd!"
    tokenizer = ByteTokenizer()
    for given in (ids, tuple(ids), np.array(ids), torch.tensor(ids), [float(i) for i in ids],
                  [np.int64(i) for i in ids]):  # fmt: skip
        assert tokenizer.decode(given) == want, type(given)
    for bad in ([65, -1], (65, 256), np.array([65, 256])):
        with pytest.raises(ValueError, match=r"not bytes; accepted: 0\.\.255"):
            tokenizer.decode(bad)


def test_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not bytes; accepted: 0\.\.255"):
        ByteTokenizer().decode([65, 300])
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a tokenizers file"):
        load_tokenizer(tmp_path)
    tokenizer = _train_bpe(tmp_path)
    with pytest.raises(ValueError, match=r"outside the vocabulary 0\.\.299"):
        tokenizer.decode([5, 300])


def test_a_decoder_that_depends_on_the_left_neighbour_streams_the_whole_text(
    tmp_path: Path,
) -> None:
    """Metaspace (SentencePiece-style, as Mixtral's tokenizer): a token "▁the" decodes to
    "the" at the start of a text and " the" after another word; the stream must give
    the spaces the whole text has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"])
    text = "the cat sat on the mat and the dog sat on the log"
    tokenizer.train_from_iterator([text] * 4, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    ids = loaded.encode(text)
    assert loaded.decode(ids) == text
    for seed in range(3):
        shown = "".join(_stream(loaded, ids[3:], ids[:3], seed))
        assert shown == text[len(loaded.decode(ids[:3])) :]


def test_a_checkpoint_carries_its_tokenizer(tmp_path: Path) -> None:
    """Tokenizer files saved as checkpoint attachments come back (checksummed) with the
    model; a checkpoint without them is byte-level; a corrupted file is refused."""
    from moe.checkpoint import save_checkpoint
    from moe.config import ModelConfig
    from moe.inference import load_model
    from moe.transformer import MoETransformer
    from routing import RoutingConfig

    tokenizer = _train_bpe(tmp_path)
    config = ModelConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                         max_seq_len=16, ffn_hidden=32, expert_hidden=8, num_experts=2)  # fmt: skip
    routing = RoutingConfig(top_k=1)
    model = MoETransformer(config, routing)
    record = {"model": config.__dict__, "routing": routing.__dict__}
    with_files = save_checkpoint(
        tmp_path / "a", model, None, 1, _plain(record), attachments=tokenizer.files()
    )
    loaded = load_model(with_files)
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert loaded.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    assert loaded.tokenizer.eos_token == "<eos>"
    bytes_only = save_checkpoint(tmp_path / "b", model, None, 1, _plain(record))
    assert isinstance(load_model(bytes_only).tokenizer, ByteTokenizer)
    (with_files / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="is corrupt"):
        load_model(with_files)
    with pytest.raises(ValueError, match=r"attachment .meta\.json. is invalid"):
        save_checkpoint(
            tmp_path / "c", model, None, 1, _plain(record), attachments={"meta.json": b""}
        )


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return getattr(value, "value", value)
