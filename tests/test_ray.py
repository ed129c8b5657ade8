"""Ray Train: two workers train the tiny model; one worker is killed mid-run, Ray replaces
the worker group and the run resumes from its last checkpoint and finishes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import tiny_config

from launch.trainer import EVENTS_FILE, FAIL_MARKER

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.distributed]


def test_ray_run_survives_a_killed_worker(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from launch.ray_train import run_ray

    config = tiny_config(
        tmp_path,
        "comm=ep2",
        "train.steps=8",
        "train.warmup_steps=1",
        "train.checkpoint_every=3",
        "train.eval_every=4",
        "train.fail_at_step=5",
        "ray.max_failures=1",
    )
    try:
        result = run_ray(config)
    finally:
        ray.shutdown()
    assert result.error is None
    assert result.metrics["step"] == 8
    assert (tmp_path / FAIL_MARKER).read_text().startswith("rank 1 failed at step 5")
    events = [json.loads(line) for line in (tmp_path / EVENTS_FILE).read_text().splitlines()]
    assert [e["step"] for e in events] == [0, 3]
    assert events[0]["resumed_from"] is None and events[1]["resumed_from"] is not None
    assert all(e["world_size"] == 2 and e["ep_size"] == 2 for e in events)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Step 4 was evaluated before the failure and again after resuming from step 3:
    # the same numbers, since resuming is exact.
    assert [r["step"] for r in records] == [4, 4, 8]
    for key in ("train_loss", "val_loss", "val_bpb"):
        assert records[0][key] == records[1][key]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_8"
    assert result.checkpoint is not None
