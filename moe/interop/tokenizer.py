"""Tokenizers: how text becomes token ids and back, for the engine, generation, serving
and data.

- `ByteTokenizer` (the default, vocabulary 256): a token is one byte of the UTF-8 text.
- `HFTokenizer`: a HuggingFace `tokenizers` tokenizer (`tokenizer.json`), with the special
  tokens and chat template of `tokenizer_config.json` when the directory has one.
- `load_tokenizer(directory)`: `HFTokenizer` when the directory holds `tokenizer.json`
  (a checkpoint carries its tokenizer files beside `meta.json`), `ByteTokenizer`
  otherwise.
- `IncrementalDetokenizer`: text out of a growing list of ids, for streams. The text it
  has emitted is always a prefix of the final text: it holds back text that ends in an
  incomplete UTF-8 character (decoded as U+FFFD) until the character is complete, and
  decodes a short window of earlier ids with the new ones, so that a tokenizer whose
  decoding of a token depends on its left neighbour (a leading-space marker, say) emits
  what the whole sequence would. `finish()` flushes what was held back.

Nothing here reads the network: a tokenizer comes from files on disk.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
REPLACEMENT = "\ufffd"


class Tokenizer(Protocol):
    """What the engine, serving and the data loader need of a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Ids are in [0, vocab_size)."""
        ...

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def eos_token(self) -> str | None: ...

    @property
    def bos_token(self) -> str | None: ...

    @property
    def chat_template(self) -> str | None:
        """The Jinja2 chat template of the tokenizer files (None: none given)."""
        ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """The ids of each text (no special tokens) as an integer array each: what the
        data loader tokenizes corpora with (no Python int per token)."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def files(self) -> dict[str, bytes]:
        """The files that carry this tokenizer (a checkpoint stores them beside
        meta.json); {} for bytes."""
        ...


class ByteTokenizer:
    """One token per byte of UTF-8 text (vocabulary 256, no special tokens). Decoding
    bytes that are not valid UTF-8 gives U+FFFD for each bad sequence."""

    vocab_size = 256
    eos_token_id = None
    eos_token = None
    bos_token = None
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # The common case in C (a decode step decodes every sequence's window); only for
        # lists and tuples: `bytes` of an array would read its raw buffer.
        if isinstance(ids, (list, tuple)):
            # Ids that are not all ints in 0..255 are checked one by one below.
            with contextlib.suppress(TypeError, ValueError):
                return bytes(ids).decode("utf-8", errors="replace")
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are not bytes; accepted: 0..255")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def files(self) -> dict[str, bytes]:
        return {}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A `tokenizers.Tokenizer` read from `tokenizer.json`, with `tokenizer_config.json`'s
    eos/bos tokens and chat template when given. `add_bos`: whether `encode(...,
    add_special_tokens=True)` prepends the bos token (the config's `add_bos_token`)."""

    def __init__(self, tokenizer_json: str, config: dict[str, Any] | None, source: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.source = source
        try:
            self._tokenizer = RustTokenizer.from_str(tokenizer_json)
        except Exception as error:  # the Rust library raises its own exception types
            raise ValueError(f"{source} is not a tokenizers file: {error}") from None
        self._json = tokenizer_json
        # Asked on every decode; the library recounts its added tokens each time (1.3 ms
        # with 50k of them).
        self._vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        self.config = dict(config or {})
        self._eos = _token_text(self.config.get("eos_token"))
        self._bos = _token_text(self.config.get("bos_token"))
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self._bos is not None
        template = self.config.get("chat_template")
        self._chat_template = template if isinstance(template, str) else None

    @classmethod
    def from_dir(cls, directory: str | Path) -> HFTokenizer:
        """From `tokenizer.json` (and `tokenizer_config.json` when present) in `directory`."""
        directory = Path(directory)
        names = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)
        files = {
            name: (directory / name).read_bytes() for name in names if (directory / name).is_file()
        }
        return cls.from_files(files, str(directory / TOKENIZER_FILE))

    @classmethod
    def from_files(cls, files: dict[str, bytes], source: str) -> HFTokenizer:
        """From the contents of the tokenizer files (`files()`'s output)."""
        if TOKENIZER_FILE not in files:
            raise ValueError(f"{source}: no {TOKENIZER_FILE} among {sorted(files)}")
        config: dict[str, Any] = {}
        if TOKENIZER_CONFIG_FILE in files:
            try:
                config = json.loads(files[TOKENIZER_CONFIG_FILE])
            except ValueError as error:
                raise ValueError(
                    f"{source}: {TOKENIZER_CONFIG_FILE} is not JSON: {error}"
                ) from None
        return cls(files[TOKENIZER_FILE].decode("utf-8"), config, source)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token(self) -> str | None:
        return self._eos

    @property
    def eos_token_id(self) -> int | None:
        return None if self._eos is None else self._tokenizer.token_to_id(self._eos)

    @property
    def bos_token(self) -> str | None:
        return self._bos

    @property
    def bos_token_id(self) -> int | None:
        return None if self._bos is None else self._tokenizer.token_to_id(self._bos)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(self._tokenizer.encode(text, add_special_tokens=False).ids)
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos and bos is not None:
            ids = [bos, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # The Rust library encodes a batch on its own thread pool.
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= int(i) < size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary 0..{size - 1}")
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def files(self) -> dict[str, bytes]:
        out = {TOKENIZER_FILE: self._json.encode("utf-8")}
        if self.config:
            out[TOKENIZER_CONFIG_FILE] = json.dumps(self.config, indent=2).encode("utf-8")
        return out

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)


def load_tokenizer(directory: str | Path | None) -> Tokenizer:
    """The tokenizer a directory (an HF model directory, a tokenizer folder) carries:
    `HFTokenizer` when `directory/tokenizer.json` exists, else `ByteTokenizer`. A
    checkpoint's is read, checksums verified, by `moe.inference.loading`."""
    if directory is not None and (Path(directory) / TOKENIZER_FILE).is_file():
        return HFTokenizer.from_dir(directory)
    return ByteTokenizer()


def tokenizer_from_files(files: dict[str, bytes], source: str) -> Tokenizer:
    """The tokenizer whose files are `files` ({}: bytes)."""
    return HFTokenizer.from_files(files, source) if files else ByteTokenizer()


class IncrementalDetokenizer:
    """Text of a growing id sequence, emitted piece by piece (see the module docstring).

    `prompt_ids` give the left context (their text is not emitted). `add(ids)` returns
    the text newly safe to show; `finish()` what is left. The concatenation of every
    returned piece equals `decode(generated ids)`'s text as seen after the prompt."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), context: int = 6):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids)[-context:]
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = len(self.ids)  # ids before this are emitted (or prompt)
        self.context = context
        self.text = ""

    def add(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        return self._emit(final=False)

    def finish(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset])
        after = decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return ""
        new = after[len(before) :]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - self.context)
        # Keep the window's ids only: memory stays bounded for long streams.
        if self.prefix_offset > 0:
            self.ids = self.ids[self.prefix_offset :]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        self.text += new
        return new
