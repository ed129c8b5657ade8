"""How tensors travel: process-group topology, flat and hierarchical all-to-all, an
alpha-beta cost model, and an nccl-tests-style benchmark (`python -m comm.bench`).

Nothing here defaults to the WORLD group or reads environment switches: build a
`Topology`, call `build_process_groups` on every rank, and pass the groups in.
See docs/COMM.md.
"""

from typing import TYPE_CHECKING, Any

from comm.alltoall import (
    Algorithm,
    AllToAll,
    ExchangePlan,
    FlatAllToAll,
    HierarchicalAllToAll,
    check_consistent,
    exchange_counts,
    make_all_to_all,
    require_agreement,
)
from comm.chunks import transpose_chunks
from comm.timing import CommTimer
from comm.topology import ProcessGroups, Topology, build_process_groups

if TYPE_CHECKING:
    from comm.cost import CostModel

__all__ = [
    "Algorithm",
    "AllToAll",
    "CommTimer",
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
    "require_agreement",
    "transpose_chunks",
]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `python -m comm.cost` runs without the module
    # already being in sys.modules (runpy warns about that).
    if name == "CostModel":
        from comm.cost import CostModel

        return CostModel
    raise AttributeError(f"module 'comm' has no attribute {name!r}")
