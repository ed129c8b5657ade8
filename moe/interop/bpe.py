"""Train a byte-level BPE tokenizer (HuggingFace `tokenizers`) on a stream of texts.

The tokenizer is GPT-2's kind: text is UTF-8 bytes, each byte one of 256 base tokens
(so every text encodes, nothing is unknown), pre-split by the GPT-2 regex, then merged by
the learned BPE merges. The special tokens come first (`eos_token` is id 0), the 256
bytes next, the merges after them. `tokenizer_config.json` names the eos token and
`PreTrainedTokenizerFast`, so that `transformers.AutoTokenizer` loads the directory too.

The trainer holds one count per distinct pre-token, never the corpus: the texts are
consumed one by one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from moe.interop.tokenizer import HFTokenizer

NUM_BYTE_TOKENS = 256


@dataclass
class BPEConfig:
    """The `tokenizer` group of `launch.tokenizer`: the vocabulary size wanted (bytes,
    special tokens and merges together), how often a pair must occur to be merged, and
    the end-of-document token (what the data loader puts between documents)."""

    vocab_size: int = 4096
    min_frequency: int = 2
    eos_token: str = "<|endoftext|>"

    def __post_init__(self) -> None:
        smallest = NUM_BYTE_TOKENS + len(self.special_tokens)
        if not isinstance(self.vocab_size, int) or self.vocab_size < smallest:
            raise ValueError(
                f"tokenizer.vocab_size={self.vocab_size!r} is invalid; accepted: >= {smallest} "
                f"({NUM_BYTE_TOKENS} byte tokens + {len(self.special_tokens)} special token)"
            )
        if not isinstance(self.min_frequency, int) or self.min_frequency < 1:
            raise ValueError(
                f"tokenizer.min_frequency={self.min_frequency!r} is invalid; accepted: >= 1"
            )
        if not self.eos_token:
            raise ValueError("tokenizer.eos_token='' is invalid; accepted: a non-empty string")

    @property
    def special_tokens(self) -> list[str]:
        return [self.eos_token]


def train_bpe(
    texts: Iterable[str], config: BPEConfig, length: int | None = None, progress: bool = True
) -> HFTokenizer:
    """A byte-level BPE trained on `texts` (`length`: how many, for the progress bar).

    The vocabulary can come out smaller than `config.vocab_size` when the texts offer
    fewer pairs of `min_frequency` occurrences. ValueError when `texts` hold no text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=config.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    seen = [0]

    def counted() -> Iterator[str]:
        for text in texts:
            if text:
                seen[0] += len(text)
                yield text

    tokenizer.train_from_iterator(counted(), trainer, length=length)
    if seen[0] == 0:
        raise ValueError("the corpus holds no text; accepted: a corpus with non-empty documents")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": config.eos_token,
        "add_bos_token": False,
    }
    return HFTokenizer(tokenizer.to_str(), tokenizer_config, source="trained byte-level BPE")
