"""The text side of one generated sequence: ids in, text out, stop strings and eos.

`TextStream` turns the ids a sequence samples into text with
`moe.interop.tokenizer.IncrementalDetokenizer` (never a split UTF-8 character; decoded
with the prompt's last ids as left context), ends the sequence on the tokenizer's eos id
(not decoded) or on a stop string found in the text, and says which text is safe to show:
everything but a tail that could still become a stop string. The completion's text is
cut before the first stop string.

`encode_prompt` is how a request's prompt becomes ids: token ids as given, text through
the tokenizer (with its special tokens, e.g. a bos it asks for), and bytes as the byte
values for a byte-level tokenizer or as UTF-8 text otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from moe.interop.tokenizer import ByteTokenizer, IncrementalDetokenizer, Tokenizer

Prompt = str | bytes | Sequence[int]


def encode_prompt(prompt: Prompt, tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """The ids of `prompt` (see the module docstring); a ValueError for an empty prompt
    or an id outside [0, vocab_size)."""
    if isinstance(prompt, bytes | bytearray):
        if isinstance(tokenizer, ByteTokenizer):
            ids = list(bytes(prompt))
        else:
            try:
                ids = tokenizer.encode(bytes(prompt).decode("utf-8"), add_special_tokens=True)
            except UnicodeDecodeError as error:
                raise ValueError(f"prompt bytes are not UTF-8 text ({error})") from None
    elif isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids {bad[:5]} are invalid; accepted: ids in [0, {vocab_size})"
            )
    if not ids:
        raise ValueError(f"prompt={prompt!r} is invalid; accepted: non-empty text or ids")
    return ids


class TextStream:
    """The text of one sequence's generated ids (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        eos_token_id: int | None = None,
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = tuple(stop)
        self.eos_token_id = eos_token_id
        self.text = ""  # decoded so far (whole characters)
        self.shown = 0  # characters of `text` already given out
        self.stop_at: int | None = None  # where the first stop string starts
        self.ended_by_eos = False
        self._longest = max((len(s) for s in self.stop), default=0)

    def push(self, token_id: int) -> bool:
        """Take the next id; True when it ends the sequence (eos, or a stop string now in
        the text)."""
        if token_id == self.eos_token_id:
            self.ended_by_eos = True
            return True
        return self._extend(self.detokenizer.add([token_id]))

    def _extend(self, new: str) -> bool:
        # Only a stop string that ends in the new text can be new.
        start = max(0, len(self.text) - self._longest + 1)
        self.text += new
        found = [i for s in self.stop if (i := self.text.find(s, start)) != -1]
        if found:
            self.stop_at = min(found)
        return self.stop_at is not None

    def visible(self) -> str:
        """The text newly safe to show: all but a tail that may become a stop string."""
        hold = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        end = len(self.text) - hold if self.stop_at is None else self.stop_at
        piece = self.text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece

    def finish(self) -> tuple[str, str]:
        """(the completion's whole text, the part of it not shown yet). Text held back
        for an unfinished character is flushed (as U+FFFD where it stays incomplete)."""
        if self.stop_at is None:
            self._extend(self.detokenizer.finish())
        final = self.text if self.stop_at is None else self.text[: self.stop_at]
        piece = final[self.shown :]
        self.shown = len(final)
        return final, piece
