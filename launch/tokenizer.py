"""`python -m launch.tokenizer data=... tokenizer.vocab_size=N out=DIR`: train a byte-level
BPE tokenizer on a corpus.

    python -m launch.tokenizer tokenizer.vocab_size=4096 out=runs/tokenizers/kjv4k
    python -m launch.tokenizer data=folder data.path=/my/texts out=runs/tokenizers/mine
    python -m launch.tokenizer data=jsonl data.path=corpus.jsonl data.text_field=text out=T

The corpus is any `data` group that names documents (kjv, folder, jsonl, parquet), read
one document at a time; documents the source marks as validation (the KJV's held-out
books) are left out. `out` receives `tokenizer.json` and `tokenizer_config.json` (the eos
token), which `data.tokenizer=DIR` then trains a model on:

    python -m launch.train data.tokenizer=runs/tokenizers/kjv4k model.vocab_size=4096
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from launch.cli import exits_on_bad_input
from launch.config import register_configs
from launch.schema import build, hydra_schema, plain_container
from moe.checkpoint.files import write_bytes
from moe.data import DataConfig
from moe.data.documents import Split, document_source
from moe.interop.bpe import BPEConfig, train_bpe
from moe.interop.tokenizer import HFTokenizer

CONFIG_PATH = "../conf"


@dataclass
class TokenizerRunConfig:
    """What `launch.tokenizer` trains (`tokenizer`) on which corpus (`data`; its
    `seq_len` and window settings are unused) and where it writes (`out`)."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: BPEConfig = field(default_factory=BPEConfig)
    out: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        if not str(self.out).strip():
            raise ValueError("out is required: out=runs/tokenizers/kjv4k (a directory)")
        if self.data.tokenizer is not None:
            raise ValueError(
                f"data.tokenizer={self.data.tokenizer!r} is invalid here; accepted: null (a "
                "new tokenizer is trained on the text itself)"
            )


def register_tokenizer_configs() -> None:
    """The data schemas (`launch.config.register_configs`) and this entry point's root."""
    register_configs()
    ConfigStore.instance().store(name="base_tokenizer_run", node=hydra_schema(TokenizerRunConfig))


def to_tokenizer_config(cfg: DictConfig | dict[str, Any]) -> TokenizerRunConfig:
    return build(TokenizerRunConfig, plain_container(cfg, throw_on_missing=True))


def train_tokenizer(config: TokenizerRunConfig) -> HFTokenizer:
    """Train on the corpus's training documents and write `out` (each file atomically)."""
    source = document_source(config.data)

    def texts() -> Iterator[str]:
        for document in source.documents():
            if document.split != Split.VALIDATION:
                yield document.text

    tokenizer = train_bpe(texts(), config.tokenizer, source.num_documents, config.progress)
    out = Path(config.out)
    for name, data in tokenizer.files().items():
        write_bytes(out / name, data)
    return tokenizer


@hydra.main(config_path=CONFIG_PATH, config_name="tokenizer", version_base=None)
@exits_on_bad_input("launch.tokenizer")
def main(cfg: DictConfig) -> None:
    config = to_tokenizer_config(cfg)
    tokenizer = train_tokenizer(config)
    wanted = config.tokenizer.vocab_size
    note = (
        "" if tokenizer.vocab_size == wanted else f" (asked {wanted}: the corpus has fewer pairs)"
    )
    print(
        f"[tokenizer] {tokenizer.vocab_size} tokens{note}, eos {tokenizer.eos_token!r} "
        f"(id {tokenizer.eos_token_id}) -> {config.out}\n"
        f"[tokenizer] train on it: python -m launch.train data.tokenizer={config.out} "
        f"model.vocab_size={tokenizer.vocab_size}",
        flush=True,
    )


register_tokenizer_configs()

if __name__ == "__main__":
    main()
