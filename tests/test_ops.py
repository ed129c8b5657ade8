"""The custom ops against plain per-expert / per-slot loops: outputs and gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe import ops

DTYPES = [torch.float32, torch.float64]


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    )


def _loop_grouped_mm(x_RD: torch.Tensor, w_EDH: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        outputs.append(x_RD[start : start + count] @ w_EDH[expert])
        start += count
    return torch.cat(outputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7, 0], [2, 2, 2, 2]])
def test_grouped_mm_matches_loop(dtype: torch.dtype, counts: list[int]) -> None:
    rows = sum(counts)
    x = torch.randn(rows, 6, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 6, 5, dtype=dtype, requires_grad=True)
    counts_E = torch.tensor(counts)
    y = ops.grouped_mm(x, w, counts_E)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    y_ref = _loop_grouped_mm(x_ref, w_ref, counts)
    torch.testing.assert_close(y, y_ref, **_tolerance(dtype))
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **_tolerance(dtype))
    torch.testing.assert_close(w.grad, w_ref.grad, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("counts", "filled"),
    [([4, 3, 5, 2], [2, 3, 0, 1]), ([3, 3, 3, 3], [3, 1, 3, 3]), ([3, 3, 3, 3], [3, 3, 3, 3])],
    ids=["uneven", "padded_uniform", "full_uniform"],
)
def test_grouped_mm_filled_rows_match_loop(
    dtype: torch.dtype, counts: list[int], filled: list[int]
) -> None:
    """A padded layout: only the first filled[e] rows of block e are multiplied; padding
    rows give zero output and add nothing to the weight gradient (their inputs are
    random here, not zero, so a path that multiplied them would show)."""
    rows = sum(counts)
    x = torch.randn(rows, 6, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 6, 5, dtype=dtype, requires_grad=True)
    y = ops.grouped_mm(x, w, torch.tensor(counts), torch.tensor(filled))
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    outputs, start = [], 0
    for expert, (count, used) in enumerate(zip(counts, filled)):
        block = x_ref[start : start + used] @ w_ref[expert]
        outputs += [block, x_ref.new_zeros(count - used, 5)]
        start += count
    y_ref = torch.cat(outputs)
    torch.testing.assert_close(y, y_ref, **_tolerance(dtype))
    dy = torch.randn_like(y)  # nonzero on the padding rows too
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **_tolerance(dtype))
    torch.testing.assert_close(w.grad, w_ref.grad, **_tolerance(dtype))


def test_grouped_mm_rejects_bad_fill() -> None:
    x, w = torch.randn(5, 3), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"filled_E\[1\]=4"):
        ops.grouped_mm(x, w, torch.tensor([2, 3]), torch.tensor([1, 4]))


def test_grouped_mm_gradcheck() -> None:
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 0, 5])
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_mm(a, b, counts), (x, w))


def _slots(num_tokens: int, top_k: int, num_rows: int, generator: torch.Generator) -> torch.Tensor:
    rows = torch.full((num_tokens * top_k,), -1)
    slots = torch.randperm(num_tokens * top_k, generator=generator)[:num_rows]
    rows[slots] = torch.randperm(num_rows, generator=generator)
    return rows.view(num_tokens, top_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [20, 27, 0], ids=["some_dropped", "none_dropped", "all"])
def test_combine_and_gather_match_loops(dtype: torch.dtype, num_rows: int) -> None:
    generator = torch.Generator().manual_seed(3 + num_rows)
    num_tokens, top_k, width = 9, 3, 5
    row_of_slot = _slots(num_tokens, top_k, num_rows, generator)
    y = torch.randn(num_rows, width, dtype=dtype, requires_grad=True)
    weights = torch.rand(num_tokens, top_k, dtype=dtype, requires_grad=True)
    out = ops.combine(y, row_of_slot, weights)
    expected = []
    for token in range(num_tokens):
        acc = (y.sum(0) + weights[token].sum()) * 0  # zeros, on the graph of both inputs
        for choice in range(top_k):
            row = int(row_of_slot[token, choice])
            if row >= 0:
                acc = acc + weights[token, choice] * y[row]
        expected.append(acc)
    expected_TD = torch.stack(expected)
    torch.testing.assert_close(out, expected_TD, **_tolerance(dtype))
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (y, weights), dy)
    grads_ref = torch.autograd.grad(expected_TD, (y, weights), dy)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **_tolerance(dtype))

    x = torch.randn(num_tokens, width, dtype=dtype, requires_grad=True)
    index = torch.randint(0, num_tokens, (num_rows,), generator=generator)
    gathered = ops.gather_rows(x, index)
    rows_ref = [x[i] for i in index.tolist()]
    gathered_ref = torch.stack(rows_ref) if rows_ref else x.new_zeros(0, width)
    torch.testing.assert_close(gathered, gathered_ref)
    dg = torch.randn_like(gathered)
    (dx,) = torch.autograd.grad(gathered, x, dg)
    dx_ref = torch.zeros_like(x)
    for r, i in enumerate(index.tolist()):
        dx_ref[i] += dg[r]
    torch.testing.assert_close(dx, dx_ref, **_tolerance(dtype))


def test_combine_gradcheck() -> None:
    generator = torch.Generator().manual_seed(0)
    row_of_slot = _slots(5, 2, 7, generator)
    y = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.combine(a, row_of_slot, b), (y, weights))


def test_opcheck_registrations() -> None:
    """Fake (meta) kernels, autograd registration and schema agree with the real op."""
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(2, 4, 3, requires_grad=True)
    counts = torch.tensor([4, 2])
    torch.library.opcheck(torch.ops.moe.grouped_mm.default, (x, w, counts))
    filled = torch.tensor([3, 1])
    torch.library.opcheck(torch.ops.moe.grouped_mm.default, (x, w, counts, filled))
    # The backward ops have no autograd formula of their own (no double backward).
    wgrad_args = (x.detach(), torch.randn(6, 3), counts)
    torch.library.opcheck(torch.ops.moe.grouped_mm_wgrad.default, wgrad_args)
    torch.library.opcheck(torch.ops.moe.grouped_mm_wgrad.default, (*wgrad_args, filled))
    scatter_args = (torch.randn(3, 4), torch.tensor([0, 2, 2]), 5)
    torch.library.opcheck(torch.ops.moe.scatter_add_rows.default, scatter_args)
    torch.library.opcheck(torch.ops.moe.gather_rows.default, (x, torch.tensor([0, 2, 2])))
    row_of_slot = torch.tensor([[0, -1], [2, 1], [-1, 3]])
    y = torch.randn(4, 4, requires_grad=True)
    weights = torch.rand(3, 2, requires_grad=True)
    torch.library.opcheck(torch.ops.moe.combine.default, (y, row_of_slot, weights))
    backward_args = (torch.randn(3, 4), y.detach(), row_of_slot, weights.detach())
    torch.library.opcheck(torch.ops.moe.combine_backward.default, backward_args)


def test_compile_traces_grouped_mm() -> None:
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(2, 4, 3, requires_grad=True)
    counts = torch.tensor([1, 5])

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(ops.grouped_mm(a, b, counts)).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss = compiled(x, w)
    loss.backward()
    x_ref, w_ref = x.detach().requires_grad_(), w.detach().requires_grad_()
    fn(x_ref, w_ref).backward()
    torch.testing.assert_close(loss, fn(x, w))
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


def _fork_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Enough non-empty blocks for the worker pool (ops.POOL_MIN_BLOCKS), one idle expert.
    counts = torch.tensor([10, 0, 25, 5] + [2] * ops.POOL_MIN_BLOCKS)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(int(counts.sum()), 6, generator=generator)
    w = torch.randn(counts.numel(), 6, 5, generator=generator)
    return x, w, counts


def _fork_child(queue: Any) -> None:
    # Only the block workers may compute here: a multi-threaded OpenMP region in a
    # forked child hangs in libgomp (true of any torch op, not of ours).
    queue.put(ops.grouped_mm_torch(*_fork_inputs()).tolist())


def test_cpu_block_workers_equal_one_thread_and_survive_fork() -> None:
    """With 2 intra-op threads the blocks run on worker threads (single-threaded mm each):
    bit for bit the one-thread result, for uneven blocks and idle experts."""
    import multiprocessing

    generator = torch.Generator().manual_seed(11)
    # At least ops.POOL_MIN_BLOCKS non-empty blocks (fewer run one after another).
    counts = torch.tensor([0, 70, 3, 0, 41, 1, 0, 9] + [4, 1] * (ops.POOL_MIN_BLOCKS // 2))
    x = torch.randn(int(counts.sum()), 16, generator=generator)
    w = torch.randn(counts.numel(), 16, 12, generator=generator)
    dy = torch.randn(int(counts.sum()), 12, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, dw1 = ops.grouped_mm_torch(x, w, counts), ops.grouped_mm_wgrad_torch(x, dy, counts)
        torch.set_num_threads(2)
        y2, dw2 = ops.grouped_mm_torch(x, w, counts), ops.grouped_mm_wgrad_torch(x, dy, counts)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2) and torch.equal(dw1, dw2)
    assert not dw2[[0, 3, 6]].any()
    # Through autograd (the inputs require grad; grad mode is per thread).
    grads = []
    for num_threads in (1, 2):
        torch.set_num_threads(num_threads)
        try:
            leaf_x, leaf_w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            out = ops.grouped_mm(leaf_x, leaf_w, counts)
            grads.append((out, *torch.autograd.grad(out, (leaf_x, leaf_w), dy)))
        finally:
            torch.set_num_threads(threads)
    for one, two in zip(*grads):
        assert torch.equal(one, two)
    # A forked child (the parent's pool threads do not exist there) rebuilds the pool.
    torch.set_num_threads(2)
    try:
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_fork_child, args=(queue,))
        child.start()
        from_child = torch.tensor(queue.get(timeout=60))
        child.join(timeout=10)
    finally:
        torch.set_num_threads(threads)
    assert child.exitcode == 0
    assert torch.equal(from_child, ops.grouped_mm_torch(*_fork_inputs()))


def test_cpu_block_workers_under_inference_mode() -> None:
    """Under `torch.inference_mode` (per thread, as `torch.no_grad` is) the block workers
    write into inference tensors: they run in the caller's inference mode, and the
    results equal those of a no-grad call. Both the grouped matmul and the folded ops."""
    from moe.layer import MoELayer
    from routing import RoutingConfig

    generator = torch.Generator().manual_seed(12)
    counts = torch.tensor([0, 70, 3, 0, 41, 1, 0, 9] + [4, 1] * (ops.POOL_MIN_BLOCKS // 2))
    x = torch.randn(int(counts.sum()), 16, generator=generator)
    w = torch.randn(counts.numel(), 16, 12, generator=generator)
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 24, RoutingConfig(top_k=8, capacity="dropless"))
    tokens = torch.randn(160, 16, generator=generator)  # 1280 rows: 5 spans of 256
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            want = ops.grouped_mm_torch(x, w, counts), layer(tokens).y
        with torch.inference_mode():
            got = ops.grouped_mm_torch(x, w, counts), layer(tokens).y
    finally:
        torch.set_num_threads(threads)
    assert all(t.is_inference() for t in got)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
