"""How tensors travel: process-group topology, flat and hierarchical all-to-all, an
alpha-beta cost model, and an nccl-tests-style benchmark (`python -m comm.bench`).

Nothing here defaults to the WORLD group or reads environment switches: build a
`Topology`, call `build_process_groups` on every rank, and pass the groups in.
See docs/COMM.md.
"""

from comm.alltoall import (
    Algorithm,
    AllToAll,
    ExchangePlan,
    FlatAllToAll,
    HierarchicalAllToAll,
    check_consistent,
    exchange_counts,
    make_all_to_all,
)
from comm.chunks import transpose_chunks
from comm.cost import CostModel
from comm.topology import ProcessGroups, Topology, build_process_groups

__all__ = [
    "Algorithm",
    "AllToAll",
    "CostModel",
    "ExchangePlan",
    "FlatAllToAll",
    "HierarchicalAllToAll",
    "ProcessGroups",
    "Topology",
    "build_process_groups",
    "check_consistent",
    "exchange_counts",
    "make_all_to_all",
    "transpose_chunks",
]
