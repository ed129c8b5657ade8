"""How tensors travel: process-group topology, flat and hierarchical all-to-all, an
alpha-beta cost model, and an nccl-tests-style benchmark (`python -m comm.bench`).

Nothing here defaults to the WORLD group or reads environment switches: build a
`Topology`, call `build_process_groups` on every rank, and pass the groups in.
See docs/COMM.md.
"""

import importlib
from typing import TYPE_CHECKING, Any

# Name -> defining module. Imported on first use (PEP 562), so that importing one
# torch-free module (`comm.cost`'s model, for the inference planner) does not import torch,
# and `python -m comm.cost` runs without the module already in sys.modules.
_EXPORTS = {
    "Algorithm": "comm.alltoall",
    "AllToAll": "comm.alltoall",
    "FlatAllToAll": "comm.alltoall",
    "HierarchicalAllToAll": "comm.alltoall",
    "PreparedExchange": "comm.alltoall",
    "check_consistent": "comm.alltoall",
    "exchange_counts": "comm.alltoall",
    "make_all_to_all": "comm.alltoall",
    "require_agreement": "comm.alltoall",
    "transpose_chunks": "comm.chunks",
    "CommTimer": "comm.timing",
    "ProcessGroups": "comm.topology",
    "Topology": "comm.topology",
    "build_process_groups": "comm.topology",
    "CostModel": "comm.cost",
}

if TYPE_CHECKING:
    from comm.alltoall import (
        Algorithm,
        AllToAll,
        FlatAllToAll,
        HierarchicalAllToAll,
        PreparedExchange,
        check_consistent,
        exchange_counts,
        make_all_to_all,
        require_agreement,
    )
    from comm.chunks import transpose_chunks
    from comm.cost import CostModel
    from comm.timing import CommTimer
    from comm.topology import ProcessGroups, Topology, build_process_groups

__all__ = [
    "Algorithm",
    "AllToAll",
    "CommTimer",
    "CostModel",
    "FlatAllToAll",
    "HierarchicalAllToAll",
    "PreparedExchange",
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
    if name not in _EXPORTS:
        raise AttributeError(f"module 'comm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
