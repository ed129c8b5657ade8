"""Pruning and N:M sparsity of experts and dense weights (the survey's pruning family).

- `config`: `PruneConfig` (the `prune` group: method, scope, sparsity, pattern,
  granularity, permutation, schedule, SR-STE decay);
- `targets`: which weights are pruned and along which dimension they reduce;
- `masks`: magnitude masks, unstructured and N:M;
- `permutation`: Pool & Yu's channel permutation search before N:M pruning;
- `schedule`: Zhu & Gupta's gradual pruning schedule;
- `state`: the `PruningState` protocol the training loop drives (masks kept through
  training, the schedule, SR-STE) and `build_pruning`;
- `oneshot`: `prune_model`, what `launch.prune` runs, and its report;
- `write`: the pruned checkpoint (`write_pruned`);
- `semi_structured`: 2:4 experts on CUDA sparse tensor cores, packed-format sizes.
"""

from moe.pruning.config import (
    Granularity,
    NMPattern,
    PruneConfig,
    PruneMethod,
    PruneScope,
    parse_pattern,
)
from moe.pruning.oneshot import PruneReport, prune_model, pruning_record
from moe.pruning.schedule import gmp_sparsity, pruning_sparsity
from moe.pruning.state import MaskedTraining, NoPruning, PruningState, build_pruning
from moe.pruning.targets import PrunableWeight, hidden_channels, prunable_weights
from moe.pruning.write import PRUNING_KEY, PruneResult, write_pruned

__all__ = [
    "PRUNING_KEY",
    "Granularity",
    "MaskedTraining",
    "NMPattern",
    "NoPruning",
    "PrunableWeight",
    "PruneConfig",
    "PruneMethod",
    "PruneReport",
    "PruneResult",
    "PruneScope",
    "PruningState",
    "build_pruning",
    "gmp_sparsity",
    "hidden_channels",
    "parse_pattern",
    "prunable_weights",
    "prune_model",
    "pruning_record",
    "pruning_sparsity",
    "write_pruned",
]
