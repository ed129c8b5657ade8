"""Expert parallelism equals EP=1: outputs, aux losses and every gradient.

What "the same" means here (the semantics DeepSpeed-MoE and Tutel use): every rank
routes its own T local tokens, so capacity = round(C * K * T / E) with the *local* T,
BPR priorities compete among local tokens, and the aux loss is computed per rank. The
EP=1 reference is therefore the same layer (all E experts, the same weights) run on each
rank's shard separately, with the objective mean over ranks of (each shard's loss).
Under EP the layer on rank r sees only shard r, backpropagates its own loss, and
`reduce_gradients` (sum over the group / world size) must give the reference gradient;
the input gradient of rank r equals world_size times the reference's (the reference
objective divides by world_size). float64, so the tolerance is tight.

Layouts: 2 ranks (EP=2), 4 ranks as 2 nodes x 2 with EP=4 (flat, hierarchical, auto),
and 4 ranks with EP=2 (two replicas of every expert, so expert gradients are reduced
across replicas). Capacity: top-k with fixed capacity (drops), BPR, dropless, and
fixed capacity on the capacity-padded layout (what a compiled EP step runs): the fill
counts travel with the split sizes, only the filled rows cross the network, and the
experts skip the padding rows.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from distributed_utils import run_distributed, values_or_raise

from comm.cost import CostModel
from comm.topology import Topology, build_process_groups
from launch.training.gradients import reduce_gradients
from moe.dispatchers import ExpertParallelDispatcher
from moe.layer import FOLD_MIN_TOP_K, MoELayer
from routing import RoutingConfig

pytestmark = pytest.mark.distributed

D, H, E, T = 6, 10, 8, 12
CAPACITIES = {
    "fixed": dict(capacity="fixed", capacity_factor=0.75),
    "priority": dict(capacity="priority", capacity_factor=0.5),
    "dropless": dict(capacity="dropless"),
    "fixed_padded": dict(capacity="fixed", capacity_factor=0.75),
    # Top-4: EP=1 folds the permute into the expert matmuls (moe.layer.FOLD_MIN_TOP_K),
    # EP=2 gathers the rows for the exchange: two code paths, one answer.
    "dropless_top4": dict(capacity="dropless", top_k=4),
}


def _reference_layer(capacity: str, residual: bool) -> MoELayer:
    settings = {"top_k": 2, **CAPACITIES[capacity]}
    routing = RoutingConfig(aux_loss_weight=0.05, z_loss_weight=0.01,
                            **settings)  # type: ignore[arg-type]  # fmt: skip
    torch.manual_seed(1234)
    return MoELayer(D, H, E, routing, residual_mlp=residual).double()


def _copy_weights(ep_layer: MoELayer, ref: MoELayer) -> None:
    offset, local = ep_layer.experts.expert_ids[0], ep_layer.experts.num_experts
    with torch.no_grad():
        for name, param in ep_layer.named_parameters():
            source = ref.get_parameter(name)
            if name.startswith("experts."):
                source = source[offset : offset + local]
            param.copy_(source)


def _grads(layer: MoELayer) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in layer.named_parameters()
    }


def _check_case(
    rank: int, world_size: int, ranks_per_node: int, ep_size: int, algorithm: str,
    capacity: str, residual: bool,
) -> str:  # fmt: skip
    groups = build_process_groups(Topology(world_size, ranks_per_node, ep_size))
    gen = torch.Generator().manual_seed(zlib.crc32(f"{capacity}{ep_size}{algorithm}".encode()))
    x_global = torch.randn(world_size * T, D, generator=gen, dtype=torch.float64)
    probe_global = torch.randn(world_size * T, D, generator=gen, dtype=torch.float64)
    shard = slice(rank * T, (rank + 1) * T)

    # EP=1 reference, every shard routed on its own, objective = mean of shard losses.
    ref = _reference_layer(capacity, residual)
    folded: list[int] = []
    if ref.routing.top_k >= FOLD_MIN_TOP_K:
        forward_tokens = ref.experts.forward_tokens

        def counting_forward_tokens(*args, **kwargs):  # type: ignore[no-untyped-def]
            folded.append(1)
            return forward_tokens(*args, **kwargs)

        ref.experts.forward_tokens = counting_forward_tokens  # type: ignore[method-assign]
    ref_x = x_global.clone().requires_grad_(True)
    ref_losses, ref_y = [], []
    for r in range(world_size):
        rows = slice(r * T, (r + 1) * T)
        out = ref(ref_x[rows])
        ref_y.append(out.y.detach())
        ref_losses.append((out.y * probe_global[rows]).sum() / T + out.aux_loss)
    (sum(ref_losses) / world_size).backward()  # type: ignore[operator]
    ref_grads = _grads(ref)
    assert bool(folded) == (ref.routing.top_k >= FOLD_MIN_TOP_K), "the EP=1 path did not fold"

    # "auto_slow_inter": auto with inter-node messages made very expensive.
    slow_inter = CostModel.projected_cluster(alpha_inter_us=1e6)
    dispatcher = (
        ExpertParallelDispatcher(E, groups, "auto", cost_model=slow_inter)
        if algorithm == "auto_slow_inter"
        else ExpertParallelDispatcher(E, groups, algorithm)
    )
    ep_layer = MoELayer(D, H, E, ref.routing, residual_mlp=residual,
                        dispatcher=dispatcher).double()  # fmt: skip
    _copy_weights(ep_layer, ref)
    filled_seen: list[torch.Tensor | None] = []
    if capacity == "fixed_padded":
        ep_layer._pad_to_capacity = lambda plan: True  # type: ignore[method-assign]
        experts_forward = ep_layer.experts.forward

        def recording_forward(x_RD, counts_E, filled_E=None):  # type: ignore[no-untyped-def]
            filled_seen.append(filled_E)
            return experts_forward(x_RD, counts_E, filled_E)

        ep_layer.experts.forward = recording_forward  # type: ignore[method-assign]
    x = x_global[shard].clone().requires_grad_(True)
    out = ep_layer(x)
    if capacity == "fixed_padded":
        (filled_L,) = filled_seen
        assert filled_L is not None, "the padded EP layout reached the experts without fills"
        kept = int(ep_layer.route(x.detach()).keep_TK.sum())
        total_kept = torch.tensor([kept])
        torch.distributed.all_reduce(total_kept, group=groups.ep)
        filled_total = torch.tensor([int(filled_L.sum())])
        torch.distributed.all_reduce(filled_total, group=groups.ep)
        assert int(filled_total) == int(total_kept), (int(filled_total), int(total_kept))
    loss = (out.y * probe_global[shard]).sum() / T + out.aux_loss
    loss.backward()
    reduce_gradients(ep_layer, groups)

    tol = {"atol": 1e-11, "rtol": 1e-9}
    torch.testing.assert_close(out.y, ref_y[rank], **tol)
    torch.testing.assert_close(loss, ref_losses[rank].detach(), **tol)
    assert x.grad is not None and ref_x.grad is not None
    torch.testing.assert_close(x.grad / world_size, ref_x.grad[shard], **tol)
    offset, local = ep_layer.experts.expert_ids[0], ep_layer.experts.num_experts
    for name, grad in _grads(ep_layer).items():
        want = ref_grads[name]
        if name.startswith("experts."):
            want = want[offset : offset + local]
        assert bool(want.abs().sum() > 0), f"{name}: the reference gradient is zero"
        torch.testing.assert_close(grad, want, **tol, msg=lambda m, n=name: f"{n}: {m}")
    # The timer saw the counts exchange, dispatch, combine and both backward exchanges.
    calls = dispatcher.comm_timer.calls
    assert calls >= 5, f"comm timer saw {calls} all-to-alls, expected at least 5"
    assert dispatcher.comm_timer.take() > 0 and dispatcher.comm_timer.calls == 0
    return dispatcher.last_algorithm


def _cases(rank: int, world_size: int, cases: list[tuple]) -> list[str]:  # type: ignore[type-arg]
    return [_check_case(rank, world_size, *case) for case in cases]


def test_ep2_equals_ep1_on_two_ranks() -> None:
    cases = [(1, 2, "flat", c, c == "fixed") for c in CAPACITIES] + [
        (1, 2, "hierarchical", "priority", False)
    ]
    values = values_or_raise(run_distributed(_cases, 2, cases, timeout_s=180))
    assert values[0] == ["flat"] * len(CAPACITIES) + ["hierarchical"]


@pytest.mark.slow
def test_ep4_and_replicated_ep2_equal_ep1_on_two_nodes_of_two() -> None:
    cases = [
        (2, 4, "hierarchical", "fixed", True),
        (2, 4, "flat", "priority", False),
        (2, 4, "hierarchical", "dropless", False),
        (2, 4, "auto", "fixed", False),
        (2, 4, "auto_slow_inter", "dropless", False),
        (2, 2, "flat", "fixed", True),  # two EP groups: expert grads over replicas
        (2, 2, "hierarchical", "priority", False),
    ]
    values = values_or_raise(run_distributed(_cases, 4, cases, timeout_s=300))
    # At 2 nodes x 2 the default model picks flat (hierarchical saves one inter-node
    # message but costs two more calls); with costly inter-node messages it picks 2DH.
    assert values[0] == ["hierarchical", "flat", "hierarchical", "flat", "hierarchical",
                         "flat", "hierarchical"]  # fmt: skip


def _bad_ep_input(rank: int, world_size: int) -> list[str]:
    groups = build_process_groups(Topology(world_size, 1, world_size))
    errors = []
    attempts = [
        lambda: ExpertParallelDispatcher(3, groups),  # 3 experts over EP=2
        lambda: ExpertParallelDispatcher(4, groups).dispatch(
            torch.zeros(4, 5 if rank == 0 else 6), torch.tensor([1, 1, 1, 1])
        ),  # ranks enter with different row widths
        lambda: ExpertParallelDispatcher(4 if rank == 0 else 6, groups).dispatch(
            torch.zeros(4, 5), torch.ones(4 if rank == 0 else 6, dtype=torch.int64)
        ),  # ranks disagree on the number of experts
        lambda: ExpertParallelDispatcher(4, groups, "ring"),
        lambda: ExpertParallelDispatcher(4, groups).dispatch(
            torch.zeros(4, 5), torch.tensor([1, 1, 1, 1] if rank == 0 else [2, 0, 1, 1]), True
        ),  # "uniform" counts that differ between ranks
    ]
    for attempt in attempts:
        try:
            attempt()
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def test_bad_ep_input_raises_on_every_rank() -> None:
    values = values_or_raise(
        run_distributed(_bad_ep_input, 2, timeout_s=90, collective_timeout_s=20)
    )
    for errors in values:
        assert "must be a positive multiple of the EP size 2" in errors[0]
        assert "different MoE dispatch inputs" in errors[1]
        assert "different MoE dispatch inputs" in errors[2]
        assert "accepted: flat, hierarchical, auto" in errors[3]
        assert "the uniform counts_E" in errors[4] and "fields [5, 6]" in errors[4]


def _later_mismatch(rank: int, world_size: int) -> dict:
    """Three dispatches of one dispatcher: the first two agree, the third enters with a
    different row width on rank 1. Counts the all-gathers on the way."""
    import torch.distributed as dist

    groups = build_process_groups(Topology(world_size, 1, world_size))
    gathers = 0
    all_gather = dist.all_gather

    def counting_all_gather(*args: object, **kwargs: object) -> object:
        nonlocal gathers
        gathers += 1
        return all_gather(*args, **kwargs)  # type: ignore[arg-type]

    dist.all_gather = counting_all_gather  # type: ignore[assignment]
    dispatcher = ExpertParallelDispatcher(4, groups)
    counts = torch.tensor([1, 0, 2, 1])
    rows = []
    for width in (5, 5, 6 if rank == 1 else 5):
        try:
            _, counts_L, _, _ = dispatcher.dispatch(torch.ones(4, width), counts)
            rows.append(int(counts_L.sum()))
        except ValueError as exc:
            rows.append(str(exc))
    return {"gathers": gathers, "rows": rows, "expected": 2 * (1 if rank == 0 else 3)}


def test_signatures_ride_in_the_counts_exchange() -> None:
    """After the first dispatch no all-gather runs, yet a rank entering a later dispatch
    with a different row width still raises on every rank."""
    values = values_or_raise(
        run_distributed(_later_mismatch, 2, timeout_s=90, collective_timeout_s=20)
    )
    for value in values:
        assert value["gathers"] == 1, value
        assert value["rows"][:2] == [value["expected"]] * 2, value
        assert "different MoE dispatch inputs" in value["rows"][2], value


def _bf16_case(rank: int, world_size: int, capacity: str) -> dict[str, float]:
    """EP=2 under bf16 autocast against the EP=1 reference under the same autocast (fp32
    parameters, each shard routed on its own). Returns the largest relative differences
    and the dtype of the rows the dispatcher exchanged."""
    groups = build_process_groups(Topology(world_size, 1, world_size))
    gen = torch.Generator().manual_seed(zlib.crc32(f"bf16{capacity}".encode()))
    x_global = torch.randn(world_size * T_BF16, D_BF16, generator=gen)
    probe_global = torch.randn(world_size * T_BF16, D_BF16, generator=gen)
    shard = slice(rank * T_BF16, (rank + 1) * T_BF16)
    settings = {"top_k": 2, **CAPACITIES[capacity]}
    routing = RoutingConfig(aux_loss_weight=0.05, z_loss_weight=0.01,
                            **settings)  # type: ignore[arg-type]  # fmt: skip
    torch.manual_seed(1234)
    ref = MoELayer(D_BF16, H_BF16, E, routing)
    ref_x = x_global.clone().requires_grad_(True)
    ref_losses, ref_y = [], []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for r in range(world_size):
            rows = slice(r * T_BF16, (r + 1) * T_BF16)
            out = ref(ref_x[rows])
            ref_y.append(out.y.detach())
            ref_losses.append((out.y.float() * probe_global[rows]).sum() / T_BF16 + out.aux_loss)
    (sum(ref_losses) / world_size).backward()  # type: ignore[operator]
    ref_grads = _grads(ref)

    dispatcher = ExpertParallelDispatcher(E, groups, "flat")
    exchanged: list[torch.dtype] = []
    dispatch = dispatcher.dispatch

    def recording_dispatch(x_RD, *args, **kwargs):  # type: ignore[no-untyped-def]
        exchanged.append(x_RD.dtype)
        return dispatch(x_RD, *args, **kwargs)

    dispatcher.dispatch = recording_dispatch  # type: ignore[method-assign]
    ep_layer = MoELayer(D_BF16, H_BF16, E, routing, dispatcher=dispatcher)
    _copy_weights(ep_layer, ref)
    x = x_global[shard].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ep_layer(x)
        loss = (out.y.float() * probe_global[shard]).sum() / T_BF16 + out.aux_loss
    loss.backward()
    reduce_gradients(ep_layer, groups)

    def relative(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.float() - want.float()).norm() / want.float().norm())

    assert out.y.dtype == torch.bfloat16 and x.grad is not None and ref_x.grad is not None
    report = {
        "y": relative(out.y, ref_y[rank]),
        "y_equal": float(torch.equal(out.y, ref_y[rank])),
        "loss": relative(loss.detach(), ref_losses[rank].detach()),
        "x_grad": relative(x.grad / world_size, ref_x.grad[shard]),
        "exchanged_bf16": float(exchanged == [torch.bfloat16]),
    }
    offset, local = ep_layer.experts.expert_ids[0], ep_layer.experts.num_experts
    for name, grad in _grads(ep_layer).items():
        want = ref_grads[name]
        if name.startswith("experts."):
            want = want[offset : offset + local]
        assert grad.dtype == torch.float32, name  # fp32 gradients of fp32 masters
        report[name] = relative(grad, want)
    return report


D_BF16, H_BF16, T_BF16 = 32, 48, 40


def test_ep2_equals_ep1_in_bf16() -> None:
    """Under bf16 autocast the dispatcher exchanges bf16 rows (half the bytes), and EP=2
    computes what EP=1 computes: the forward and the input gradient exactly (each row's
    products and sums are the same; only which rows share a matmul call differs), the
    weight gradients within bf16 rounding (EP=1 rounds each shard's expert gradient to
    bf16 and adds the two in fp32, EP=2 rounds the two shards' sum once)."""
    values = values_or_raise(run_distributed(_bf16_cases, 2, ["dropless", "fixed"], timeout_s=180))
    for reports in values:
        for report in reports:
            assert report.pop("exchanged_bf16") == 1.0, "the rows were not exchanged in bf16"
            assert report.pop("y_equal") == 1.0, report
            assert report.pop("y") == 0.0 and report.pop("x_grad") == 0.0, report
            assert report.pop("loss") < 1e-6, report
            for name, difference in report.items():
                assert difference < 2**-8, (name, difference)


def _bf16_cases(rank: int, world_size: int, capacities: list[str]) -> list[dict[str, float]]:
    return [_bf16_case(rank, world_size, capacity) for capacity in capacities]
