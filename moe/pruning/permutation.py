"""Channel permutation before N:M pruning (Pool & Yu 2021, "Channel Permutations for
N:M Sparsity").

N:M pruning keeps the N largest |w| of every M consecutive input channels of a matrix.
Which channels share a group is arbitrary where the input channels can be reordered
for free: an FFN's hidden units are the output channels of its up-projections and the
input (reduction) channels of its down-projection, so permuting the up-projections'
hidden columns and the down-projection's rows alike leaves the FFN's function unchanged
(`moe.pruning.targets.HiddenChannels`), while it regroups the down-projection's weights
and changes what N:M keeps. The up-projections reduce over the model width, which no
permutation of the hidden units touches: their kept magnitude does not change.

The search (their greedy channel swap, with escapes): the C channels form C / M
stripes of M. Repeatedly take the single swap of two channels of different stripes that
raises the kept magnitude (sum over rows and stripes of the N largest |w| of the row in
the stripe) the most, until no swap raises it; then escape the local optimum by a few
random swaps and descend again, keeping the best permutation found. It stops after
`escapes` escapes that did not improve on the best, or after `seconds`.

Cost per swap: the kept magnitude of stripe s with one of its channels replaced by any
channel c (`replaced[s, slot, c]`) is kept for every stripe; a swap touches two stripes,
so only theirs are recomputed (R rows x M slots x C channels x M each), and the gain of
every swap is read off a C x C table.

Legend: R rows of the matrix (output channels), C channels (the reduction dimension),
M, N of the pattern, S = C / M stripes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from moe.pruning.config import NMPattern

# Random swaps per escape from a local optimum.
ESCAPE_SWAPS = 2
# Candidate channels scored at once when a stripe is refreshed (bounds the temporary
# [M, chunk, R, M] tensor).
CANDIDATE_CHUNK = 256


@dataclass(frozen=True)
class PermutationResult:
    """`permutation_C[i]`: the channel placed at position i. `kept_identity` and `kept`:
    the magnitude N:M keeps without and with it; `total`: the matrix's whole |w| sum."""

    permutation_C: Tensor
    kept_identity: float
    kept: float
    total: float
    swaps: int
    escapes: int
    seconds: float


def _top_n_sum(groups: Tensor, n: int) -> Tensor:
    """Sum of the n largest entries of the last dimension."""
    return groups.topk(n, dim=-1).values.sum(-1)


class _StripeScores:
    """Kept magnitude of every stripe, and of every stripe with one slot replaced by
    any channel, for the current permutation."""

    def __init__(self, magnitude_RC: Tensor, pattern: NMPattern) -> None:
        self.magnitude_RC = magnitude_RC
        self.pattern = pattern
        C = magnitude_RC.shape[1]
        self.stripes = C // pattern.m
        self.permutation_C = torch.arange(C)
        self.score_S = torch.zeros(self.stripes, dtype=magnitude_RC.dtype)
        self.replaced_SMC = torch.zeros(self.stripes, pattern.m, C, dtype=magnitude_RC.dtype)
        for stripe in range(self.stripes):
            self.refresh(stripe)

    def refresh(self, stripe: int) -> None:
        m, n = self.pattern.m, self.pattern.n
        channels = self.permutation_C[stripe * m : (stripe + 1) * m]
        group_RM = self.magnitude_RC[:, channels]
        self.score_S[stripe] = _top_n_sum(group_RM, n).sum()
        R, C = self.magnitude_RC.shape
        slots = torch.arange(m)
        for first in range(0, C, CANDIDATE_CHUNK):
            candidates_RC = self.magnitude_RC[:, first : first + CANDIDATE_CHUNK]
            width = candidates_RC.shape[1]
            # [M slots, candidates, R, M]: slot a of the stripe replaced by candidate c.
            trial = group_RM.expand(m, width, R, m).clone()
            trial[slots, :, :, slots] = candidates_RC.T.expand(m, width, R)
            self.replaced_SMC[stripe, :, first : first + width] = _top_n_sum(trial, n).sum(-1)

    def total(self) -> float:
        return float(self.score_S.sum())

    def best_swap(self) -> tuple[float, int, int]:
        """(gain, position p, position q) of the best swap between two stripes."""
        m = self.pattern.m
        C = self.permutation_C.numel()
        # replaced_pos[p, q]: p's stripe with p's channel replaced by q's channel.
        replaced_pos = self.replaced_SMC.reshape(C, C)[:, self.permutation_C]
        base_C = self.score_S.repeat_interleave(m)
        gain = replaced_pos + replaced_pos.T - base_C[:, None] - base_C[None, :]
        stripe_C = torch.arange(C) // m
        gain[stripe_C[:, None] == stripe_C[None, :]] = float("-inf")
        flat = int(torch.argmax(gain))
        return float(gain.view(-1)[flat]), flat // C, flat % C

    def swap(self, p: int, q: int) -> None:
        m = self.pattern.m
        permutation = self.permutation_C
        permutation[p], permutation[q] = int(permutation[q]), int(permutation[p])
        self.refresh(p // m)
        self.refresh(q // m)

    def set_permutation(self, permutation_C: Tensor) -> None:
        self.permutation_C = permutation_C.clone()
        for stripe in range(self.stripes):
            self.refresh(stripe)


def search_permutation(
    magnitude_RC: Tensor,
    pattern: NMPattern,
    *,
    seconds: float,
    escapes: int,
    generator: torch.Generator,
) -> PermutationResult:
    """The channel permutation of a matrix |w| [R, C] (C the reduction dimension, a
    multiple of M) that keeps the most magnitude under N:M, by Pool & Yu's greedy swaps
    with escapes (module docstring). Never worse than the identity."""
    C = magnitude_RC.shape[1]
    if C % pattern.m:
        raise ValueError(f"{C} channels do not split into groups of M={pattern.m}")
    started = time.perf_counter()
    state = _StripeScores(magnitude_RC.detach().double().cpu(), pattern)
    kept_identity = state.total()
    best_total, best = kept_identity, state.permutation_C.clone()
    tolerance = 1e-12 * max(float(magnitude_RC.abs().sum()), 1e-30)
    swaps = escapes_done = failed_escapes = 0
    while True:
        gain, p, q = state.best_swap() if state.stripes > 1 else (0.0, 0, 0)
        if gain > tolerance:
            state.swap(p, q)
            swaps += 1
        else:
            if state.total() > best_total + tolerance:
                best_total, best = state.total(), state.permutation_C.clone()
                failed_escapes = 0
            elif escapes_done:
                failed_escapes += 1
            if state.stripes < 2 or failed_escapes >= escapes or escapes == 0:
                break
            if time.perf_counter() - started > seconds:
                break
            for _ in range(ESCAPE_SWAPS):
                p = int(torch.randint(C, (1,), generator=generator))
                q = int(torch.randint(C, (1,), generator=generator))
                if p // pattern.m != q // pattern.m:
                    state.swap(p, q)
            escapes_done += 1
        if time.perf_counter() - started > seconds:
            if state.total() > best_total:
                best_total, best = state.total(), state.permutation_C.clone()
            break
    return PermutationResult(
        permutation_C=best,
        kept_identity=kept_identity,
        kept=best_total,
        total=float(magnitude_RC.detach().double().abs().sum()),
        swaps=swaps,
        escapes=escapes_done,
        seconds=time.perf_counter() - started,
    )


def kept_magnitude(magnitude_RC: Tensor, permutation_C: Tensor, pattern: NMPattern) -> float:
    """What N:M keeps of |w| [R, C] with its channels in the order `permutation_C`
    (the plain definition, for checks)."""
    R, C = magnitude_RC.shape
    groups = magnitude_RC[:, permutation_C].double().reshape(R, C // pattern.m, pattern.m)
    return float(_top_n_sum(groups, pattern.n).sum())
