"""Parameter counts of a built model: total, embedding, expert and active per token.

Counted from the modules (so whatever the layers hold is counted, router and PR-MoE
gate included), with every MoE layer counted at its global expert count even when this
process holds only its expert-parallel shard (per-expert size = local expert weights /
local expert count).

Definitions:
- `embedding`: the token embedding, plus the output head when it is untied. Kept apart
  from the others, as usual for scaling laws: `active` excludes it.
- `expert`: the weights of all experts of all MoE layers.
- `active`: the non-embedding parameters one token uses: everything that is not an
  expert (attention, norms, dense MLPs, routers, PR-MoE residual MLP and gate), plus
  `top_k` experts of every MoE layer. A router counts whole (the task router's table
  too, though a token reads one row of it).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.transformer import MoETransformer


@dataclass(frozen=True)
class ParamCount:
    total: int
    embedding: int
    expert: int
    active: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_with_embedding(self) -> int:
        return self.active + self.embedding

    def as_dict(self) -> dict[str, int]:
        return {
            "params_total": self.total,
            "params_embedding": self.embedding,
            "params_expert": self.expert,
            "params_active": self.active,
            "params_active_with_embedding": self.active_with_embedding,
        }


def count_parameters(model: MoETransformer) -> ParamCount:
    """Count `model`'s parameters (see the module docstring for the definitions)."""
    embedding_params = [model.embed.weight]
    if model.lm_head is not None:
        embedding_params.append(model.lm_head.weight)
    embedding = sum(p.numel() for p in embedding_params)

    expert_ids: set[int] = set()
    expert_total = 0
    expert_active = 0
    for _, layer in model.moe_layers():
        local = list(layer.experts.parameters())
        expert_ids.update(id(p) for p in local)
        num_local = layer.experts.num_experts
        local_numel = sum(p.numel() for p in local)
        assert local_numel % num_local == 0, "experts must be equally sized"
        per_expert = local_numel // num_local
        expert_total += per_expert * layer.num_experts
        expert_active += per_expert * layer.routing.top_k

    skip = expert_ids | {id(p) for p in embedding_params}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return ParamCount(
        total=embedding + dense + expert_total,
        embedding=embedding,
        expert=expert_total,
        active=dense + expert_active,
    )
