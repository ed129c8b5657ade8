"""Topology validation and group layout (pure), and the chunk regrouping used around
the all-to-all, against an obvious loop."""

from __future__ import annotations

import pytest
import torch

from comm.chunks import transpose_chunks
from comm.topology import Topology


def test_groups_of_two_nodes_of_four_with_ep_four() -> None:
    topo = Topology(world_size=8, ranks_per_node=4, ep_size=4)
    assert topo.num_nodes == 2 and topo.num_ep_groups == 2
    assert topo.ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert topo.ep_intra_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert topo.ep_inter_groups() == [[0], [1], [2], [3], [4], [5], [6], [7]]
    assert topo.expert_replica_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [topo.ep_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_groups_of_ep_spanning_nodes() -> None:
    topo = Topology(world_size=8, ranks_per_node=2, ep_size=8)
    assert (topo.ep_local_size, topo.ep_num_nodes) == (2, 4)
    assert topo.ep_intra_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.ep_inter_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert topo.expert_replica_groups() == [[r] for r in range(8)]
    topo = Topology(world_size=8, ranks_per_node=2, ep_size=4)
    assert topo.ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert topo.ep_inter_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.expert_replica_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(world_size=6, ranks_per_node=4, ep_size=2), "not a multiple of ranks_per_node"),
        (dict(world_size=8, ranks_per_node=4, ep_size=3), "does not divide world_size"),
        (dict(world_size=12, ranks_per_node=4, ep_size=6), "across part of a node"),
        (dict(world_size=0, ranks_per_node=1, ep_size=1), "positive int"),
        (dict(world_size=4, ranks_per_node=2, ep_size=True), "positive int"),
    ],
)
def test_bad_topologies_raise(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Topology(**kwargs)


def test_rank_outside_world_raises() -> None:
    with pytest.raises(ValueError, match="outside"):
        Topology(4, 2, 2).ep_rank(4)


def _transpose_loop(x_RD: torch.Tensor, counts_AB: torch.Tensor) -> torch.Tensor:
    a_size, b_size = counts_AB.shape
    chunks: dict[tuple[int, int], torch.Tensor] = {}
    row = 0
    for a in range(a_size):
        for b in range(b_size):
            n = int(counts_AB[a, b])
            chunks[a, b] = x_RD[row : row + n]
            row += n
    return torch.cat([chunks[a, b] for b in range(b_size) for a in range(a_size)])


@pytest.mark.parametrize("max_cat_chunks", [0, 1024])  # 0: the gather path
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (4, 5), (2, 8)])
def test_transpose_chunks_matches_loop_and_inverts(
    shape: tuple[int, int], max_cat_chunks: int
) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        counts_AB = torch.randint(0, 4, shape, generator=gen)
        counts_AB[0] = 0  # an empty row of chunks
        x_RD = torch.randn(int(counts_AB.sum()), 3, generator=gen, requires_grad=True)
        y_RD = transpose_chunks(x_RD, counts_AB, max_cat_chunks=max_cat_chunks)
        assert torch.equal(y_RD, _transpose_loop(x_RD.detach(), counts_AB))
        back_RD = transpose_chunks(y_RD, counts_AB.t(), max_cat_chunks=max_cat_chunks)
        assert torch.equal(back_RD, x_RD)
        probe_RD = torch.randn(y_RD.shape, generator=gen)
        (y_RD * probe_RD).sum().backward()
        assert x_RD.grad is not None
        assert torch.equal(x_RD.grad, transpose_chunks(probe_RD, counts_AB.t()))


@pytest.mark.parametrize("max_cat_chunks", [0, 1024])
def test_transpose_chunks_rejects_wrong_rows(max_cat_chunks: int) -> None:
    with pytest.raises(ValueError, match="expected 5"):
        transpose_chunks(
            torch.zeros(5, 2), torch.tensor([[1, 1], [1, 1]]), max_cat_chunks=max_cat_chunks
        )
