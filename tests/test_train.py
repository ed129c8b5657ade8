"""Single-process training: the loss falls, resuming is exact, and bad input fails clearly
(missing or corrupt checkpoint, a data folder without text) without leaving a partial
checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from launch.config import RunConfig, register_configs, to_run_config
from launch.runtime import ProcessInfo, process_info_from_env
from launch.training.loop import train
from launch.training.optim import learning_rate
from moe.checkpoint import LATEST_FILE

CONF = Path(__file__).resolve().parents[1] / "conf"


def tiny_config(run_dir: Path, *overrides: str) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "experiment=tiny",
                f"run_dir={run_dir}",
                "wandb.mode=disabled",
                "train.progress=false",
                *overrides,
            ],
        )
    return to_run_config(cfg)


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    config = tiny_config(Path("/tmp/unused")).train
    lrs = [learning_rate(step, config) for step in range(config.steps)]
    assert lrs[0] == pytest.approx(config.lr / config.warmup_steps)
    assert lrs[config.warmup_steps - 1] == pytest.approx(config.lr)
    assert all(a >= b for a, b in zip(lrs[config.warmup_steps :], lrs[config.warmup_steps + 1 :]))
    assert learning_rate(config.steps, config) == pytest.approx(config.min_lr)


def test_tiny_model_trains_and_writes_its_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = train(tiny_config(run_dir, "wandb.mode=offline", "train.sample_tokens=8"))
    assert result.final_step == 60 and len(result.losses) == 60
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60]
    for record in records:
        assert {"step", "train_loss", "val_loss", "val_bpb", "tokens_per_s"} <= set(record)
        assert record["val_bpb"] == pytest.approx(record["val_loss"] / math.log(2))
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert (run_dir / LATEST_FILE).exists() is False
    assert (run_dir / "checkpoints" / LATEST_FILE).read_text().strip() == "step_60"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_30",
        "step_60",
    ]
    assert (run_dir / "plots" / "expert_load.png").stat().st_size > 0
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert result.sample  # 8 sampled bytes, as text


@pytest.mark.parametrize(
    "routing",
    [
        (),
        # DynaMoE: the controllers (and the assignment cache) are part of the checkpoint;
        # rebuilds every 2 steps, so the capacities at step 8 are not the initial ones.
        ("routing=dynamic", "routing.dynamic_rebuild_interval=2", "routing.dynamic_window=4"),
        # Mixed precision: autocast over fp32 masters; the checkpoint holds the masters.
        ("train.precision=bf16",),
    ],
    ids=["topk", "dynamic", "bf16"],
)
def test_resume_continues_exactly(tmp_path: Path, routing: tuple[str, ...]) -> None:
    overrides = ("train.steps=16", "train.checkpoint_every=8", "train.eval_every=8", *routing)
    full = train(tiny_config(tmp_path / "full", *overrides))
    # An interrupted run: only the step-8 checkpoint made it to disk.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_8", resumed_dir / "step_8")
    (resumed_dir / LATEST_FILE).write_text("step_8\n")
    resumed = train(tiny_config(tmp_path / "resumed", *overrides))
    assert resumed.start_step == 8
    assert resumed.losses == full.losses[8:]  # bit for bit
    assert resumed.evaluations[-1] == full.evaluations[-1] | {
        "tokens_per_s": resumed.evaluations[-1]["tokens_per_s"]
    }
    # Started again after the end, a run trains nothing and reports the final model.
    again = train(tiny_config(tmp_path / "full", *overrides))
    assert again.start_step == 16 and again.losses == []
    assert again.evaluations[-1]["val_loss"] == full.evaluations[-1]["val_loss"]


def test_resume_must_without_checkpoint_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train\.resume=must but there is no checkpoint"):
        train(tiny_config(tmp_path, "train.resume=must"))


def test_corrupt_checkpoint_is_named_and_not_overwritten(tmp_path: Path) -> None:
    overrides = (
        "train.steps=4",
        "train.warmup_steps=1",
        "train.checkpoint_every=2",
        "train.eval_every=4",
    )
    train(tiny_config(tmp_path, *overrides))
    dense = tmp_path / "checkpoints" / "step_4" / "dense.safetensors"
    data = bytearray(dense.read_bytes())
    data[-1] ^= 0xFF
    dense.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"dense\.safetensors"):
        train(tiny_config(tmp_path, *overrides, "train.steps=6"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        LATEST_FILE,
        "step_2",
        "step_4",
    ]


def test_missing_checkpoint_file_is_named(tmp_path: Path) -> None:
    overrides = (
        "train.steps=2",
        "train.warmup_steps=1",
        "train.checkpoint_every=2",
        "train.eval_every=2",
    )
    train(tiny_config(tmp_path, *overrides))
    expert_file = next((tmp_path / "checkpoints" / "step_2" / "experts").iterdir())
    expert_file.unlink()
    with pytest.raises(ValueError, match=expert_file.name):
        train(tiny_config(tmp_path, *overrides, "train.steps=4"))


def test_dangling_latest_pointer_fails(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / LATEST_FILE).write_text("step_7\n")
    with pytest.raises(ValueError, match="step_7"):
        train(tiny_config(tmp_path))


def test_resume_with_another_model_is_refused(tmp_path: Path) -> None:
    overrides = (
        "train.steps=2",
        "train.warmup_steps=1",
        "train.checkpoint_every=2",
        "train.eval_every=2",
    )
    train(tiny_config(tmp_path, *overrides))
    with pytest.raises(ValueError, match="model="):
        train(tiny_config(tmp_path, *overrides, "train.steps=4", "model.n_kv_heads=1"))


def test_resume_never_refuses_existing_checkpoints(tmp_path: Path) -> None:
    overrides = (
        "train.steps=2",
        "train.warmup_steps=1",
        "train.checkpoint_every=2",
        "train.eval_every=2",
    )
    train(tiny_config(tmp_path, *overrides))
    with pytest.raises(ValueError, match=r"train\.resume=never"):
        train(tiny_config(tmp_path, *overrides, "train.resume=never"))


def test_data_folder_without_text_fails_before_any_checkpoint(tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    (texts / "task_a").mkdir(parents=True)
    (texts / "task_a" / "empty.txt").write_text("")
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=str(texts.name)):
        train(tiny_config(run_dir, "data=folder", f"data.path={texts}"))
    assert not (run_dir / "checkpoints").exists()


def test_seq_len_longer_than_the_model_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.seq_len=128 exceeds model.max_seq_len=64"):
        train(tiny_config(tmp_path, "data.seq_len=128"))


def test_process_info_reads_torchrun_variables() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert process_info_from_env(env) == ProcessInfo(3, 4, 1, 2)
    assert process_info_from_env({}) == ProcessInfo(0, 1, 0, 1)
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        process_info_from_env({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="rank=4 is outside"):
        process_info_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_step_losses_average_micro_batches_and_keep_every_step() -> None:
    """Each flushed step is the mean of its micro-batches, every step since the last
    flush comes back in order, and the loss terms may not change within a run."""
    import torch

    from launch.training.step_log import StepLosses

    ledger = StepLosses(world_size=1, all_reduce=None)
    assert ledger.flush() == []
    for step in range(3):
        for micro in range(2):
            value = torch.tensor(float(10 * step + micro))
            ledger.add({"loss": value, "ce": 2 * value}, 0.5)
        ledger.end_step()
    assert ledger.flush() == [
        {"loss": 10 * s + 0.5, "ce": 20 * s + 1.0} for s in range(3)
    ]  # fmt: skip
    assert ledger.flush() == []
    with pytest.raises(ValueError, match="loss terms changed"):
        ledger.add({"loss": torch.tensor(1.0)}, 1.0)
