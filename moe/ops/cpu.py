"""The MoE layer's fast ops, registered with `torch.library` so that autograd and
`torch.compile` see one opaque op each:

- `moe::grouped_mm(x_RD, w_EDH, counts_E, filled_E=None) -> y_RH`: row block e of x
  times w[e].
- `moe::grouped_mm_wgrad(x_RD, dy_RH, counts_E, filled_E=None) -> dw_EDH`: per-expert
  x_e^T dy_e, written into one full-size gradient (slicing a stacked parameter per expert
  inside autograd would build a full-size gradient per slice: E times the memory traffic).
  `filled_E` (a capacity-padded layout, `moe.permute.capacity_padded_permutation`): only
  the first filled_E[e] rows of block e hold slots, the rest are padding: grouped_mm
  returns zero rows for them and grouped_mm_wgrad leaves them out, so the CPU path
  multiplies only the filled rows (the shapes stay static; the FLOPs follow the load).
- `moe::gather_rows(x_TD, index_R) -> x_RD`: the permute; backward is a scatter-add.
- `moe::combine(y_RD, row_of_slot_TK, weights_TK) -> y_TD`: the weighted unpermute,
  y[t] = sum_k w[t,k] * y[row[t,k]] over slots with row >= 0 (gather-based, no atomics;
  on CPU one fused `embedding_bag`). Rows of no slot (capacity padding) are never read
  and get zero gradient.

When every expert has the same row count, all of them filled (a capacity-padded layout
with no padding left, or a balanced load), the grouped matmul and its weight gradient
are one `torch.bmm` over [E, rows, D] on CPU. Otherwise, CPU (and any device without a
kernel): plain torch, `torch.mm` over the (filled) row blocks.
With N > 1 intra-op threads the blocks are shared out to N worker threads that each run
single-threaded `torch.mm`s (one parallel region per call instead of one per block: at
E=64 that removes 64 OpenMP fork/joins per matmul; see `_BlockRunner`). CUDA: the
Triton kernels of `moe.ops.kernels`.

Shapes: T tokens, K slots per token, R routed rows (sorted by expert), D input width,
H output width, E experts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moe.ops.row_buckets import bucketed_rows, zero_padded

Block = tuple[int, int, int]  # (expert, start row, stop row)


class _Layout(NamedTuple):
    """The host-side view of a grouped matmul's rows, from one read of the counts."""

    counts: list[int]  # rows of each expert's block
    filled: list[int] | None  # filled rows of each block (None: all of them)
    blocks: list[Block]  # (expert, start, stop) of the filled rows of each non-empty block
    uniform: int | None  # rows per block when every block is full and equal (E > 1)


def _layout(counts_E: Tensor, num_rows: int, filled_E: Tensor | None = None) -> _Layout:
    """Checks the counts (they sum to the rows; 0 <= filled <= count) and builds the row
    blocks in one pass over host lists: a grouped matmul runs per layer and step, and
    each tensor op here would be one more dispatch."""
    counts = counts_E.tolist()
    filled = None if filled_E is None else filled_E.tolist()
    blocks = []
    start = 0
    for expert, (count, used) in enumerate(zip(counts, filled or counts, strict=True)):
        if not 0 <= used <= count:
            raise ValueError(f"filled_E[{expert}]={used}: expected 0 <= filled <= {count}")
        if used:
            blocks.append((expert, start, start + used))
        start += count
    assert start == num_rows, f"counts_E sums to {start}, not to the {num_rows} rows"
    if filled == counts:
        filled = None  # no padding left
    # One bmm over [E, rows, D] when every block is full and of one size (a
    # capacity-padded layout with no padding left, or a balanced load): one parallel
    # region and one call instead of E (at the demo's E=8, 1024 rows, D=H=128 the
    # per-block calls cost more than their FLOPs).
    uniform = None
    if len(counts) > 1 and num_rows and filled is None and counts.count(counts[0]) == len(counts):
        uniform = counts[0]
    return _Layout(counts, filled, blocks, uniform)


def _zero_padding(y_RH: Tensor, counts: list[int], filled: list[int]) -> None:
    """Zero the rows past each block's fill."""
    start = 0
    for count, used in zip(counts, filled, strict=True):
        if used < count:
            y_RH[start + used : start + count].zero_()
        start += count


# Below this many row blocks a grouped matmul runs its blocks one after another (see
# `_BlockRunner`).
POOL_MIN_BLOCKS = 16


class _BlockRunner:
    """Runs per-block matmuls on CPU, in parallel over blocks.

    Small per-expert matmuls with two OpenMP threads each pay a fork/join per block
    (E per grouped matmul) and run below the large-matmul rate; the same blocks split
    between N workers running single-threaded `torch.mm` (which releases the GIL) need
    one hand-off per call. At E=64, 16384 rows, D=H=512, 2 threads: 106.6 -> 100.8 ms
    for one grouped matmul, the dense floor 100.2 ms (`scripts/bench_grouped_mm.py`,
    docs/results/bench_grouped_mm.json). Blocks go to workers largest first, each to the least loaded worker.
    Every block is still computed by exactly one `torch.mm` into its own output rows.
    The pool is rebuilt when the intra-op thread count changes and in a forked child.

    Few blocks (fewer than `POOL_MIN_BLOCKS`) run one after another, each `torch.mm` on
    all intra-op threads: then the fork/joins are few, and the pool's workers would
    compete for the cores with OpenMP threads still spinning after the step's previous
    parallel op. Demo shapes (E=8 blocks of 600-2200 rows, D=H=128, 2 threads, after an
    OpenMP matmul): pool 7.4-8.3 ms, one after another 3.8-4.4 ms; E=64 blocks of 256
    rows, D=H=512: pool 72 ms, one after another 89 ms (2026-11-26; in a compiled
    DynaMoE step a grouped matmul call went from 19.3 to 11.6 ms, docs/BENCHMARKS.md).
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._workers = 0
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool, self._workers = None, 0  # the parent's threads do not exist here

    def _get_pool(self, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._workers != workers:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(
                    workers, thread_name_prefix="moe-blocks",
                    initializer=torch.set_num_threads, initargs=(1,),
                )  # fmt: skip
                self._workers = workers
            return self._pool

    def run(self, blocks: list[Block], work: Callable[[Block], None], device: torch.device) -> None:
        self.run_indexed(blocks, lambda _worker, block: work(block), device)

    def run_indexed(
        self,
        blocks: list[Block],
        work: Callable[[int, Block], None],
        device: torch.device,
        min_blocks: int = POOL_MIN_BLOCKS,
    ) -> int:
        """As `run`, with `work(worker, block)`: `worker` (0 <= worker < the returned
        count) names the one thread that runs the block, for per-worker accumulators;
        the pool runs from `min_blocks` blocks."""
        workers = min(torch.get_num_threads(), len(blocks))
        # Only CPU tensors: on an accelerator the workers would not use the caller's stream.
        few = len(blocks) < min_blocks
        if workers <= 1 or few or device.type != "cpu" or torch.compiler.is_compiling():
            for block in blocks:
                work(0, block)
            return 1
        shares: list[list[Block]] = [[] for _ in range(workers)]
        loads = [0] * workers
        for block in sorted(blocks, key=lambda b: b[1] - b[2]):  # largest first
            least = loads.index(min(loads))
            shares[least].append(block)
            loads[least] += block[2] - block[1]

        # Grad mode and inference mode are per thread: the workers take the caller's
        # inference mode (writing into an inference tensor outside it is an error); the
        # op's body never records autograd history.
        inference = torch.is_inference_mode_enabled()

        def run_share(worker: int) -> None:
            with torch.inference_mode(inference), torch.no_grad():
                for block in shares[worker]:
                    work(worker, block)

        pool = self._get_pool(workers)
        for future in [pool.submit(run_share, worker) for worker in range(workers)]:
            future.result()
        return workers


_block_runner = _BlockRunner()


def grouped_mm_torch(
    x_RD: Tensor, w_EDH: Tensor, counts_E: Tensor, filled_E: Tensor | None = None
) -> Tensor:
    """y_RH[rows of e] = x_RD[rows of e] @ w_EDH[e]; rows sorted by expert; padding rows
    (past filled_E[e] in block e) are zero."""
    layout = _layout(counts_E, x_RD.shape[0], filled_E)
    if layout.uniform is not None:  # balanced or capacity-padded and full: one bmm
        x_ECD = x_RD.view(counts_E.shape[0], layout.uniform, -1)
        return torch.bmm(x_ECD, w_EDH).view(x_RD.shape[0], -1)
    y_RH = x_RD.new_empty(x_RD.shape[0], w_EDH.shape[2])
    if layout.filled is not None:
        _zero_padding(y_RH, layout.counts, layout.filled)

    def work(block: Block) -> None:
        expert, start, stop = block
        rows = bucketed_rows(stop - start, x_RD.dtype, x_RD.device)
        if rows == stop - start:
            torch.mm(x_RD[start:stop], w_EDH[expert], out=y_RH[start:stop])
        else:  # the padding rows' products are computed and dropped
            y_MH = torch.mm(zero_padded(x_RD[start:stop], rows), w_EDH[expert])
            y_RH[start:stop] = y_MH[: stop - start]

    _block_runner.run(layout.blocks, work, x_RD.device)
    return y_RH


grouped_mm = torch.library.custom_op("moe::grouped_mm", grouped_mm_torch, mutates_args=())


@grouped_mm.register_fake
def _(x_RD: Tensor, w_EDH: Tensor, counts_E: Tensor, filled_E: Tensor | None = None) -> Tensor:
    return x_RD.new_empty(x_RD.shape[0], w_EDH.shape[2])


def grouped_mm_wgrad_torch(
    x_RD: Tensor, dy_RH: Tensor, counts_E: Tensor, filled_E: Tensor | None = None
) -> Tensor:
    """dw_EDH[e] = x_RD[rows of e]^T @ dy_RH[rows of e] over the filled rows; zero for
    experts without any."""
    layout = _layout(counts_E, x_RD.shape[0], filled_E)
    if layout.uniform is not None:
        num_experts, rows = counts_E.shape[0], layout.uniform
        x_EDC = x_RD.view(num_experts, rows, -1).transpose(1, 2)
        return torch.bmm(x_EDC, dy_RH.view(num_experts, rows, -1))
    # Every expert with rows is written whole by its mm: zero only the idle ones (a zero
    # fill of the full [E, D, H] gradient costs as much memory traffic as a weight read).
    dw_EDH = x_RD.new_empty(counts_E.shape[0], x_RD.shape[1], dy_RH.shape[1])
    written = {expert for expert, _, _ in layout.blocks}
    for expert in range(counts_E.shape[0]):
        if expert not in written:
            dw_EDH[expert].zero_()

    def work(block: Block) -> None:
        expert, start, stop = block
        rows = bucketed_rows(stop - start, x_RD.dtype, x_RD.device)
        # Zero rows add exact zeros to the sum over rows.
        x_MD = zero_padded(x_RD[start:stop], rows)
        torch.mm(x_MD.t(), zero_padded(dy_RH[start:stop], rows), out=dw_EDH[expert])

    _block_runner.run(layout.blocks, work, x_RD.device)
    return dw_EDH


grouped_mm_wgrad = torch.library.custom_op(
    "moe::grouped_mm_wgrad", grouped_mm_wgrad_torch, mutates_args=()
)


@grouped_mm_wgrad.register_fake
def _(x_RD: Tensor, dy_RH: Tensor, counts_E: Tensor, filled_E: Tensor | None = None) -> Tensor:
    return x_RD.new_empty(counts_E.shape[0], x_RD.shape[1], dy_RH.shape[1])


def _grouped_mm_setup(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor
) -> None:
    x_RD, w_EDH, counts_E, filled_E = inputs
    ctx.save_for_backward(x_RD, w_EDH, counts_E, filled_E)


def _grouped_mm_backward(
    ctx: torch.autograd.function.FunctionCtx, dy_RH: Tensor
) -> tuple[Tensor | None, Tensor | None, None, None]:
    x_RD, w_EDH, counts_E, filled_E = ctx.saved_tensors  # type: ignore[attr-defined]
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    dx_RD = grouped_mm(dy_RH, w_EDH.transpose(1, 2), counts_E, filled_E) if needs[0] else None
    dw_EDH = grouped_mm_wgrad(x_RD, dy_RH, counts_E, filled_E) if needs[1] else None
    return dx_RD, dw_EDH, None, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


@torch.library.custom_op("moe::gather_rows", mutates_args=())
def gather_rows(x_TD: Tensor, index_R: Tensor) -> Tensor:
    """x_RD = x_TD[index_R]."""
    return x_TD.index_select(0, index_R)


@gather_rows.register_fake
def _(x_TD: Tensor, index_R: Tensor) -> Tensor:
    return x_TD.new_empty(index_R.shape[0], x_TD.shape[1])


@torch.library.custom_op("moe::scatter_add_rows", mutates_args=())
def scatter_add_rows(dy_RD: Tensor, index_R: Tensor, num_rows: int) -> Tensor:
    """dx_TD = zeros, then dx_TD[index_R[r]] += dy_RD[r] (the backward of gather_rows)."""
    return dy_RD.new_zeros(num_rows, dy_RD.shape[1]).index_add_(0, index_R, dy_RD)


@scatter_add_rows.register_fake
def _(dy_RD: Tensor, index_R: Tensor, num_rows: int) -> Tensor:
    return dy_RD.new_empty(num_rows, dy_RD.shape[1])


def _gather_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    x_TD, index_R = inputs
    ctx.save_for_backward(index_R)
    ctx.num_rows = x_TD.shape[0]  # type: ignore[attr-defined]


def _gather_backward(
    ctx: torch.autograd.function.FunctionCtx, dy_RD: Tensor
) -> tuple[Tensor, None]:
    (index_R,) = ctx.saved_tensors  # type: ignore[attr-defined]
    return scatter_add_rows(dy_RD, index_R, ctx.num_rows), None  # type: ignore[attr-defined]


gather_rows.register_autograd(_gather_backward, setup_context=_gather_setup)


def _kept_slots(row_of_slot_TK: Tensor) -> tuple[Tensor, Tensor]:
    """(slots_S, rows_S): flat index (t*K + k) and routed row of every kept slot, in
    token order (S = number of kept slots = R)."""
    rows_N = row_of_slot_TK.reshape(-1)
    slots_S = torch.nonzero(rows_N >= 0).squeeze(1)
    return slots_S, rows_N[slots_S]


@torch.library.custom_op("moe::combine", mutates_args=())
def combine(y_RD: Tensor, row_of_slot_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """y_TD[t] = sum_k weights_TK[t,k] * y_RD[row_of_slot_TK[t,k]] (rows >= 0 only).

    One fused weighted gather-sum (`embedding_bag`, a bag per token): no [T, K, D]
    intermediate and no padded copy of y_RD for the dropped slots."""
    num_tokens = row_of_slot_TK.shape[0]
    weights_N = weights_TK.reshape(-1).to(y_RD.dtype)
    if num_tokens == 0:
        return y_RD.new_zeros(0, y_RD.shape[1])
    if bool((row_of_slot_TK >= 0).all()):  # dropless: every bag holds K rows
        return nn.functional.embedding_bag(
            row_of_slot_TK, y_RD, mode="sum", per_sample_weights=weights_TK.to(y_RD.dtype)
        )
    slots_S, rows_S = _kept_slots(row_of_slot_TK)
    kept_T = (row_of_slot_TK >= 0).sum(dim=1)
    offsets_T = torch.cumsum(kept_T, dim=0) - kept_T
    return nn.functional.embedding_bag(
        rows_S, y_RD, offsets_T, mode="sum", per_sample_weights=weights_N[slots_S]
    )


@combine.register_fake
def _(y_RD: Tensor, row_of_slot_TK: Tensor, weights_TK: Tensor) -> Tensor:
    return y_RD.new_empty(row_of_slot_TK.shape[0], y_RD.shape[1])


@torch.library.custom_op("moe::combine_backward", mutates_args=())
def combine_backward(
    dy_TD: Tensor, y_RD: Tensor, row_of_slot_TK: Tensor, weights_TK: Tensor
) -> tuple[Tensor, Tensor]:
    """(dy_RD, dweights_TK) of `combine`. A row belongs to at most one slot (rows of no
    slot are capacity padding: zero gradient), so both are gathers:
    dy_RD[r] = w[slot] * dy_TD[token of r]; dweights[slot] = <y_RD[r], dy_TD[t]>."""
    top_k = row_of_slot_TK.shape[1]
    num_rows = y_RD.shape[0]
    slots_S, rows_S = _kept_slots(row_of_slot_TK)
    num_slots = slots_S.numel()
    assert num_slots <= num_rows, "a routed row belongs to at most one slot"
    if num_slots == num_rows:  # no padding: every row has its slot
        slot_of_row_R = torch.empty_like(slots_S)
        slot_of_row_R[rows_S] = slots_S
        dy_RD = dy_TD.index_select(0, slot_of_row_R // top_k)
        # dweights before dy_RD is scaled in place: the gathered dy_TD rows are shared.
        dweights_R = torch.bmm(dy_RD.unsqueeze(1), y_RD.unsqueeze(2)).view(num_rows)
        weights_R = weights_TK.reshape(-1)[slot_of_row_R].to(dy_RD.dtype)
        dy_RD.mul_(weights_R.unsqueeze(1))
        dweights_N = weights_TK.new_zeros(weights_TK.numel())
        dweights_N[slot_of_row_R] = dweights_R.to(weights_TK.dtype)
        return dy_RD, dweights_N.view(weights_TK.shape)
    dy_SD = dy_TD.index_select(0, slots_S // top_k)
    y_SD = y_RD.index_select(0, rows_S)
    dweights_S = torch.bmm(dy_SD.unsqueeze(1), y_SD.unsqueeze(2)).view(num_slots)
    dy_SD.mul_(weights_TK.reshape(-1)[slots_S].to(dy_SD.dtype).unsqueeze(1))
    dy_RD = dy_TD.new_zeros(num_rows, dy_TD.shape[1]).index_copy_(0, rows_S, dy_SD)
    dweights_N = weights_TK.new_zeros(weights_TK.numel())
    dweights_N[slots_S] = dweights_S.to(weights_TK.dtype)
    return dy_RD, dweights_N.view(weights_TK.shape)


@combine_backward.register_fake
def _(
    dy_TD: Tensor, y_RD: Tensor, row_of_slot_TK: Tensor, weights_TK: Tensor
) -> tuple[Tensor, Tensor]:
    return dy_TD.new_empty(y_RD.shape), weights_TK.new_empty(weights_TK.shape)


def _combine_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    y_RD, row_of_slot_TK, weights_TK = inputs
    ctx.save_for_backward(y_RD, row_of_slot_TK, weights_TK)


def _combine_backward(
    ctx: torch.autograd.function.FunctionCtx, dy_TD: Tensor
) -> tuple[Tensor, None, Tensor]:
    y_RD, row_of_slot_TK, weights_TK = ctx.saved_tensors  # type: ignore[attr-defined]
    dy_RD, dweights_TK = combine_backward(dy_TD.contiguous(), y_RD, row_of_slot_TK, weights_TK)
    return dy_RD, None, dweights_TK


combine.register_autograd(_combine_backward, setup_context=_combine_setup)
