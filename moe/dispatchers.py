"""Dispatchers: what happens between permute and the experts.

A dispatcher takes rows sorted by global expert with their per-expert counts, and
returns the rows this process's experts must compute, sorted by local expert; `combine`
brings the results back in the original row order. `LocalDispatcher` (EP=1) is the
identity; `ExpertParallelDispatcher` moves rows with the all-to-all of `comm`.

Shapes: R routed rows, D model width, E experts (global), L local experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from comm.alltoall import (
    Algorithm,
    AllToAll,
    PreparedExchange,
    check_consistent,
    exchange_counts,
    make_all_to_all,
    require_agreement,
)
from comm.chunks import transpose_chunks
from comm.cost import CostModel
from comm.timing import CommTimer
from comm.topology import ProcessGroups


class Dispatcher(Protocol):
    """`num_experts`: experts the router chooses from (global ids 0..E-1);
    `expert_ids`: the ascending global ids of the experts this process computes;
    `exchanges_rows`: whether rows travel to other processes (then dispatch and combine
    are collectives, run eagerly between compiled graphs, and every expert of the
    router may get rows)."""

    num_experts: int
    num_local_experts: int
    expert_ids: tuple[int, ...]
    exchanges_rows: bool

    def dispatch(
        self,
        x_RD: Tensor,
        counts_E: Tensor,
        uniform_counts: bool = False,
        filled_E: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Any]:
        """-> (rows for the local experts sorted by local expert, counts_L, filled_L,
        context). `uniform_counts`: every rank passes the same counts_E (DynaMoE's
        static padded capacities), so the split sizes are known without exchanging
        them. `filled_E` (a capacity-padded layout, `moe.permute.Permutation`): the
        first filled_E[e] rows of expert e hold slots; where the dispatcher can say the
        same of its output, filled_L does (each local expert's filled rows first), else
        it is None and every row counts."""
        ...

    def combine(self, y_RD: Tensor, context: Any) -> Tensor:
        """Local expert outputs -> outputs in the order of the rows given to dispatch."""
        ...


class LocalDispatcher:
    """Every expert this process needs is local: no data moves.

    `expert_ids` (a task subset, `moe.inference.subset`): the process holds only these
    global experts, and the router must be restricted to them. Rows arrive sorted by
    global id, so they are already sorted by local id; only the counts are selected.
    """

    exchanges_rows = False

    def __init__(self, num_experts: int, expert_ids: list[int] | None = None) -> None:
        self.num_experts = num_experts
        self.expert_ids = tuple(range(num_experts)) if expert_ids is None else tuple(expert_ids)
        ids = list(self.expert_ids)
        if not ids or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= num_experts:
            raise ValueError(
                f"expert_ids={list(self.expert_ids)} is invalid; accepted: distinct ascending "
                f"global ids in [0, {num_experts - 1}]"
            )
        self.num_local_experts = len(self.expert_ids)
        self._subset = (
            None if self.num_local_experts == num_experts else torch.tensor(self.expert_ids)
        )

    def select(self, values_E: Tensor) -> Tensor:
        """The entries of the held experts, in local order."""
        if self._subset is None:
            return values_E
        return values_E[self._subset.to(values_E.device)]

    def dispatch(
        self,
        x_RD: Tensor,
        counts_E: Tensor,
        uniform_counts: bool = False,
        filled_E: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, None]:
        filled_L = None if filled_E is None else self.select(filled_E)
        if self._subset is None:
            return x_RD, counts_E, filled_L, None
        counts_L = self.select(counts_E)
        # The check reads the counts on the host: eager only (under torch.compile it would
        # break the graph; the restricted router is what guarantees it there).
        if not torch.compiler.is_compiling() and int(counts_L.sum()) != x_RD.shape[0]:
            raise ValueError(
                f"{x_RD.shape[0] - int(counts_L.sum())} rows were routed to experts outside "
                f"this subset {list(self.expert_ids)}; restrict the router to the subset "
                "(router.restrict)"
            )
        return x_RD, counts_L, filled_L, None

    def combine(self, y_RD: Tensor, context: Any) -> Tensor:
        return y_RD


@dataclass(frozen=True)
class _EPContext:
    """What combine needs: the exchange plan and the received chunks' rows [source,
    expert]. A padded layout with fill counts also keeps where the filled rows sit in
    the sender's rows (`send_index`, of `send_rows`) and in the local ones
    (`local_index`)."""

    plan: PreparedExchange
    recv_chunks_PL: Tensor
    send_index: Tensor | None = None
    local_index: Tensor | None = None
    send_rows: int = 0


def _filled_rows(counts_X: Tensor, filled_X: Tensor) -> Tensor:
    """Indices of the first filled_X[x] rows of each block of counts_X[x] rows."""
    start_X = torch.cumsum(counts_X, 0) - counts_X
    first_X = torch.cumsum(filled_X, 0) - filled_X
    total = int(filled_X.sum())
    block_F = torch.repeat_interleave(torch.arange(counts_X.shape[0]), filled_X, output_size=total)
    return start_X[block_F] + torch.arange(total) - first_X[block_F]


_DTYPE_CODES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SIGNATURE_WHAT = "MoE dispatch inputs (num_experts, ndim, row width, dtype code)"
_UNIFORM_WHAT = (
    "MoE dispatch inputs (num_experts, ndim, row width, dtype code; the uniform counts_E)"
)
_AGREE = (0, 1, 2, 3)  # the signature's fields every rank must share (not the rows)


class ExpertParallelDispatcher:
    """Experts sharded over the EP group of `groups`: EP rank j holds global experts
    [j * L, (j + 1) * L).

    dispatch: exchange the counts [destination rank, local expert] (one all-to-all of
    L ints per peer), send each rank the rows of its experts, and regroup what arrives
    from [source rank][local expert] to [local expert][source rank], so the experts see
    rows sorted by local expert. combine undoes both steps (autograd flows through).

    `algorithm`: `flat`, `hierarchical`, or `auto` (per call, from `cost_model` and the
    mean bytes per rank, which every rank learns from the same exchange, so every rank
    picks the same algorithm). `validate`: every dispatch checks that the ranks agree on
    (E, ndim, row width, dtype), so that ranks entering with different shapes or expert
    counts get a ValueError on every rank instead of a hang or silently wrong rows. The
    signatures ride in the counts exchange; an all-gather of its own happens only on the
    first call and where no counts are exchanged (see `dispatch`).
    """

    exchanges_rows = True

    def __init__(
        self,
        num_experts: int,
        groups: ProcessGroups,
        algorithm: Algorithm | str = Algorithm.FLAT,
        cost_model: CostModel | None = None,
        validate: bool = True,
    ) -> None:
        topology = groups.topology
        if num_experts < 1 or num_experts % topology.ep_size:
            raise ValueError(
                f"num_experts={num_experts} must be a positive multiple of the EP size "
                f"{topology.ep_size} (each EP rank holds the same number of experts)"
            )
        try:
            self.algorithm = Algorithm(algorithm)
        except ValueError:
            raise ValueError(
                f"algorithm={algorithm!r}; accepted: flat, hierarchical, auto"
            ) from None
        self.num_experts = num_experts
        self.num_local_experts = num_experts // topology.ep_size
        offset = groups.ep_rank * self.num_local_experts
        self.expert_ids = tuple(range(offset, offset + self.num_local_experts))
        self.groups = groups
        self.cost_model = cost_model or CostModel.projected_cluster()
        self.validate = validate
        # Time in the all-to-alls (counts and rows, forward and backward); read with
        # `comm_timer.take()` (the trainer logs it as train/alltoall_time_s).
        self.comm_timer = CommTimer()
        self._flat = make_all_to_all(
            Algorithm.FLAT, groups.ep, groups.ep_intra, groups.ep_inter, self.comm_timer
        )
        self._hierarchical = make_all_to_all(
            Algorithm.HIERARCHICAL, groups.ep, groups.ep_intra, groups.ep_inter, self.comm_timer
        )
        self.last_algorithm: str = ""
        self._agreed = False  # a first call's all-gather found every rank's E the same

    def _signature(self, x_RD: Tensor) -> list[int]:
        """This rank's dispatch inputs: (E, ndim, row width, dtype code, rows); every rank
        must agree on the first four (`_AGREE`)."""
        dtype_code = _DTYPE_CODES.index(x_RD.dtype) if x_RD.dtype in _DTYPE_CODES else 99
        row_width = math.prod(x_RD.shape[1:])
        return [self.num_experts, x_RD.dim(), row_width, dtype_code, x_RD.shape[0]]

    def _choose(self, signatures_PS: list[list[int]] | None, x_RD: Tensor) -> AllToAll:
        """The all-to-all of this call; `auto` decides from the mean bytes per rank in
        `signatures_PS`, which every rank holds alike, so every rank picks the same."""
        algorithm = self.algorithm
        if algorithm == Algorithm.AUTO:
            assert signatures_PS is not None
            mean_rows = sum(row[4] for row in signatures_PS) / len(signatures_PS)
            nbytes = mean_rows * math.prod(x_RD.shape[1:]) * x_RD.element_size()
            topology = self.groups.topology
            algorithm = Algorithm(
                self.cost_model.choose(topology.ep_num_nodes, topology.ep_local_size, nbytes)
            )
        self.last_algorithm = algorithm.value
        return self._hierarchical if algorithm == Algorithm.HIERARCHICAL else self._flat

    def dispatch(
        self,
        x_RD: Tensor,
        counts_E: Tensor,
        uniform_counts: bool = False,
        filled_E: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, _EPContext]:
        """x_RD: rows sorted by global expert; counts_E: int64 [E] rows per expert.
        -> (rows sorted by local expert, counts_L int64, filled_L, context for combine).
        `uniform_counts`: every rank sends these same counts (DynaMoE's padded capacities),
        so what arrives from each rank is counts_E of the local experts: no exchange.
        `filled_E`: when the counts are exchanged anyway, the fill counts travel with
        them: only the filled rows cross the network, and each local expert's rows are
        its filled rows (from every source) followed by zero rows up to counts_L, so the
        shapes the experts see are the padded ones while the experts and the network
        handle only the kept rows (filled_L). With `uniform_counts` they are not
        exchanged (that would undo the saved exchange): the padding is sent and
        multiplied, and filled_L is None.

        Validation costs no collective of its own where counts are exchanged: each rank's
        signature (`_signature`) rides in the counts exchange, so every rank learns every
        signature and checks them alike. Only the first such call (which establishes that
        the ranks agree on E, and so on the width of the counts message) and calls
        without an exchange all-gather the signatures first; with `uniform_counts` the
        all-gather also checks that every rank passed the same counts_E."""
        if counts_E.shape != (self.num_experts,):
            raise ValueError(
                f"counts_E has shape {tuple(counts_E.shape)}; expected ({self.num_experts},)"
            )
        signature = self._signature(x_RD)
        auto = self.algorithm == Algorithm.AUTO
        signatures_PS = None
        if (uniform_counts and (self.validate or auto)) or (self.validate and not self._agreed):
            what, agree, gathered = _SIGNATURE_WHAT, _AGREE, signature
            if uniform_counts and self.validate:
                # The promise of uniform counts: every rank passes the same counts_E (a
                # rank that did not would desynchronise the all-to-all's split sizes).
                what = _UNIFORM_WHAT
                agree = (*_AGREE, *range(len(signature), len(signature) + self.num_experts))
                gathered = signature + counts_E.tolist()
            signatures_PS = check_consistent(
                gathered, self.groups.ep, what=what, device=x_RD.device, agree=agree
            ).tolist()
            self._agreed = True
        ep_size = self.groups.topology.ep_size
        local = self.num_local_experts
        send_PL = counts_E.to(device=x_RD.device, dtype=torch.int64).view(ep_size, -1)
        recv_fill_PL_host = None
        if uniform_counts:
            local_L = send_PL[self.groups.ep_rank]
            recv_PL_host = local_L.cpu().expand(ep_size, -1).contiguous()
        else:
            # Per destination: [counts of its experts, (their fills), this signature].
            parts = [send_PL]
            if filled_E is not None:
                parts.append(filled_E.to(device=x_RD.device, dtype=torch.int64).view(ep_size, -1))
            parts.append(torch.tensor(signature, device=x_RD.device).expand(ep_size, -1))
            with self.comm_timer.measure(x_RD.device):
                recv_PX = exchange_counts(torch.cat(parts, dim=1), self.groups.ep)
            recv_PX_host = recv_PX.cpu()
            recv_PL_host = recv_PX_host[:, :local]
            if filled_E is not None:
                recv_fill_PL_host = recv_PX_host[:, local : 2 * local]
            signatures_PS = recv_PX_host[:, -len(signature) :].tolist()
            if self.validate:
                require_agreement(signatures_PS, what=_SIGNATURE_WHAT, agree=_AGREE)
        all_to_all = self._choose(signatures_PS, x_RD)
        counts_L = recv_PL_host.sum(0)
        if recv_fill_PL_host is None:
            plan = all_to_all.plan(send_PL.sum(1).cpu(), recv_PL_host.sum(1), x_RD.device)
            x_local = transpose_chunks(plan.forward(x_RD), recv_PL_host)
            return x_local, counts_L.to(counts_E.device), None, _EPContext(plan, recv_PL_host)
        # Send the filled rows only; place what arrives first in each local expert's rows.
        assert filled_E is not None
        fill_PL = filled_E.cpu().to(torch.int64).view(ep_size, -1)
        send_index = _filled_rows(send_PL.cpu().reshape(-1), fill_PL.reshape(-1))
        plan = all_to_all.plan(fill_PL.sum(1), recv_fill_PL_host.sum(1), x_RD.device)
        x_filled = plan.forward(x_RD.index_select(0, send_index.to(x_RD.device)))
        x_filled = transpose_chunks(x_filled, recv_fill_PL_host)
        filled_L = recv_fill_PL_host.sum(0)
        local_index = _filled_rows(counts_L, filled_L).to(x_RD.device)
        x_local = x_filled.new_zeros(int(counts_L.sum()), *x_filled.shape[1:])
        x_local = x_local.index_copy(0, local_index, x_filled)
        context = _EPContext(
            plan, recv_fill_PL_host, send_index.to(x_RD.device), local_index, x_RD.shape[0]
        )
        return x_local, counts_L.to(counts_E.device), filled_L.to(counts_E.device), context

    def combine(self, y_RD: Tensor, context: _EPContext) -> Tensor:
        """Local expert outputs (sorted by local expert) -> rows in dispatch's input order
        (zero rows for the padding of a padded layout with fill counts)."""
        if context.local_index is not None:
            y_RD = y_RD.index_select(0, context.local_index)
        y_from_sources = transpose_chunks(y_RD, context.recv_chunks_PL.t())
        y_back = context.plan.reverse(y_from_sources)
        if context.send_index is None:
            return y_back
        y_padded = y_back.new_zeros(context.send_rows, *y_back.shape[1:])
        return y_padded.index_copy(0, context.send_index, y_back)
