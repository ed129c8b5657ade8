"""What an engine step reports besides the next tokens, computed from the step's own
logits and routing (no extra model call): the scores of prompt tokens a prefill read,
each sampled token's log-probability and alternatives, and the experts it was routed to.

Legend: T packed tokens of the step, B sequences in the step, V vocabulary, K experts per
token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from moe.inference.sampling import SamplingParams, TokenLogprob, token_logprobs
from moe.transformer import MoETransformer


class GeneratedToken(NamedTuple):
    """One sampled token: its id; its log-probability and alternatives when the request
    asked (`SamplingParams.logprobs`); when asked (`routed_experts`), the experts every
    MoE layer chose (global ids, one tuple of K per layer in block order) at the
    position whose logits the token was sampled from. A tuple, like `TokenLogprob`."""

    id: int
    logprob: TokenLogprob | None = None
    experts: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class PromptSpan:
    """The part of a prompt one step's prefill read, for a request that scores its
    prompt: `count` tokens at positions `start`.. of `prompt`, packed from `offset`;
    `top` alternatives per score."""

    offset: int
    start: int
    count: int
    prompt: Sequence[int]
    top: int


def score_prompts(logits_TV: Tensor, spans: Sequence[PromptSpan]) -> list[list[TokenLogprob]]:
    """Per span, the scores its logits give: position p's log-softmax scores prompt
    token p + 1 (the last prompt position scores nothing: what follows is sampled). A
    prompt prefilled in several chunks is scored chunk by chunk. One `token_logprobs`
    call for every span."""
    rows: list[int] = []
    targets: list[int] = []
    tops: list[int] = []
    owners: list[int] = []
    for index, span in enumerate(spans):
        last = min(span.start + span.count, len(span.prompt) - 1)
        for position in range(span.start, last):
            rows.append(span.offset + position - span.start)
            targets.append(span.prompt[position + 1])
            tops.append(span.top)
            owners.append(index)
    scores: list[list[TokenLogprob]] = [[] for _ in spans]
    if rows:
        for owner, score in zip(owners, token_logprobs(logits_TV[rows], targets, tops)):
            scores[owner].append(score)
    return scores


def routed_experts(model: MoETransformer, rows: Sequence[int]) -> list[list[list[int]]]:
    """[B][layer][K]: the experts every MoE layer chose in the last forward for the
    packed tokens `rows` (a dense model: no layer)."""
    layers = model.moe_layers()
    chosen = [ids for _, layer in layers if (ids := layer.last_expert_ids_TK) is not None]
    if not chosen or len(chosen) != len(layers):
        return [[] for _ in rows]
    return torch.stack([ids[list(rows)] for ids in chosen], dim=1).tolist()


def generated_tokens(
    last_BV: Tensor,
    tokens: Sequence[int],
    params: Sequence[SamplingParams],
    experts_BLK: Sequence[Sequence[Sequence[int]]] | None,
) -> list[GeneratedToken]:
    """The sampled `tokens` (one per row of `last_BV`, the logits they were sampled
    from) with what each row's `params` asked: log-probabilities (one log-softmax over
    the rows that asked) and experts (`experts_BLK`, from `routed_experts`)."""
    wanted = [b for b, p in enumerate(params) if p.logprobs is not None]
    scores: dict[int, TokenLogprob] = {}
    if wanted:
        found = token_logprobs(
            last_BV[wanted], [tokens[b] for b in wanted], [params[b].logprobs or 0 for b in wanted]
        )
        scores = dict(zip(wanted, found))
    out = []
    for b, token in enumerate(tokens):
        experts = None
        if params[b].routed_experts and experts_BLK is not None:
            experts = tuple(tuple(k) for k in experts_BLK[b])
        out.append(GeneratedToken(token, scores.get(b), experts))
    return out
