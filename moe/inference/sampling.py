"""Sampling the next token: greedy, temperature, top-k, top-p, per-request seeds.

Each request owns a `torch.Generator` seeded from its `seed`, and its row of logits is
filtered and sampled on its own, so what a request samples does not depend on which
other requests share the batch (Orca / vLLM semantics; docs/METHODS.md, "Sampling and
iteration-level batching").

Legend: B sequences in the step, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled.

    `temperature` 0 is greedy (argmax; `top_k`, `top_p` and `seed` then do nothing).
    `top_k` 0 keeps every token; `top_p` 1.0 keeps every token (nucleus sampling keeps
    the smallest set of most likely tokens whose probability reaches `top_p`). `stop`:
    strings that end the completion, matched on its text (UTF-8 bytes are read as
    text); the completion is cut before the first one.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default=())
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(
                f"max_tokens={self.max_tokens!r} is invalid; accepted: an integer >= 1"
            )
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} is invalid; accepted: >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(
                f"top_k={self.top_k!r} is invalid; accepted: 0 (off) or an integer >= 1"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is invalid; accepted: a number in (0, 1]")
        stop = tuple(_stop_text(s) for s in self.stop)
        if any(not s for s in stop):
            raise ValueError(f"stop={self.stop!r} is invalid; accepted: non-empty strings")
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is invalid; accepted: an integer")


def _stop_text(stop: object) -> str:
    if isinstance(stop, bytes):
        try:
            return stop.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"stop string {stop!r} is not UTF-8 text") from None
    if not isinstance(stop, str):
        raise ValueError(f"stop string {stop!r} is invalid; accepted: str (or UTF-8 bytes)")
    return stop


def filtered_probs(logits_V: Tensor, params: SamplingParams) -> Tensor:
    """The distribution one request samples from: softmax(logits / T) restricted to the
    top-k tokens and then to the top-p nucleus, renormalised. float32 [V]."""
    logits_V = logits_V.float() / params.temperature
    vocab = logits_V.shape[0]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits_V, params.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if params.top_p < 1.0:
        sorted_V, order_V = torch.sort(probs_V, descending=True)
        before_V = torch.cumsum(sorted_V, dim=0) - sorted_V  # mass of the tokens above
        drop_V = before_V >= params.top_p  # the token that crosses top_p stays
        probs_V = probs_V.scatter(0, order_V, sorted_V.masked_fill(drop_V, 0.0))
        probs_V = probs_V / probs_V.sum()
    return probs_V


def sample_tokens(
    logits_BV: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """One next token per row: row b with `params[b]` and its own `generators[b]`."""
    if not len(params) == len(generators) == logits_BV.shape[0]:
        raise ValueError(
            f"{logits_BV.shape[0]} rows of logits, {len(params)} params, "
            f"{len(generators)} generators; accepted: one each per row"
        )
    tokens = []
    greedy_B = logits_BV.argmax(dim=-1).tolist()
    for row, (param, generator) in enumerate(zip(params, generators)):
        if param.temperature == 0:
            tokens.append(int(greedy_B[row]))
            continue
        probs_V = filtered_probs(logits_BV[row], param)
        tokens.append(int(torch.multinomial(probs_V, 1, generator=generator)))
    return tokens
