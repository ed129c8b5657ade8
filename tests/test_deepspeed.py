"""The optional DeepSpeed engine on CPU (DS_ACCELERATOR=cpu, gloo): ZeRO stage 1 and 2
train the tiny model to the same losses as the torch engine, and resume exactly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from distributed_utils import run_distributed, values_or_raise
from test_train import tiny_config

from launch.runtime import ProcessInfo
from launch.trainer import train
from moe.checkpoint import LATEST_FILE

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RUN = ("train.steps=6", "train.warmup_steps=2", "train.eval_every=3", "train.checkpoint_every=3")


def _deepspeed_run(rank: int, world_size: int, run_dir: str, overrides: tuple[str, ...]) -> list:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    info = ProcessInfo(rank, world_size, rank, world_size)
    return train(tiny_config(Path(run_dir), *overrides), info).losses


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_matches_torch_engine_and_resumes(tmp_path: Path, stage: int) -> None:
    pytest.importorskip("deepspeed")
    reference = train(tiny_config(tmp_path / "torch", *RUN)).losses
    overrides = (*RUN, "train.engine=deepspeed", f"train.zero_stage={stage}")
    (losses,) = values_or_raise(
        run_distributed(_deepspeed_run, 1, str(tmp_path / "ds"), overrides, timeout_s=180.0)
    )
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]

    # Resume the DeepSpeed run from its step-3 checkpoint: the same last three losses.
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "ds" / "checkpoints" / "step_3", resumed / "step_3")
    (resumed / LATEST_FILE).write_text("step_3\n")
    (tail,) = values_or_raise(
        run_distributed(_deepspeed_run, 1, str(tmp_path / "resumed"), overrides, timeout_s=180.0)
    )
    assert tail == losses[3:]


def test_deepspeed_refuses_expert_parallelism(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    results = run_distributed(
        _deepspeed_run, 2, str(tmp_path), ("comm=ep2", *RUN, "train.engine=deepspeed")
    )
    assert all(r.error is not None and "comm.ep_size=1" in r.error for r in results)
