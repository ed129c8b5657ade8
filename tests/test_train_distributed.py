"""Expert-parallel training on spawned gloo ranks: EP=2 computes what EP=1 computes
(dropless routing, 20 steps), and its checkpoint loads at EP=1 with the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_utils import run_distributed, values_or_raise
from test_train import tiny_config

from launch.runtime import ProcessInfo
from launch.training.loop import train
from moe.checkpoint import load_checkpoint, resolve_latest
from moe.transformer import MoETransformer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Dropless routing and no load-balancing loss: that loss is a product of per-batch means,
# so it differs when each rank computes it on its half of the batch.
EQUAL_RUN = (
    "routing=dropless",
    "routing.aux_loss_weight=0.0",
    "routing.z_loss_weight=0.001",
    "train.steps=20",
    "train.eval_every=10",
    "train.checkpoint_every=10",
)


def _probe_tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, 256, (2, 24), generator=generator)


def _ep_rank(rank: int, world_size: int, run_dir: str, overrides: tuple[str, ...]) -> dict:
    config = tiny_config(Path(run_dir), *overrides)
    info = ProcessInfo(rank=rank, world_size=world_size, local_rank=rank, local_world_size=2)
    result = train(config, info)
    assert result.model is not None
    result.model.eval()
    with torch.no_grad():
        logits = result.model(_probe_tokens()).logits_BTV
    return {"losses": result.losses, "evals": result.evaluations, "logits": logits.numpy()}


def test_ep2_training_equals_ep1_and_reshards(tmp_path: Path) -> None:
    ep1 = train(tiny_config(tmp_path / "ep1", *EQUAL_RUN))
    ranks = values_or_raise(
        run_distributed(
            _ep_rank, 2, str(tmp_path / "ep2"), ("comm=ep2", *EQUAL_RUN), timeout_s=240.0
        )
    )
    assert ranks[0]["losses"] == ranks[1]["losses"]
    np.testing.assert_allclose(ranks[0]["losses"], ep1.losses, rtol=2e-5, atol=2e-5)
    for got, want in zip(ranks[0]["evals"], ep1.evaluations):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=2e-5, abs=2e-5)
    assert ep1.losses[-1] < ep1.losses[0]

    # The EP=2 checkpoint, loaded at EP=1, computes what the EP=2 model computed.
    ep2_logits = ranks[0]["logits"]
    np.testing.assert_array_equal(ep2_logits, ranks[1]["logits"])
    config = tiny_config(tmp_path / "unused", *EQUAL_RUN)
    resharded = MoETransformer(config.model, config.routing, seed=99)
    checkpoint = resolve_latest(tmp_path / "ep2" / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step_20"
    load_checkpoint(checkpoint, resharded)
    resharded.eval()
    with torch.no_grad():
        logits = resharded(_probe_tokens()).logits_BTV.numpy()
    np.testing.assert_allclose(logits, ep2_logits, rtol=1e-5, atol=1e-5)
    assert ep1.model is not None
    ep1.model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(
            ep1.model(_probe_tokens()).logits_BTV.numpy(), ep2_logits, rtol=1e-3, atol=1e-3
        )
