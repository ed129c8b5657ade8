"""Sampling the next token: greedy, temperature, top-k, top-p, per-request seeds,
presence/frequency penalties, logit bias, and the log-probabilities a request asks for.

Each request owns a `torch.Generator` seeded from its `seed`, and its row of logits is
adjusted, filtered and sampled on its own, so what a request samples does not depend on
which other requests share the batch (Orca / vLLM semantics; docs/METHODS.md, "Sampling
and iteration-level batching").

The order, per row (OpenAI's definitions, docs/SERVING.md):

    adjusted = logits - presence_penalty * [count > 0] - frequency_penalty * count + bias
    probs    = top_p(top_k(softmax(adjusted / temperature)))   (temperature 0: argmax)

where `count[v]` is how often token v was generated so far in this sequence (the prompt
does not count) and `bias[v]` the request's `logit_bias`.

Log-probabilities (`token_logprobs`) are the model's own: log-softmax of the raw logits
of the step the token was sampled from, before penalties, bias, temperature and
filters, computed on the same logits tensor (no extra model call); the chosen token's
log-probability and the `k` most likely alternatives.

Legend: B sequences in the step, V vocabulary, P positions of a prompt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled.

    `max_tokens` 0 generates nothing (the prompt is only read: with `prompt_logprobs`,
    scored). `temperature` 0 is greedy (argmax of the adjusted logits; `top_k`, `top_p`
    and `seed` then do nothing). `top_k` 0 keeps every token; `top_p` 1.0 keeps every
    token (nucleus sampling keeps the smallest set of most likely tokens whose
    probability reaches `top_p`). `stop`: strings that end the completion, matched on
    its text (UTF-8 bytes are read as text); the completion is cut before the first
    one. `presence_penalty`, `frequency_penalty`, `logit_bias` ((token id, bias) pairs;
    a mapping is accepted): see the module docstring. `logprobs`: None, or the number of
    alternatives (0..) to report with each generated token's log-probability;
    `prompt_logprobs` the same for every prompt token after the first (scored in the
    prefill). `routed_experts`: report, for each generated token, the experts of every
    MoE layer at the position that produced it.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default=())
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    routed_experts: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens={self.max_tokens!r} is invalid; accepted: an integer")
        if self.max_tokens < 0:
            raise ValueError(
                f"max_tokens={self.max_tokens!r} is invalid; accepted: an integer >= 0"
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is invalid; accepted: a finite number")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{name}={value!r} is invalid; accepted: None or an integer >= 0")

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a bias change this request's logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def _bias_pairs(
    bias: Mapping[int, float] | Sequence[tuple[int, float]],
) -> tuple[tuple[int, float], ...]:
    items = bias.items() if isinstance(bias, Mapping) else bias
    pairs = []
    for item in items:
        token, value = item
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias token {token!r} is invalid; accepted: a token id >= 0")
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"logit_bias[{token}]={value!r} is invalid; accepted: a number")
        pairs.append((token, float(value)))
    return tuple(sorted(pairs))


def adjusted_logits(logits_V: Tensor, params: SamplingParams, generated: Sequence[int]) -> Tensor:
    """The logits after penalties and bias (module docstring): float32 [V]. `generated`:
    the ids this sequence generated so far."""
    logits_V = logits_V.float()
    if not params.adjusts_logits:
        return logits_V
    vocab = logits_V.shape[0]
    logits_V = logits_V.clone()
    if generated and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(generated, dtype=torch.int64, device=logits_V.device)
        counts_V = torch.bincount(ids, minlength=vocab)[:vocab].float()
        logits_V -= params.frequency_penalty * counts_V
        logits_V -= params.presence_penalty * (counts_V > 0).float()
    if params.logit_bias:
        # The engine checked that every id is below V.
        ids = torch.tensor([t for t, _ in params.logit_bias], device=logits_V.device)
        values = torch.tensor([b for _, b in params.logit_bias], device=logits_V.device)
        logits_V.index_add_(0, ids, values)  # a token named twice gets both biases
    return logits_V


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
    logits_BV: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    generated: Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """One next token per row: row b with `params[b]`, its own `generators[b]` and the
    ids it generated so far, `generated[b]` (penalties; None: nothing yet)."""
    if not len(params) == len(generators) == logits_BV.shape[0]:
        raise ValueError(
            f"{logits_BV.shape[0]} rows of logits, {len(params)} params, "
            f"{len(generators)} generators; accepted: one each per row"
        )
    if generated is not None and len(generated) != len(params):
        raise ValueError(f"{len(generated)} histories for {len(params)} rows; accepted: one each")
    tokens = []
    greedy_B = logits_BV.argmax(dim=-1).tolist()
    for row, (param, generator) in enumerate(zip(params, generators)):
        if param.temperature == 0 and not param.adjusts_logits:
            tokens.append(int(greedy_B[row]))
            continue
        logits_V = adjusted_logits(logits_BV[row], param, generated[row] if generated else ())
        if param.temperature == 0:
            tokens.append(int(logits_V.argmax()))
            continue
        probs_V = filtered_probs(logits_V, param)
        tokens.append(int(torch.multinomial(probs_V, 1, generator=generator)))
    return tokens


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model and the `k` most likely tokens at its
    position, most likely first (`top`: (token id, log-probability) pairs). A tuple: it
    crosses process boundaries once per token, and tuples pickle smallest."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(
    logits_BV: Tensor, tokens_B: Sequence[int], top_B: Sequence[int]
) -> list[TokenLogprob]:
    """Row b: the log-probability of `tokens_B[b]` under log-softmax(logits_BV[b]) and
    the `top_B[b]` most likely tokens. One log-softmax and one top-k over all rows, one
    copy to the host."""
    if not logits_BV.shape[0] == len(tokens_B) == len(top_B):
        raise ValueError(
            f"{logits_BV.shape[0]} rows of logits, {len(tokens_B)} tokens, {len(top_B)} "
            "top counts; accepted: one each per row"
        )
    if not len(tokens_B):
        return []
    logprobs_BV = torch.log_softmax(logits_BV.float(), dim=-1)
    ids_B1 = torch.tensor(tokens_B, dtype=torch.int64, device=logits_BV.device)[:, None]
    chosen_B = logprobs_BV.gather(1, ids_B1)[:, 0].tolist()
    k = min(max(top_B), logprobs_BV.shape[1])
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if k > 0:
        values_BK, ids_BK = torch.topk(logprobs_BV, k, dim=-1)
        top_values, top_ids = values_BK.tolist(), ids_BK.tolist()
    out = []
    for row, (token, count) in enumerate(zip(tokens_B, top_B)):
        top = tuple(zip(top_ids[row][:count], top_values[row][:count])) if count else ()
        out.append(TokenLogprob(int(token), float(chosen_B[row]), top))
    return out
