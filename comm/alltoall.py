"""Autograd-aware all-to-all with uneven splits: flat and hierarchical (Tutel 2DH).

One protocol, two algorithms. `exchange(x_RD, send_counts_P, recv_counts_P)` sends
`send_counts_P[p]` consecutive rows of `x_RD` to group rank p and returns the rows
received, ordered by source rank (the layout of `all_to_all_single`). Its backward is
the same exchange with the counts swapped. `plan(...)` fixes the counts once so that a
dispatch and its combine (`forward` / `reverse`) share the bookkeeping.

- `FlatAllToAll(group)`: one `all_to_all_single` over the EP group; each rank sends
  P - 1 messages.
- `HierarchicalAllToAll(intra, inter)`: the EP group is M nodes x G ranks (group rank
  p = m * G + g). (1) Regroup the send buffer from destination order [m'][g'] to
  [g'][m']; (2) all-to-all inside the node, so local rank g' collects everything bound
  for local index g' on any node; (3) regroup what arrived from [source h][m'] to
  [m'][h]; (4) all-to-all across nodes among ranks with the same local index. The rows
  then arrive ordered [source node][source local rank] = source rank, exactly as flat.
  Each rank sends G - 1 intra and M - 1 inter messages instead of G - 1 and P - G;
  the intra-node volume grows from B (G-1)/P to B (G-1)/G. Step (2) needs the chunk
  sizes of its peers, so a plan costs one extra intra-node exchange of M ints per peer.

Every step moves whole rows, so the two algorithms agree bit for bit. Counts are host
ints (`all_to_all_single` needs host split sizes); `exchange_counts` does the
device-side exchange that precedes them. gloo (CPU) and NCCL (CUDA) both implement
`all_to_all_single` with uneven splits (checked on torch 2.13 gloo).

Legend: P ranks in the EP group, M nodes in it, G ranks per node, R rows, D row width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Any, Protocol

import torch
import torch.distributed as dist

from comm.chunks import transpose_chunks
from comm.timing import CommTimer

Counts = Sequence[int] | torch.Tensor


def group_size(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group=group)


def _as_counts(counts: Counts, size: int, name: str) -> tuple[int, ...]:
    values = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if len(values) != size or any(int(v) < 0 for v in values):
        raise ValueError(f"{name} must be {size} non-negative ints (one per rank), got {values}")
    return tuple(int(v) for v in values)


def _all_to_all(
    x_RD: torch.Tensor,
    out_splits: Sequence[int],
    in_splits: Sequence[int],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """Raw uneven all_to_all_single (no autograd); a group of one is a copy."""
    assert x_RD.shape[0] == sum(in_splits), (x_RD.shape, in_splits)
    if len(in_splits) == 1:
        return x_RD.clone()
    out = x_RD.new_empty((sum(out_splits), *x_RD.shape[1:]))
    dist.all_to_all_single(out, x_RD.contiguous(), list(out_splits), list(in_splits), group=group)
    return out


def exchange_counts(send_counts_PX: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Row p of `send_counts_PX` goes to group rank p; row p of the result came from p.

    send_counts_PX: int64 [P, ...] on the communication device. Every rank must pass the
    same trailing shape (check it with `check_consistent` first).
    """
    size = group_size(group)
    if send_counts_PX.shape[0] != size:
        raise ValueError(
            f"send_counts has {send_counts_PX.shape[0]} rows, the group has {size} ranks"
        )
    if size == 1:
        return send_counts_PX.clone()
    out = torch.empty_like(send_counts_PX)
    dist.all_to_all_single(out, send_counts_PX.contiguous(), group=group)
    return out


def check_consistent(
    signature: Sequence[int],
    group: dist.ProcessGroup,
    *,
    what: str,
    device: torch.device,
    agree: Sequence[int] | None = None,
) -> torch.Tensor:
    """All-gather a fixed-length int signature; raise ValueError on every rank if ranks differ.

    `agree` lists the positions that must be equal on all ranks (default: all). Returns
    the gathered signatures, int64 [P, S], identical on every rank, so that decisions
    taken from it (e.g. the algorithm for `auto`) agree too.
    """
    mine = torch.tensor(list(signature), dtype=torch.int64, device=device)
    size = group_size(group)
    if size == 1:
        return mine.unsqueeze(0)
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=group)
    gathered_PS = torch.stack(parts)
    require_agreement(gathered_PS.tolist(), what=what, agree=agree)
    return gathered_PS


def require_agreement(
    rows: Sequence[Sequence[int]], *, what: str, agree: Sequence[int] | None = None
) -> None:
    """Raise ValueError if the per-rank signatures `rows` differ in a position of `agree`
    (default: all). Every rank holding the same rows raises the same error: a check
    after a collective that told every rank every signature (`check_consistent`, or
    signatures riding in another exchange) fails on all ranks, never on one alone."""
    positions = range(len(rows[0])) if agree is None else agree
    bad = [i for i in positions if len({row[i] for row in rows}) > 1]
    if bad:
        raise ValueError(
            f"ranks entered the collective with different {what}: per rank "
            f"{[list(row) for row in rows]} (fields {list(bad)} differ); every rank must "
            "use the same shapes"
        )


class PreparedExchange(Protocol):
    """Counts fixed for one exchange and its reverse (e.g. a dispatch and its combine)."""

    @property
    def send_counts(self) -> tuple[int, ...]: ...

    @property
    def recv_counts(self) -> tuple[int, ...]: ...

    def forward(self, x_RD: torch.Tensor) -> torch.Tensor:
        """Send rows of `x_RD` (sum(send_counts) rows); autograd-aware."""
        ...

    def reverse(self, y_RD: torch.Tensor) -> torch.Tensor:
        """The transpose exchange: send back sum(recv_counts) rows; autograd-aware."""
        ...


class AllToAll(Protocol):
    """The all-to-all interface shared by the flat and hierarchical algorithms."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    def plan(
        self, send_counts: Counts, recv_counts: Counts, device: torch.device
    ) -> PreparedExchange: ...

    def exchange(
        self, x_RD: torch.Tensor, send_counts: Counts, recv_counts: Counts
    ) -> torch.Tensor: ...


class _RunsBothWays(Protocol):
    def run(self, x_RD: torch.Tensor, reverse: bool) -> torch.Tensor: ...


class _Exchange(torch.autograd.Function):
    """Autograd wrapper: the gradient of an exchange is the reverse exchange."""

    @staticmethod
    def forward(ctx: Any, x_RD: torch.Tensor, plan: _RunsBothWays, reverse: bool) -> torch.Tensor:
        ctx.plan = plan
        ctx.reverse = reverse
        return plan.run(x_RD, reverse)

    @staticmethod
    def backward(ctx: Any, grad_RD: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.plan.run(grad_RD.contiguous(), not ctx.reverse), None, None


def _exchange(x_RD: torch.Tensor, plan: _RunsBothWays, reverse: bool) -> torch.Tensor:
    """Run `plan` through the autograd node only when a gradient can flow: the node
    costs ~40 us of host time per call at 1 MiB on 2 CPU ranks, a visible share of a
    small exchange (`scripts/bench_alltoall_overhead.py`, docs/results/)."""
    if torch.is_grad_enabled() and x_RD.requires_grad:
        return _Exchange.apply(x_RD, plan, reverse)  # type: ignore[no-any-return]
    return plan.run(x_RD, reverse)


def _check_rows(x_RD: torch.Tensor, expected: int, name: str) -> None:
    if x_RD.dim() < 1 or x_RD.shape[0] != expected:
        raise ValueError(
            f"{name}: input has shape {tuple(x_RD.shape)} but the counts add up to {expected} rows"
        )


class _Plan(ABC):
    """What both plans share: timing, the row check, and the autograd-aware
    `forward` / `reverse` around a subclass's `_run`."""

    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    timer: CommTimer | None

    @abstractmethod
    def _run(self, x_RD: torch.Tensor, reverse: bool) -> torch.Tensor:
        """The exchange itself, no autograd: dispatch order, or combine if `reverse`."""

    def run(self, x_RD: torch.Tensor, reverse: bool) -> torch.Tensor:
        if self.timer is None:
            return self._run(x_RD, reverse)
        with self.timer.measure(x_RD.device):
            return self._run(x_RD, reverse)

    def forward(self, x_RD: torch.Tensor) -> torch.Tensor:
        _check_rows(x_RD, sum(self.send_counts), f"{type(self).__name__}.forward")
        return _exchange(x_RD, self, False)

    def reverse(self, y_RD: torch.Tensor) -> torch.Tensor:
        _check_rows(y_RD, sum(self.recv_counts), f"{type(self).__name__}.reverse")
        return _exchange(y_RD, self, True)


@dataclass(frozen=True)
class FlatPlan(_Plan):
    group: dist.ProcessGroup
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    timer: CommTimer | None = None

    def _run(self, x_RD: torch.Tensor, reverse: bool) -> torch.Tensor:
        if reverse:
            return _all_to_all(x_RD, self.send_counts, self.recv_counts, self.group)
        return _all_to_all(x_RD, self.recv_counts, self.send_counts, self.group)


@dataclass(frozen=True)
class FlatAllToAll:
    """One `all_to_all_single` over `group` (the EP group). With a `timer`, every
    exchange of its plans (forward and backward) is timed into it."""

    group: dist.ProcessGroup
    name: str = "flat"
    timer: CommTimer | None = None

    @cached_property  # a group's size never changes; asking torch costs us per call
    def size(self) -> int:
        return group_size(self.group)

    def plan(self, send_counts: Counts, recv_counts: Counts, device: torch.device) -> FlatPlan:
        del device  # flat needs no extra exchange
        return FlatPlan(
            self.group,
            _as_counts(send_counts, self.size, "send_counts"),
            _as_counts(recv_counts, self.size, "recv_counts"),
            self.timer,
        )

    def exchange(
        self, x_RD: torch.Tensor, send_counts: Counts, recv_counts: Counts
    ) -> torch.Tensor:
        return self.plan(send_counts, recv_counts, x_RD.device).forward(x_RD)


@dataclass(frozen=True)
class HierarchicalPlan(_Plan):
    """Counts of the four steps. s_MG: my send counts by destination (node, local rank);
    r_MG: my receive counts by source; c_GM: rows my intra-node peer h holds for
    (node m', my local index), which is what step (2) brings me."""

    intra: dist.ProcessGroup
    inter: dist.ProcessGroup
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    send_MG: torch.Tensor
    recv_MG: torch.Tensor
    intra_GM: torch.Tensor
    timer: CommTimer | None = None

    def _run(self, x_RD: torch.Tensor, reverse: bool) -> torch.Tensor:
        intra_send_G = self.send_MG.sum(0).tolist()  # to local rank g', summed over nodes
        intra_recv_G = self.intra_GM.sum(1).tolist()  # from local rank h
        inter_send_M = self.intra_GM.sum(0).tolist()  # to node m'
        inter_recv_M = self.recv_MG.sum(1).tolist()  # from node m
        if not reverse:
            x = transpose_chunks(x_RD, self.send_MG)
            x = _all_to_all(x, intra_recv_G, intra_send_G, self.intra)
            x = transpose_chunks(x, self.intra_GM)
            return _all_to_all(x, inter_recv_M, inter_send_M, self.inter)
        y = _all_to_all(x_RD, inter_send_M, inter_recv_M, self.inter)
        y = transpose_chunks(y, self.intra_GM.t())
        y = _all_to_all(y, intra_send_G, intra_recv_G, self.intra)
        return transpose_chunks(y, self.send_MG.t())


@dataclass(frozen=True)
class HierarchicalAllToAll:
    """2DH all-to-all over an EP group split into `intra` (G ranks, same node) and
    `inter` (M ranks, same local index) subgroups; group rank p = m * G + g. With a
    `timer`, its plans' exchanges (forward and backward) are timed into it."""

    intra: dist.ProcessGroup
    inter: dist.ProcessGroup
    name: str = "hierarchical"
    timer: CommTimer | None = None

    @cached_property  # a group's size never changes; asking torch costs us per call
    def local_size(self) -> int:
        return group_size(self.intra)

    @cached_property  # a group's size never changes; asking torch costs us per call
    def num_nodes(self) -> int:
        return group_size(self.inter)

    @cached_property
    def size(self) -> int:
        return self.local_size * self.num_nodes

    def plan(
        self, send_counts: Counts, recv_counts: Counts, device: torch.device
    ) -> HierarchicalPlan:
        send = _as_counts(send_counts, self.size, "send_counts")
        recv = _as_counts(recv_counts, self.size, "recv_counts")
        shape = (self.num_nodes, self.local_size)
        send_MG = torch.tensor(send, dtype=torch.int64).view(shape)
        # Row g' of send_MG.T goes to local rank g': my rows for (every node, local g').
        send_GM = send_MG.t().contiguous().to(device)
        if self.timer is None:
            intra_GM = exchange_counts(send_GM, self.intra).cpu()
        else:
            with self.timer.measure(device):
                intra_GM = exchange_counts(send_GM, self.intra).cpu()
        return HierarchicalPlan(
            intra=self.intra,
            inter=self.inter,
            send_counts=send,
            recv_counts=recv,
            send_MG=send_MG,
            recv_MG=torch.tensor(recv, dtype=torch.int64).view(shape),
            intra_GM=intra_GM,
            timer=self.timer,
        )

    def exchange(
        self, x_RD: torch.Tensor, send_counts: Counts, recv_counts: Counts
    ) -> torch.Tensor:
        return self.plan(send_counts, recv_counts, x_RD.device).forward(x_RD)


class Algorithm(str, Enum):
    """Which all-to-all an EP layer uses; `auto` asks the cost model per call."""

    FLAT = "flat"
    HIERARCHICAL = "hierarchical"
    AUTO = "auto"


def make_all_to_all(
    algorithm: Algorithm | str,
    ep: dist.ProcessGroup,
    intra: dist.ProcessGroup,
    inter: dist.ProcessGroup,
    timer: CommTimer | None = None,
) -> AllToAll:
    """The flat or hierarchical all-to-all over one EP group and its two subgroups;
    `timer`, if given, accumulates the time of every exchange."""
    try:
        kind = Algorithm(algorithm)
    except ValueError:
        raise ValueError(
            f"all-to-all algorithm {algorithm!r} is unknown; accepted: flat, hierarchical"
        ) from None
    if kind is Algorithm.FLAT:
        return FlatAllToAll(ep, timer=timer)
    if kind is Algorithm.HIERARCHICAL:
        return HierarchicalAllToAll(intra, inter, timer=timer)
    raise ValueError("make_all_to_all takes flat or hierarchical; resolve auto with comm.cost")
