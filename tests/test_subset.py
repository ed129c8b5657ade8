"""Task expert subsets (`moe.inference.subset`, `launch.subset`, `scripts/subset_report.py`):
exactness against the full model, standalone loading, the global -> local id mapping,
the coverage rule on hand-computed cases, and the errors for bad requests."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.config import RunConfig, TrainConfig
from launch.training.checkpointing import config_dict
from moe.checkpoint import read_meta, save_checkpoint
from moe.config import ModelConfig
from moe.data import DataConfig, build_corpus
from moe.inference import load_model
from moe.inference.subset import write_subset
from moe.inference.task_usage import (
    experts_for_coverage,
    measure_task_usage,
    task_experts_task_routing,
    task_training_windows,
)
from moe.transformer import MoETransformer
from routing import RoutingConfig

REPO = Path(__file__).resolve().parents[1]
NUM_TASKS = 3  # tasks of the synthetic data


def tiny_run_config(router: str, num_experts: int) -> RunConfig:
    model = ModelConfig(
        d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32, ffn_hidden=64,
        expert_hidden=16, num_experts=num_experts, moe_every=1,
    )  # fmt: skip
    routing = RoutingConfig(
        router=router, top_k=2, capacity="fixed", capacity_factor=1.0,
        num_tasks=4 if router == "task" else 0,
    )  # fmt: skip
    data = DataConfig(
        source="synthetic", seq_len=16, synthetic_num_tasks=NUM_TASKS,
        synthetic_train_bytes_per_task=2048, synthetic_val_bytes_per_task=512,
        synthetic_alphabet_size=16, synthetic_branching=3,
    )  # fmt: skip
    train = TrainConfig(steps=10, warmup_steps=1, seed=3)
    return RunConfig(model=model, routing=routing, data=data, train=train)


def save_full(directory: Path, router: str, num_experts: int = 8) -> Path:
    """An untrained model of `router` saved as a whole checkpoint (step 7); returns its
    checkpoints directory."""
    config = tiny_run_config(router, num_experts)
    model = MoETransformer(config.model, config.routing, seed=config.train.seed)
    save_checkpoint(directory, model, None, 7, config_dict(config), extra={"sampler": {}})
    return directory


def logits(model: MoETransformer, tokens_BT: torch.Tensor, task: int) -> torch.Tensor:
    """Dropless logits [B, T, V] of `tokens_BT` with task id `task` (eval, no grad)."""
    with torch.no_grad(), model.capacity_override("dropless"):
        task_ids_B = torch.full((tokens_BT.shape[0],), task, dtype=torch.int64)
        return model(tokens_BT, task_ids_B).logits_BTV


def task_windows(task: int, count: int = 8) -> torch.Tensor:
    corpus = build_corpus(tiny_run_config("topk", 8).data)
    return task_training_windows(corpus, task, 16, max_windows=count, seed=1)


@pytest.fixture(scope="module")
def task_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_full(tmp_path_factory.mktemp("task") / "checkpoints", "task")


@pytest.fixture(scope="module")
def token_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_full(tmp_path_factory.mktemp("token") / "checkpoints", "topk", num_experts=16)


# --- the coverage rule ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "coverage", "top_k", "expected"),
    [
        ([5, 0, 3, 2], 0.5, 1, [0]),  # 5 of 10 reaches half
        ([5, 0, 3, 2], 0.6, 1, [0, 2]),  # 5 < 6 <= 8
        ([5, 0, 3, 2], 0.8, 1, [0, 2]),  # exactly 8 of 10
        ([5, 0, 3, 2], 0.81, 1, [0, 2, 3]),
        ([5, 0, 3, 2], 1.0, 1, [0, 2, 3]),  # every used expert, never the unused one
        ([5, 0, 3, 2], 0.5, 2, [0, 2]),  # topped up to K by count
        ([1, 3, 3], 0.4, 1, [1]),  # ties: the lower id first
        ([1, 3, 3], 0.5, 1, [1, 2]),
        ([4, 0, 0, 0, 1], 1.0, 4, [0, 1, 2, 4]),  # topped up with unused experts by id
        ([0, 7, 0], 0.01, 2, [0, 1]),
        ([1] * 100, 0.07, 1, list(range(7))),  # 0.07 * 100 rounds above 7 in floats
    ],
)
def test_experts_for_coverage_hand_cases(
    counts: list[int], coverage: float, top_k: int, expected: list[int]
) -> None:
    assert experts_for_coverage(torch.tensor(counts), coverage, top_k) == expected


def test_experts_for_coverage_rejects_bad_input() -> None:
    counts = torch.tensor([3, 1, 0])
    for coverage in (0, 0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=re.escape(f"coverage={coverage}")):
            experts_for_coverage(counts, coverage, 1)
    with pytest.raises(ValueError, match="top_k=4"):
        experts_for_coverage(counts, 0.9, 4)
    with pytest.raises(ValueError, match="sums to 0"):
        experts_for_coverage(torch.zeros(3, dtype=torch.int64), 0.9, 1)


# --- task routing ----------------------------------------------------------------------


def test_task_subset_equals_the_full_model_and_loads_without_it(
    task_checkpoint: Path, tmp_path: Path
) -> None:
    full_dir = shutil.copytree(task_checkpoint, tmp_path / "full")
    full = load_model(full_dir).model
    task = 1
    tokens_BT = task_windows(task)
    expected = logits(full, tokens_BT, task)
    chosen = task_experts_task_routing(full, task)

    result = write_subset(full_dir, task, tmp_path / "subset", coverage=0.9)
    assert result.routing == "task" and result.coverage == 1.0
    assert result.experts == chosen
    assert result.directory == tmp_path / "subset" / "step_7"
    shutil.rmtree(full_dir)

    loaded = load_model(tmp_path / "subset")
    assert loaded.step == 7 and loaded.task_ids == [task]
    assert loaded.subset is not None and loaded.subset["source"].endswith("step_7")
    for block, layer in loaded.model.moe_layers():
        assert layer.num_experts == 8  # the router still chooses among the global ids
        assert layer.experts.num_experts == 2 < 8  # but the layer holds only the task's K
        assert list(layer.experts.expert_ids) == chosen[block]
    torch.testing.assert_close(logits(loaded.model, tokens_BT, task), expected)


def test_task_subset_maps_global_ids_to_local_experts(
    task_checkpoint: Path, tmp_path: Path
) -> None:
    full = load_model(task_checkpoint).model
    result = write_subset(task_checkpoint, "2", tmp_path / "subset")
    meta = read_meta(result.directory)
    subset = load_model(result.directory).model
    full_layers, subset_layers = dict(full.moe_layers()), dict(subset.moe_layers())
    for layer_meta in meta["moe_layers"]:
        block = int(layer_meta["module"].split(".")[1])
        ids = result.experts[block]
        assert layer_meta["expert_ids"] == ids and layer_meta["num_experts"] == 8
        experts = subset_layers[block].experts
        assert subset_layers[block].dispatcher.expert_ids == tuple(ids)
        for local, global_id in enumerate(ids):  # local expert j is global expert ids[j]
            torch.testing.assert_close(
                experts.w1_EDH[local], full_layers[block].experts.w1_EDH[global_id]
            )
    assert sum(1 for _ in result.directory.glob("experts/*")) == 2 * 2  # K per layer
    assert result.checkpoint_bytes < sum(
        f.stat().st_size for f in (task_checkpoint / "step_7").rglob("*") if f.is_file()
    )


# --- token routing ---------------------------------------------------------------------


def test_token_subset_at_full_coverage_equals_the_full_model_on_measured_data(
    token_checkpoint: Path, tmp_path: Path
) -> None:
    full = load_model(token_checkpoint).model
    tokens_BT = task_windows(0, count=2)[:, :3]  # 6 tokens x K=2: at most 12 of 16 experts
    usage = measure_task_usage(full, tokens_BT, 0)
    for counts_E in usage.values():
        assert int(counts_E.sum()) == tokens_BT.numel() * 2

    result = write_subset(token_checkpoint, 0, tmp_path / "subset", coverage=1.0, data=tokens_BT)
    assert result.routing == "token" and result.measured_windows == 2
    for block, counts_E in usage.items():
        assert result.experts[block] == torch.nonzero(counts_E).flatten().tolist()
    assert any(len(ids) < 16 for ids in result.experts.values())
    subset = load_model(result.directory).model
    torch.testing.assert_close(logits(subset, tokens_BT, 0), logits(full, tokens_BT, 0))


def test_token_subset_from_the_checkpoints_data_config(
    token_checkpoint: Path, tmp_path: Path
) -> None:
    result = write_subset(token_checkpoint, "markov_2", tmp_path / "subset", 0.5, max_windows=4)
    assert result.task == 2 and result.measured_windows == 4
    for ids in result.experts.values():
        assert 2 <= len(ids) < 16 and ids == sorted(ids)
    loaded = load_model(tmp_path / "subset")
    assert loaded.subset is not None
    assert loaded.subset["coverage"] == 0.5 and loaded.subset["task"] == 2
    assert loaded.subset["experts"] == result.experts
    # Restricted routers never pick a missing expert, on any input (the dispatcher would
    # raise): run data of another task through it.
    with torch.no_grad():
        out = loaded.model(task_windows(0), torch.zeros(8, dtype=torch.int64))
    assert torch.isfinite(out.logits_BTV).all()
    # The same request measures the same windows: the same experts.
    again = write_subset(token_checkpoint, 2, tmp_path / "again", 0.5, max_windows=4)
    assert again.experts == result.experts


# --- bad requests ----------------------------------------------------------------------


def test_bad_requests_name_the_value(
    task_checkpoint: Path, token_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="task=4 is not a task of this model"):
        write_subset(task_checkpoint, 4, out)
    with pytest.raises(ValueError, match="task='exodus'"):
        write_subset(task_checkpoint, "exodus", out)
    with pytest.raises(ValueError, match="task=9 is not a task of the data"):
        write_subset(token_checkpoint, 9, out)
    for coverage in (0, 1.5):
        with pytest.raises(ValueError, match=re.escape(f"coverage={coverage}")):
            write_subset(token_checkpoint, 0, out, coverage=coverage)
    with pytest.raises(ValueError, match="quantize='int4'"):
        write_subset(token_checkpoint, 0, out, quantize="int4")
    with pytest.raises(ValueError, match="full checkpoint's own directory"):
        write_subset(token_checkpoint, 0, token_checkpoint)
    subset = write_subset(task_checkpoint, 0, tmp_path / "subset").directory
    with pytest.raises(ValueError, match="already is a task subset"):
        write_subset(subset, 0, tmp_path / "again")
    with pytest.raises(ValueError, match="already holds a whole checkpoint"):
        write_subset(task_checkpoint, 0, token_checkpoint)
    assert not out.exists()


@pytest.mark.slow
def test_int8_subset_stores_int8_experts(task_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("moe.inference.quant")
    fp32 = write_subset(task_checkpoint, 1, tmp_path / "fp32")
    int8 = write_subset(task_checkpoint, 1, tmp_path / "int8", quantize="int8")
    assert {layer["quantization"] for layer in read_meta(int8.directory)["moe_layers"]} == {"int8"}
    assert int8.checkpoint_bytes < fp32.checkpoint_bytes
    model = load_model(int8.directory).model
    assert all(layer.experts.quantization == "int8" for _, layer in model.moe_layers())
    tokens_BT = task_windows(1)
    reference = logits(load_model(fp32.directory).model, tokens_BT, 1)
    torch.testing.assert_close(logits(model, tokens_BT, 1), reference, atol=0.05, rtol=0.05)


# --- the entry point and the report -----------------------------------------------------


def test_launch_subset_composes_and_writes(task_checkpoint: Path, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from launch.subset import run_subset, to_subset_config

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose(
            "subset", [f"checkpoint={task_checkpoint}", "task=1", f"out={tmp_path / 'q'}"]
        )
    config = to_subset_config(cfg)
    assert config.coverage == 0.99 and config.task == "1"
    result = run_subset(config)
    assert (tmp_path / "q" / "latest").is_file() and result.task == 1
    with pytest.raises(ValueError, match=r"coverage=1\.5"):
        to_subset_config({**dict(cfg), "coverage": 1.5})


@pytest.mark.slow
def test_subset_report_runs_on_tiny_checkpoints(
    task_checkpoint: Path, token_checkpoint: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    command = [
        sys.executable, str(REPO / "scripts" / "subset_report.py"),
        "--checkpoint-task", str(task_checkpoint), "--checkpoint-token", str(token_checkpoint),
        "--tasks", "0", "--coverages", "1.0", "0.5", "--max-windows", "4",
        "--eval-windows", "4", "--json", str(report), "--markdown", "--no-rss",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "| task |" in done.stdout
    rows = json.loads(report.read_text())["rows"]
    assert [(row["routing"], row["coverage"]) for row in rows] == [
        ("task", 1.0), ("token", 1.0), ("token", 0.5),
    ]  # fmt: skip
    for row in rows:
        assert row["task"] == 0 and row["checkpoint_bytes"] < row["full_checkpoint_bytes"]
        assert row["param_bytes"] < row["full_param_bytes"]
        assert row["val_bpb"] > 0 and row["full_val_bpb"] > 0
        assert row["rss_bytes"] is None
    assert rows[0]["experts_per_layer"] == {"0": 2, "1": 2}


def test_subset_report_measures_resident_memory(task_checkpoint: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "subset_report", REPO / "scripts/subset_report.py"
    )
    assert spec is not None and spec.loader is not None
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    subset = write_subset(task_checkpoint, 0, tmp_path / "subset").directory
    full_model, subset_model = load_model(task_checkpoint).model, load_model(subset).model
    assert report.model_bytes(subset_model) < report.model_bytes(full_model)
    rss = report.measure_rss_here(str(subset))
    if rss["rss_bytes"] is not None:  # Linux: /proc/self/status
        assert rss["rss_bytes"] > 0 and rss["rss_model_bytes"] is not None
