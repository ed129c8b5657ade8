"""The optional DeepSpeed engine on CPU (DS_ACCELERATOR=cpu, gloo) at two ranks: ZeRO
stage 1 and 2, at EP=1 and EP=2, train the tiny model to the torch engine's losses for
20 steps, resume from step 10 to the same losses, and partition the optimizer state (and
for stage 2 the gradients) over the ranks; at EP=2 the experts are DeepSpeed MoE
parameters over the expert-data-parallel group.

One spawn per EP size runs everything (each spawn pays for starting DeepSpeed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from distributed_utils import run_distributed, values_or_raise
from test_train import tiny_config

from launch.build import build_model
from launch.runtime import ProcessInfo, setup_runtime, teardown_runtime
from launch.training.engines import build_engine
from launch.training.loop import train
from launch.training.objectives import LanguageModelling
from moe.checkpoint import decode_state
from moe.experts import expert_parameter_ids
from moe.params import count_parameters
from moe.transformer import MoETransformer

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# Dropless routing: a capacity drop could turn a rounding difference into a routing one.
RUN = (
    "routing=dropless",
    "routing.aux_loss_weight=0.0",
    "routing.z_loss_weight=0.001",
    "train.steps=20",
    "train.eval_every=10",
    "train.checkpoint_every=10",
)
STAGES = (1, 2)
WORLD_SIZE = 2


def _engines_rank(rank: int, world_size: int, root: str, comm: str) -> dict[str, Any]:
    """One rank of: the torch engine's run, then per ZeRO stage the DeepSpeed run and its
    resumption from step 10 (in another run directory); then what the DeepSpeed engine
    holds on this rank (`_partition_report`)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    info = ProcessInfo(rank, world_size, rank, world_size)
    base = Path(root)
    losses = {"torch": train(tiny_config(base / "torch", comm, *RUN), info).losses}
    for stage in STAGES:
        deepspeed = (comm, *RUN, "train.engine=deepspeed", f"train.zero_stage={stage}")
        losses[f"zero{stage}"] = train(tiny_config(base / f"zero{stage}", *deepspeed), info).losses
        step_10 = base / f"zero{stage}" / "checkpoints" / "step_10"
        resumed = tiny_config(base / f"zero{stage}_resumed", *deepspeed)
        losses[f"zero{stage}_resumed"] = train(resumed, info, resume_from=step_10).losses
    partitions = {stage: _partition_report(info, comm, stage) for stage in STAGES}
    return {"losses": losses, "partitions": partitions}


def _adam_moments(step_dir: Path, rank: int) -> int:
    """Elements of Adam's moments (exp_avg, exp_avg_sq) in rank `rank`'s saved state."""
    stem = step_dir / "optimizer" / f"rank_{rank:05d}"
    state = decode_state(
        json.loads(stem.with_suffix(".json").read_text()),
        safetensors.torch.load_file(str(stem.with_suffix(".safetensors"))),
    )

    def count(value: Any) -> int:
        if isinstance(value, dict):
            return sum(
                v.numel() if k in ("exp_avg", "exp_avg_sq") else count(v) for k, v in value.items()
            )
        if isinstance(value, list | tuple):
            return sum(count(v) for v in value)
        return 0

    return count(state)


@pytest.mark.parametrize("comm", ["comm=local", "comm=ep2"])
def test_zero_at_two_ranks_matches_torch_engine_and_resumes(tmp_path: Path, comm: str) -> None:
    pytest.importorskip("deepspeed")
    ranks = values_or_raise(
        run_distributed(_engines_rank, WORLD_SIZE, str(tmp_path), comm, timeout_s=480.0)
    )
    losses = ranks[0]["losses"]
    assert all(r["losses"] == losses for r in ranks)
    reference = losses["torch"]
    assert len(reference) == 20 and reference[-1] < reference[0] - 1.0
    config = tiny_config(tmp_path / "unused", *RUN)
    parameters = count_parameters(MoETransformer(config.model, config.routing)).total
    for stage in STAGES:
        np.testing.assert_allclose(losses[f"zero{stage}"], reference, rtol=1e-5, atol=1e-5)
        assert losses[f"zero{stage}_resumed"] == losses[f"zero{stage}"][10:]

        # ZeRO: every rank holds about half of the moments of the model's parameters (at
        # EP=2 half of the dense ones plus its own experts), the torch engine all of them.
        step_10 = tmp_path / f"zero{stage}" / "checkpoints" / "step_10"
        per_rank = [_adam_moments(step_10, rank) for rank in range(WORLD_SIZE)]
        assert sum(per_rank) == pytest.approx(2 * parameters, rel=1e-3)
        for moments in per_rank:
            assert moments == pytest.approx(parameters, rel=0.02)
    # The torch engine: every rank's moments of all dense parameters and of its experts.
    dense = parameters - count_parameters(MoETransformer(config.model, config.routing)).expert
    torch_moments = _adam_moments(tmp_path / "torch" / "checkpoints" / "step_10", 0)
    assert torch_moments == (2 * parameters if comm == "comm=local" else parameters + dense)
    for rank in ranks:
        _check_partitions(rank["partitions"], ep_size=1 if comm == "comm=local" else 2)


def _partition_report(info: ProcessInfo, comm: str, stage: int) -> dict[str, Any]:
    """Build the DeepSpeed engine, backpropagate one step of two micro-batches
    (train.grad_accum=2) and report what this rank holds."""
    overrides = (comm, "train.engine=deepspeed", f"train.zero_stage={stage}")
    config = tiny_config(Path("/nonexistent"), *overrides, "train.grad_accum=2")
    runtime = setup_runtime(config.comm, info)
    try:
        model = build_model(config, runtime)
        engine = build_engine(model, config.train, runtime)
        optimizer = engine.optimizer
        generator = torch.Generator().manual_seed(info.rank)
        held = []
        for micro_batch in range(2):
            tokens_BT = torch.randint(0, 256, (8, 33), generator=generator)
            task_ids_B = torch.zeros(8, dtype=torch.long)
            loss = LanguageModelling()(
                engine.module, tokens_BT[:, :-1], tokens_BT[:, 1:], task_ids_B
            ).loss
            engine.engine.backward(loss)  # the second one reduces (step boundary)
            held.append(sum(p.grad.numel() for p in model.parameters() if p.grad is not None))
            if micro_batch == 0:
                engine.engine.step()  # no update yet: counts the micro-batch
        expert_ids = expert_parameter_ids(model)
        return {
            "local_params": sum(p.numel() for p in model.parameters()),
            "expert_params": sum(p.numel() for p in model.parameters() if id(p) in expert_ids),
            "groups": [
                (group["name"], bool(group.get("moe")))
                for group in optimizer.optimizer.param_groups
            ],
            "partition_count": list(optimizer.partition_count),
            "fp32_partition": [g.numel() for g in optimizer.single_partition_of_fp32_groups],
            "grad_partition": [
                sum(g.numel() for g in grads) for grads in optimizer.averaged_gradients.values()
            ],
            "full_grads_held": held,
            "expert_tags": sorted(
                {
                    (getattr(p, "allreduce", None), getattr(p, "group_name", None))
                    for p in model.parameters()
                    if id(p) in expert_ids
                }
            ),
        }
    finally:
        teardown_runtime(runtime)


def _check_partitions(partitions: dict[int, dict[str, Any]], ep_size: int) -> None:
    """One rank's `_partition_report`s: its experts are DeepSpeed MoE parameters of group
    `ep_size_<EP>`, alone in a `moe` optimizer group partitioned over the ranks that hold
    the same experts (WORLD_SIZE / EP of them); the dense groups over both ranks."""
    replicas = WORLD_SIZE // ep_size
    for stage in STAGES:
        got = partitions[stage]
        local, experts = got["local_params"], got["expert_params"]
        dense = local - experts
        name = f"ep_size_{ep_size}"
        assert got["expert_tags"] == [(False, name)]
        assert got["groups"] == [("dense", False), ("dense_no_decay", False), (name, True)]
        assert got["partition_count"] == [WORLD_SIZE, WORLD_SIZE, replicas]
        for partition in (got["fp32_partition"], got["grad_partition"]):
            assert partition[2] == pytest.approx(experts / replicas, abs=8)
            assert sum(partition[:2]) == pytest.approx(dense / WORLD_SIZE, abs=8)
        # Stage 2 moves gradients out of the parameters as backward produces them (to be
        # reduced into each rank's partition); stage 1 keeps full gradients until the
        # step's last micro-batch.
        assert got["full_grads_held"] == ([local, 0] if stage == 1 else [0, 0])


def _bf16_rank(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """The torch engine and DeepSpeed ZeRO-1 in bf16 (`train.precision=bf16` becomes
    DeepSpeed's torch_autocast section), and the DeepSpeed run resumed from step 10."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    info = ProcessInfo(rank, world_size, rank, world_size)
    base = Path(root)
    bf16 = ("comm=ep2", *RUN, "train.precision=bf16")
    deepspeed = (*bf16, "train.engine=deepspeed", "train.zero_stage=1")
    losses = {
        "torch": train(tiny_config(base / "torch", *bf16), info).losses,
        "zero1": train(tiny_config(base / "zero1", *deepspeed), info).losses,
    }
    step_10 = base / "zero1" / "checkpoints" / "step_10"
    resumed = tiny_config(base / "zero1_resumed", *deepspeed)
    losses["zero1_resumed"] = train(resumed, info, resume_from=step_10).losses
    return {"losses": losses}


def test_zero_in_bf16_matches_the_torch_engine_and_resumes(tmp_path: Path) -> None:
    """DeepSpeed from the same `train.precision=bf16`: its losses are the torch engine's
    bf16 losses (same autocast, fp32 masters, fp32 gradient reduction: the first step's
    loss is equal; after it the fp32 reductions' different order flips a bf16 rounding
    now and then: 4e-5 apart at step 7 at worst of the first 8, 5e-4 over 20 steps,
    measured), resumption is exact, and the checkpoint's model files hold the fp32
    masters."""
    pytest.importorskip("deepspeed")
    ranks = values_or_raise(run_distributed(_bf16_rank, WORLD_SIZE, str(tmp_path), timeout_s=480.0))
    losses = ranks[0]["losses"]
    reference = losses["torch"]
    assert len(reference) == 20 and reference[-1] < reference[0] - 1.0
    assert losses["zero1"][0] == reference[0]
    np.testing.assert_allclose(losses["zero1"][:8], reference[:8], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(losses["zero1"], reference, rtol=2e-3, atol=2e-3)
    assert losses["zero1_resumed"] == losses["zero1"][10:]
    step_10 = tmp_path / "zero1" / "checkpoints" / "step_10"
    meta = json.loads((step_10 / "meta.json").read_text())
    assert meta["config"]["train"]["precision"] == "bf16"
    dense = safetensors.torch.load_file(str(step_10 / "dense.safetensors"))
    assert {t.dtype for t in dense.values()} == {torch.float32}


def test_deepspeed_config_takes_the_run_precision() -> None:
    from launch.config import TrainConfig
    from launch.training.deepspeed import deepspeed_config
    from moe.precision import ComputePrecision, ResolvedPrecision

    config = TrainConfig(batch_size=8)
    assert "torch_autocast" not in deepspeed_config(config, 2)
    for precision, dtype in (
        (ComputePrecision.BF16, "bfloat16"),
        (ComputePrecision.FP16, "float16"),
    ):
        resolved = ResolvedPrecision(precision, precision, "test")
        section = deepspeed_config(config, 2, resolved)["torch_autocast"]
        assert section == {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}
