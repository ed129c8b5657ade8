"""Process-group topology for expert parallelism: which ranks talk to which.

A `Topology` is pure data, built once from (world size, ranks per node, EP size) and
validated; it answers "which ranks form group X" without touching torch.distributed.
`build_process_groups` turns it into live groups. Layout (ranks are numbered node by
node, so a node holds `ranks_per_node` consecutive ranks):

- EP groups are contiguous blocks of `ep_size` ranks. With `ep_size < world_size`
  there are `world_size // ep_size` EP groups and every expert is replicated once per
  EP group.
- Inside an EP group of P = M * G ranks, G = min(ep_size, ranks_per_node) ranks share a
  node and M = ep_size // G nodes take part. The intra-node subgroup of a rank is the G
  ranks of its EP group on its node; the inter-node subgroup is the M ranks of its EP
  group that have its local index on the other nodes (Tutel 2DH / DeepSpeed-MoE).
- The dense data-parallel group is every rank (dense weights are replicated
  everywhere); the expert-replica group of a rank is every rank with the same EP rank,
  one per EP group (they hold the same experts).

An EP group must be either inside one node or a whole number of nodes; anything else
would need ragged intra/inter groups, which neither 2DH nor we support.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """World size, ranks per node and EP size, with the rank lists of every group."""

    world_size: int
    ranks_per_node: int
    ep_size: int

    def __post_init__(self) -> None:
        for name in ("world_size", "ranks_per_node", "ep_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Topology.{name} must be a positive int, got {value!r}")
        if self.world_size % self.ranks_per_node:
            raise ValueError(
                f"Topology: world_size={self.world_size} is not a multiple of "
                f"ranks_per_node={self.ranks_per_node}; set ranks_per_node to a divisor "
                "of the world size"
            )
        if self.world_size % self.ep_size:
            raise ValueError(
                f"Topology: ep_size={self.ep_size} does not divide world_size="
                f"{self.world_size}; accepted: a divisor of the world size"
            )
        inside_node = self.ranks_per_node % self.ep_size == 0
        whole_nodes = self.ep_size % self.ranks_per_node == 0
        if not (inside_node or whole_nodes):
            raise ValueError(
                f"Topology: ep_size={self.ep_size} with ranks_per_node={self.ranks_per_node} "
                "puts an EP group across part of a node; accepted: ep_size divides "
                "ranks_per_node or is a multiple of it"
            )

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    @property
    def num_ep_groups(self) -> int:
        """How many EP groups (= how many replicas of each expert)."""
        return self.world_size // self.ep_size

    @property
    def ep_local_size(self) -> int:
        """G: ranks of one EP group on one node."""
        return min(self.ep_size, self.ranks_per_node)

    @property
    def ep_num_nodes(self) -> int:
        """M: nodes one EP group spans."""
        return self.ep_size // self.ep_local_size

    def check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside [0, {self.world_size})")

    def ep_rank(self, rank: int) -> int:
        """Index of `rank` inside its EP group (which expert shard it holds)."""
        self.check_rank(rank)
        return rank % self.ep_size

    def ep_group_index(self, rank: int) -> int:
        """Which EP group (which replica of the experts) `rank` belongs to."""
        self.check_rank(rank)
        return rank // self.ep_size

    def ep_groups(self) -> list[list[int]]:
        return [
            list(range(i * self.ep_size, (i + 1) * self.ep_size)) for i in range(self.num_ep_groups)
        ]

    def ep_intra_groups(self) -> list[list[int]]:
        """Every intra-node subgroup of every EP group, in creation order."""
        groups = []
        for block in self.ep_groups():
            for m in range(self.ep_num_nodes):
                groups.append(block[m * self.ep_local_size : (m + 1) * self.ep_local_size])
        return groups

    def ep_inter_groups(self) -> list[list[int]]:
        """Every inter-node subgroup of every EP group, in creation order."""
        groups = []
        for block in self.ep_groups():
            for g in range(self.ep_local_size):
                groups.append(block[g :: self.ep_local_size])
        return groups

    def expert_replica_groups(self) -> list[list[int]]:
        """Ranks holding the same experts: same EP rank, one per EP group."""
        return [list(range(j, self.world_size, self.ep_size)) for j in range(self.ep_size)]

    def dense_dp_ranks(self) -> list[int]:
        return list(range(self.world_size))


@dataclass(frozen=True)
class ProcessGroups:
    """The live groups of one rank. Pass this (or single groups from it) explicitly."""

    topology: Topology
    rank: int
    world: dist.ProcessGroup
    ep: dist.ProcessGroup
    ep_intra: dist.ProcessGroup
    ep_inter: dist.ProcessGroup
    dense_dp: dist.ProcessGroup
    expert_dp: dist.ProcessGroup

    @property
    def ep_rank(self) -> int:
        return self.topology.ep_rank(self.rank)


def _topology_vector(topology: Topology) -> torch.Tensor:
    return torch.tensor([topology.world_size, topology.ranks_per_node, topology.ep_size])


def build_process_groups(
    topology: Topology,
    *,
    timeout: datetime.timedelta | None = None,
    device: torch.device | None = None,
) -> ProcessGroups:
    """Create every group of `topology`; every rank must call this, in the same order.

    torch.distributed must already be initialised (by the launcher or a test). Each rank
    calls `new_group` for every group of every rank (torch requires it), in one fixed
    order: world, EP groups, intra-node subgroups, inter-node subgroups, expert-replica
    groups. The dense DP group is the world group. Before creating the EP groups the
    ranks compare their topologies, so a mismatch raises on every rank instead of
    hanging. `device` is where the check's tensor lives (CUDA for NCCL).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("build_process_groups needs torch.distributed initialised first")
    world_size = dist.get_world_size()
    if world_size != topology.world_size:
        raise ValueError(
            f"Topology.world_size={topology.world_size} but torch.distributed has "
            f"{world_size} ranks; build the topology with world_size={world_size}"
        )
    rank = dist.get_rank()
    world = dist.new_group(topology.dense_dp_ranks(), timeout=timeout)
    mine = _topology_vector(topology).to(device or torch.device("cpu"))
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=world)
    seen = {tuple(int(v) for v in t.tolist()) for t in gathered}
    if len(seen) > 1:
        raise ValueError(
            "ranks disagree on the topology (world_size, ranks_per_node, ep_size): "
            f"{sorted(seen)}; every rank must build the same Topology"
        )

    def pick(candidates: list[list[int]]) -> dist.ProcessGroup:
        mine_group: dist.ProcessGroup | None = None
        for ranks in candidates:
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine_group = group
        assert mine_group is not None, f"rank {rank} is in none of {candidates}"
        return mine_group

    ep = pick(topology.ep_groups())
    ep_intra = pick(topology.ep_intra_groups())
    ep_inter = pick(topology.ep_inter_groups())
    expert_dp = pick(topology.expert_replica_groups())
    return ProcessGroups(
        topology=topology,
        rank=rank,
        world=world,
        ep=ep,
        ep_intra=ep_intra,
        ep_inter=ep_inter,
        dense_dp=world,
        expert_dp=expert_dp,
    )
