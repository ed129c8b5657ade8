"""The top-k choice every router makes: the k highest scores of each token, equal
scores broken towards the lowest expert id, so that routing is the same on every device
and torch version (`topk_lowest_id`).

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Up to this k, `topk_lowest_id` takes k argmax passes instead of a full sort.
ARGMAX_MAX_K = 4


def topk_lowest_id(scores_TE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k highest scores along the last dim, highest first; among
    equal scores the lowest expert id comes first (the order of a stable descending sort,
    NaN highest), so that the choice is the same on every device and torch version.
    Differentiable in the values.

    For k <= `ARGMAX_MAX_K`: k passes of `argmax` (which returns the first maximal index),
    each masking its pick to -inf, instead of sorting all E scores per token (at E=64,
    8192 tokens, K=2 on 2 CPU threads: 11.5 -> about 4 ms). Where the remaining maximum
    is -inf (every unpicked score is -inf: a restricted or dropped-out expert set), the
    pick is the lowest unpicked id, as the sort would give.

    For larger k (eagerly, k < E): `torch.topk` of k + 1, exact when the k-th score is
    strictly above the (k+1)-th in every row (the chosen set is then the sort's), in
    topk's order where the k scores are distinct in every row (the usual case; at E=128,
    K=8, 4096 tokens: 4.2 -> 3.1 ms), else put in the sort's order by a stable sort of k
    entries per token; otherwise the full
    sort (at E=128, K=8, 4096 tokens, 2 threads: the sort 40-80 ms, topk 10-16 ms)."""
    num_experts = scores_TE.shape[-1]
    if not 0 <= k <= num_experts:
        raise ValueError(f"top_k={k}: expected 0 <= top_k <= {num_experts} experts")
    if ARGMAX_MAX_K < k < num_experts and not torch.compiler.is_compiling():
        chosen = _topk_if_unique(scores_TE, k)
        if chosen is not None:
            return chosen
    if not 0 < k <= ARGMAX_MAX_K or scores_TE.numel() == 0:
        values_TE, ids_TE = torch.sort(scores_TE, dim=-1, descending=True, stable=True)
        return values_TE[..., :k], ids_TE[..., :k]
    key_TE = scores_TE.detach().clone()
    unpicked_TE = torch.ones_like(key_TE, dtype=torch.uint8)
    picks = []
    for _ in range(k):
        best_T1 = key_TE.argmax(dim=-1, keepdim=True)
        exhausted_T1 = key_TE.gather(-1, best_T1) == float("-inf")
        best_T1 = torch.where(exhausted_T1, unpicked_TE.argmax(dim=-1, keepdim=True), best_T1)
        key_TE.scatter_(-1, best_T1, float("-inf"))
        unpicked_TE.scatter_(-1, best_T1, 0)
        picks.append(best_T1)
    ids_TK = torch.cat(picks, dim=-1)
    return scores_TE.gather(-1, ids_TK), ids_TK


def _topk_if_unique(scores_TE: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """`topk_lowest_id` from `torch.topk` (k < E), or None where a tie (or a NaN) at
    the k-th place leaves the set to the tie-break: the k-th score must be strictly
    above the (k+1)-th in every row (NaN compares false). One host sync."""
    values_TX, ids_TX = torch.topk(scores_TE.detach(), k + 1, dim=-1)
    # Which places hold a score strictly above the next, in every row (one host sync).
    strict = (values_TX[..., :-1] > values_TX[..., 1:]).reshape(-1, k).all(dim=0).tolist()
    if not strict[k - 1]:
        return None
    if all(strict):  # no ties among the k: topk's order is the sort's (the usual case)
        ids_TK = ids_TX[..., :k]
        return scores_TE.gather(-1, ids_TK), ids_TK
    # The sort's order within the set: higher score first, equal scores by lower id
    # (NaN first, as the descending sort puts it): ids ascending, then a stable sort.
    ids_TK, order_TK = torch.sort(ids_TX[..., :k], dim=-1)
    values_TK = values_TX[..., :k].gather(-1, order_TK)
    order_TK = torch.sort(values_TK, dim=-1, descending=True, stable=True).indices
    ids_TK = ids_TK.gather(-1, order_TK)
    return scores_TE.gather(-1, ids_TK), ids_TK
