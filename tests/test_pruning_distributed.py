"""Pruning under expert parallelism (spawned gloo ranks): gradual magnitude pruning at
EP=2 prunes what EP=1 prunes, its checkpoint holds every expert's mask (gathered over
the ranks by global expert id), a resumed EP=2 run continues exactly, and a run at EP=1
starts from the EP=2 checkpoint with its masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_utils import run_distributed, values_or_raise
from test_train import tiny_config

from launch.runtime import ProcessInfo
from launch.training.loop import train
from moe.checkpoint import LATEST_FILE, load_checkpoint
from moe.pruning import PruneScope, prunable_weights
from moe.transformer import MoETransformer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RUN = (
    "routing=dropless", "routing.aux_loss_weight=0.0", "train.steps=8", "train.eval_every=4",
    "train.checkpoint_every=4", "prune.method=gradual", "prune.sparsity=0.5", "prune.start=0",
    "prune.end=4", "prune.every=2", "prune.scope=all",
)  # fmt: skip


def _rank(rank: int, world_size: int, run_dir: str) -> dict:
    config = tiny_config(Path(run_dir), "comm=ep2", *RUN)
    info = ProcessInfo(rank=rank, world_size=world_size, local_rank=rank, local_world_size=2)
    result = train(config, info)
    return {"losses": result.losses}


def _masks(checkpoint: Path) -> dict[str, dict]:
    config = tiny_config(Path("/tmp/unused"), *RUN)
    model = MoETransformer(config.model, config.routing, seed=3)
    return load_checkpoint(checkpoint, model).extra["pruning"]["masks"]


def test_ep2_gradual_pruning_equals_ep1_gathers_and_resumes(tmp_path: Path) -> None:
    ep1 = train(tiny_config(tmp_path / "ep1", *RUN))
    ep2 = values_or_raise(run_distributed(_rank, 2, str(tmp_path / "ep2"), timeout_s=240.0))
    np.testing.assert_allclose(ep2[0]["losses"], ep1.losses, rtol=2e-5, atol=2e-5)
    masks_ep1 = _masks(tmp_path / "ep1/checkpoints/step_8")
    masks_ep2 = _masks(tmp_path / "ep2/checkpoints/step_8")
    assert sorted(masks_ep2) == sorted(masks_ep1)
    for name, entry in masks_ep2.items():
        if "experts" in name:
            assert entry["expert_ids"] == [0, 1, 2, 3]  # both ranks' experts, gathered
        assert torch.equal(entry["value"], masks_ep1[name]["value"]), name

    # Resumed at EP=2 from step 4: the same losses as the uninterrupted EP=2 run.
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "ep2/checkpoints/step_4", resumed / "step_4")
    (resumed / LATEST_FILE).write_text("step_4\n")
    again = values_or_raise(run_distributed(_rank, 2, str(tmp_path / "resumed"), timeout_s=240.0))
    assert again[0]["losses"] == ep2[0]["losses"][4:]

    # A run at EP=1 starting from the EP=2 checkpoint keeps its (gathered) masks.
    overrides = (
        "train.steps=2",
        "train.warmup_steps=1",
        "train.eval_every=2",
        f"train.init_from={tmp_path / 'ep2'}",
    )
    start = train(tiny_config(tmp_path / "ep1_from_ep2", *RUN[:2], *overrides))
    assert start.model is not None
    for weight in prunable_weights(start.model, PruneScope.ALL):
        pruned = ~masks_ep2[weight.name]["value"]
        assert bool((weight.param[pruned] == 0).all()), weight.name
