"""Flat and hierarchical all-to-all on spawned gloo ranks (4 ranks as 2 nodes x 2, and
other layouts), against a reference every rank computes alone from shared seeds:
outputs and gradients, random uneven splits with ranks that send or receive nothing.
Hierarchical must equal flat bit for bit. Bad input must raise on every rank."""

from __future__ import annotations

import pytest
import torch
from distributed_utils import run_distributed, values_or_raise

from comm.alltoall import (
    FlatAllToAll,
    HierarchicalAllToAll,
    check_consistent,
    exchange_counts,
    make_all_to_all,
)
from comm.topology import Topology, build_process_groups

pytestmark = pytest.mark.distributed

D = 3


def _rows(seed: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, D, generator=gen) * 100).to(dtype)


def _splits(trial: int, size: int) -> torch.Tensor:
    """counts_PP[src, dst]; some trials have a rank sending or receiving nothing."""
    gen = torch.Generator().manual_seed(1000 + trial)
    counts_PP = torch.randint(0, 5, (size, size), generator=gen)
    if trial % 3 == 1:
        counts_PP[trial % size] = 0
    if trial % 3 == 2:
        counts_PP[:, (trial + 1) % size] = 0
    if trial == 0:
        counts_PP.zero_()
    return counts_PP


def _check_layout(rank: int, world_size: int, ranks_per_node: int, ep_size: int) -> int:
    groups = build_process_groups(Topology(world_size, ranks_per_node, ep_size))
    ep_rank = groups.ep_rank
    base = groups.topology.ep_group_index(rank) * ep_size  # separate data per EP group
    algos = [
        FlatAllToAll(groups.ep),
        HierarchicalAllToAll(groups.ep_intra, groups.ep_inter),
        make_all_to_all("hierarchical", groups.ep, groups.ep_intra, groups.ep_inter),
    ]
    checked = 0
    for trial in range(8):
        dtype = [torch.float32, torch.bfloat16, torch.float64][trial % 3]
        counts_PP = _splits(trial + base, ep_size)
        send, recv = counts_PP[ep_rank], counts_PP[:, ep_rank]
        x_RD = _rows(10 * trial + base + ep_rank, int(send.sum()), dtype)
        probe_of = [
            _rows(99 + 10 * trial + base + p, int(counts_PP[:, p].sum()), dtype)
            for p in range(ep_size)
        ]
        # What flat all-to-all means: from every source p, its chunk addressed to me.
        expected = []
        for src in range(ep_size):
            rows = _rows(10 * trial + base + src, int(counts_PP[src].sum()), dtype)
            start = int(counts_PP[src, :ep_rank].sum())
            expected.append(rows[start : start + int(counts_PP[src, ep_rank])])
        expected_RD = torch.cat(expected)
        # Gradient: the probe of each destination p, at the rows that came from me.
        expected_grad = []
        for dst in range(ep_size):
            start = int(counts_PP[:ep_rank, dst].sum())
            expected_grad.append(probe_of[dst][start : start + int(counts_PP[ep_rank, dst])])
        expected_grad_RD = torch.cat(expected_grad)
        outputs = []
        for algo in algos:
            x = x_RD.clone().requires_grad_(True)
            y = algo.exchange(x, send, recv)
            (y.float() * probe_of[ep_rank].float()).sum().backward()
            assert x.grad is not None
            assert torch.equal(y, expected_RD), (algo.name, trial)
            assert torch.equal(x.grad, expected_grad_RD), (algo.name, trial)
            # reverse() of a plan is the transpose exchange: it brings rows home.
            plan = algo.plan(send, recv, x_RD.device)
            assert torch.equal(plan.reverse(plan.forward(x_RD)), x_RD)
            outputs.append((y, x.grad))
            checked += 1
        for y, grad in outputs[1:]:
            assert torch.equal(y, outputs[0][0]) and torch.equal(grad, outputs[0][1])
    # The counts exchange is the transpose of the counts matrix.
    counts_PP = _splits(5, ep_size)
    got = exchange_counts(counts_PP[ep_rank].view(ep_size, 1).clone(), groups.ep)
    assert torch.equal(got.view(-1), counts_PP[:, ep_rank])
    return checked


def _check_layouts(rank: int, world_size: int, layouts: list[tuple[int, int]]) -> list[int]:
    return [_check_layout(rank, world_size, rpn, ep) for rpn, ep in layouts]


def test_flat_and_hierarchical_match_reference_on_four_ranks() -> None:
    """2 nodes x 2 with EP over both (G=2, M=2); 4 nodes of 1 (G=1, M=4); EP=2 inside
    each node with two replicas (G=2, M=1)."""
    layouts = [(2, 4), (1, 4), (2, 2)]
    values = values_or_raise(run_distributed(_check_layouts, 4, layouts, timeout_s=180))
    assert values == [[24, 24, 24]] * 4


def _bad_world(rank: int, world_size: int) -> None:
    build_process_groups(Topology(world_size * 2, 2, 2))


def _bad_topology_per_rank(rank: int, world_size: int) -> None:
    build_process_groups(Topology(world_size, 2 if rank == 0 else 1, 2))


def _bad_shapes(rank: int, world_size: int) -> None:
    groups = build_process_groups(Topology(world_size, 1, world_size))
    width = 8 if rank == world_size - 1 else 4
    check_consistent([width, 7], groups.ep, what="row shapes", device=torch.device("cpu"))


def _two_ranks(rank: int, world_size: int) -> tuple[int, list[str]]:
    """The 2-rank layout, then each kind of bad input; returns what each raised."""
    checked = _check_layout(rank, world_size, 1, 2)
    errors = []
    for bad in (_bad_world, _bad_topology_per_rank, _bad_shapes):
        try:
            bad(rank, world_size)
            errors.append("no error")
        except ValueError as exc:
            errors.append(f"ValueError: {exc}")
    return checked, errors


def test_two_ranks_and_bad_input_raises_on_every_rank() -> None:
    """Mismatched world size, per-rank topologies and row shapes raise ValueError on
    every rank (not a hang, not a gloo abort on one rank and garbage on the other)."""
    values = values_or_raise(run_distributed(_two_ranks, 2, timeout_s=90, collective_timeout_s=20))
    for checked, errors in values:
        assert checked == 24
        assert "torch.distributed has 2 ranks" in errors[0]
        assert "ranks disagree on the topology" in errors[1]
        assert "different row shapes" in errors[2]
