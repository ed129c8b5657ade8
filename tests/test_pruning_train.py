"""Pruning with the training loop and checkpoints: pruned weights stay exactly zero
through training steps and resumption (gradual magnitude pruning, SR-STE, a pruned
checkpoint fine-tuned), resumption is exact, a pruned checkpoint is an ordinary one
(generate, subset, int8, distillation of a pruned MoE student from its unpruned self),
and `launch.prune` reports and refuses bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_distill import distill_config
from test_train import tiny_config

from launch.prune import register_prune_config, to_prune_config
from launch.training.checkpointing import InitialWeights
from launch.training.distillation import distill
from launch.training.loop import train
from moe.checkpoint import LATEST_FILE, load_checkpoint, read_meta, resolve_latest
from moe.inference import generate, load_model
from moe.inference.quant import Int8Experts
from moe.inference.subset import write_subset
from moe.pruning import NMPattern, PruneConfig, PruneScope, prunable_weights, write_pruned
from moe.pruning.masks import satisfies_nm
from moe.transformer import MoETransformer

ROOT = Path(__file__).resolve().parents[1]
TWO_FOUR = NMPattern(2, 4)
SHORT = ("train.eval_every=6", "train.checkpoint_every=6")


def _zeros(model: torch.nn.Module, scope: str = "all") -> dict[str, torch.Tensor]:
    return {w.name: (w.param == 0) for w in prunable_weights(model, PruneScope(scope))}


def _model_at(checkpoint: Path, run_dir: Path, *overrides: str) -> MoETransformer:
    config = tiny_config(run_dir, *overrides)
    model = MoETransformer(config.model, config.routing, seed=7)
    load_checkpoint(checkpoint, model)
    return model


def _resume_from(full_dir: Path, resumed_dir: Path, step: int) -> None:
    """A run interrupted after step `step`: only that checkpoint made it to disk."""
    checkpoints = resumed_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(full_dir / "checkpoints" / f"step_{step}", checkpoints / f"step_{step}")
    (checkpoints / LATEST_FILE).write_text(f"step_{step}\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MoE trained for 20 steps: a run directory."""
    run_dir = tmp_path_factory.mktemp("dense_run")
    train(tiny_config(run_dir, "train.steps=20", "train.eval_every=20"))
    return run_dir


@pytest.fixture(scope="module")
def pruned_24(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`trained` with its experts 2:4 after the channel permutation: a checkpoints dir."""
    out = tmp_path_factory.mktemp("pruned") / "checkpoints"
    config = PruneConfig(method="magnitude", pattern="2:4", permute=True, permute_escapes=3)
    write_pruned(trained, out, config)
    return out


def test_gradual_pruning_keeps_zeros_and_resumes_exactly(tmp_path: Path) -> None:
    overrides = (
        "train.steps=12", *SHORT, "prune.method=gradual", "prune.sparsity=0.6",
        "prune.start=0", "prune.end=8", "prune.every=4", "prune.scope=all",
    )  # fmt: skip
    full = train(tiny_config(tmp_path / "full", *overrides))
    _resume_from(tmp_path / "full", tmp_path / "resumed", 6)
    resumed = train(tiny_config(tmp_path / "resumed", *overrides))
    assert resumed.start_step == 6 and resumed.losses == full.losses[6:]  # bit for bit
    tokens_per_s = {"tokens_per_s": resumed.evaluations[-1]["tokens_per_s"]}
    assert resumed.evaluations[-1] == full.evaluations[-1] | tokens_per_s
    assert full.model is not None and resumed.model is not None
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    at_6 = _zeros(_model_at(tmp_path / "full/checkpoints/step_6", tmp_path, *overrides))
    at_12 = _zeros(full.model)
    for name, zeros in at_6.items():
        assert bool(at_12[name][zeros].all()), f"{name}: a pruned weight came back"
        # Pruned before steps 0, 4 and 8: s = 0.6 (1 - (1 - t/8)^3), 0.525 at t = 4.
        assert float(zeros.float().mean()) == pytest.approx(0.6 * (1 - 0.5**3), abs=2e-3)
        assert float(at_12[name].float().mean()) == pytest.approx(0.6, abs=2e-3)
    meta = read_meta(tmp_path / "full/checkpoints/step_12")
    assert meta["config"]["prune"]["method"] == "gradual"
    records = [e for e in full.evaluations if "prune_sparsity" in e]
    assert records and records[-1]["prune_sparsity"] == pytest.approx(0.6, abs=2e-3)
    # Another prune config refuses to resume the run.
    with pytest.raises(ValueError, match="was written with prune="):
        train(tiny_config(tmp_path / "full", *overrides, "prune.sparsity=0.5"))


def test_sr_ste_trains_two_four_and_resumes_exactly(tmp_path: Path) -> None:
    overrides = (
        "train.steps=12", *SHORT, "prune.method=sr_ste", "prune.pattern=2:4",
        "prune.sr_ste_decay=0.01",
    )  # fmt: skip
    full = train(tiny_config(tmp_path / "full", *overrides))
    _resume_from(tmp_path / "full", tmp_path / "resumed", 6)
    resumed = train(tiny_config(tmp_path / "resumed", *overrides))
    assert resumed.losses == full.losses[6:]
    assert full.model is not None and resumed.model is not None
    for weight in prunable_weights(full.model, PruneScope.EXPERTS):
        assert satisfies_nm(weight.param, 1, TWO_FOUR), weight.name
    extra = load_checkpoint(
        tmp_path / "full/checkpoints/step_12",
        _model_at(tmp_path / "full/checkpoints/step_12", tmp_path, *overrides),
    ).extra
    dense = extra["pruning"]["dense"]["blocks.0.ffn.experts.w1_EDH"]["value"]
    sparse = full.model.blocks[0].ffn.experts.w1_EDH.detach()
    mask = extra["pruning"]["masks"]["blocks.0.ffn.experts.w1_EDH"]["value"]
    assert torch.equal(dense * mask, sparse)  # the checkpoint holds W~, its state W
    assert bool((dense[~mask] != 0).any())  # the pruned weights live on, densely


def test_pruned_checkpoint_records_masks_and_fine_tunes_with_them(
    pruned_24: Path, tmp_path: Path
) -> None:
    step_dir = resolve_latest(pruned_24)
    assert step_dir is not None
    meta = read_meta(step_dir)
    loaded = load_model(pruned_24)
    record = loaded_extra = load_checkpoint(step_dir, loaded.model).extra["pruning"]
    assert record["pattern"] == "2:4" and record["scope"] == "experts"
    report = loaded_extra["report"]
    assert report["magnitude_kept"] > report["magnitude_kept_without_permutation"]
    assert report["expert_memory_bytes"]["packed_2_4"] < report["expert_memory_bytes"]["dense"]
    assert meta["config"]["model"] == tiny_config(tmp_path).model.__dict__ | {
        "activation": "gelu", "ffn_kind": "mlp"
    }  # fmt: skip
    zeros_before = _zeros(loaded.model, "experts")
    for weight in prunable_weights(loaded.model, PruneScope.EXPERTS):
        assert satisfies_nm(weight.param, 1, TWO_FOUR)
        mask = record["masks"][weight.name]["value"]
        assert torch.equal(~mask, zeros_before[weight.name])
    # Fine-tuned from it (train.init_from, prune.method=none): the masks hold.
    run_dir = tmp_path / "fine_tune"
    result = train(tiny_config(run_dir, "train.steps=6", *SHORT, f"train.init_from={pruned_24}"))
    assert result.model is not None
    for name, zeros in _zeros(result.model, "experts").items():
        assert torch.equal(zeros, zeros_before[name]), name  # still exactly the pruned ones
    assert result.losses[-1] < result.losses[0]
    # The run's model is the checkpoint's, whatever its own `model` said.
    other = tiny_config(tmp_path / "x", "model.d_model=32", f"train.init_from={pruned_24}")
    assert InitialWeights.read(pruned_24).adopt(other).model == loaded.model.config


def test_pruned_checkpoint_composes_with_generate_subset_and_int8(
    trained: Path, pruned_24: Path, tmp_path: Path
) -> None:
    loaded = load_model(pruned_24)
    completion = generate(loaded.model, b"ab", 8, temperature=0.0, task_id=0)
    assert completion.completion_tokens == 8
    subset = write_subset(pruned_24, 1, tmp_path / "subset", coverage=0.9, quantize="int8")
    sub_model = load_model(subset.directory).model
    for _, layer in sub_model.moe_layers():
        experts = layer.experts
        assert isinstance(experts, Int8Experts)
        # int8 keeps the zeros: 2:4 along the reduction dimension (q is [out, in]).
        assert satisfies_nm(experts.w1_q_EHD, 2, TWO_FOUR)
        assert satisfies_nm(experts.w2_q_EDH, 2, TWO_FOUR)
    int8 = write_pruned(
        trained, tmp_path / "int8", PruneConfig(method="magnitude", pattern="2:4"), "int8"
    )
    assert int8.expert_file_bytes < 0.4 * int8.source_expert_file_bytes
    memory = int8.report.memory
    assert memory["packed_2_4_int8"] < memory["int8"] < memory["packed_2_4"] < memory["dense"]
    int8_model = load_model(int8.directory).model
    assert all(isinstance(layer.experts, Int8Experts) for _, layer in int8_model.moe_layers())


def test_pruned_moe_student_distils_from_its_unpruned_self(
    trained: Path, pruned_24: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "student"
    config = distill_config(
        run_dir, trained, "distill.init=checkpoint", f"train.init_from={pruned_24}",
        "train.steps=6", *SHORT,
    )  # fmt: skip
    result = distill(config)
    assert result.model is not None and result.model.moe_layers()
    zeros_before = _zeros(load_model(pruned_24).model, "experts")
    for name, zeros in _zeros(result.model, "experts").items():
        assert torch.equal(zeros, zeros_before[name]), name
    assert "kd_loss" in result.evaluations[-1]
    meta = read_meta(run_dir / "checkpoints" / "step_6")
    assert meta["config"]["distill"]["init"] == "checkpoint"
    assert meta["config"]["model"]["moe_every"] == 1  # an MoE student
    with pytest.raises(ValueError, match=r"distill.init=checkpoint together with train.init_from"):
        distill_config(run_dir, trained, "distill.init=checkpoint")


def test_prune_config_composes() -> None:
    register_prune_config()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("prune", overrides=["checkpoint=a", "out=b", "prune.pattern=2:4"])
    config = to_prune_config(cfg)
    assert config.prune.method.value == "magnitude" and config.prune.nm == TWO_FOUR
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        overrides = ["checkpoint=a", "out=b", "prune.method=gradual", "prune.sparsity=0.5"]
        cfg = compose("prune", overrides=[*overrides, "prune.end=4"])
    with pytest.raises(ValueError, match=r"prune.method=gradual is invalid for launch.prune"):
        to_prune_config(cfg)


def test_pruning_with_deepspeed_is_refused_before_anything_runs(tmp_path: Path) -> None:
    overrides = ("train.engine=deepspeed", "prune.method=magnitude", "prune.sparsity=0.5")
    with pytest.raises(ValueError, match=r"needs train.engine=torch \(got deepspeed\)"):
        train(tiny_config(tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()


def test_bad_input_to_write_pruned(trained: Path, pruned_24: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"M=3 .*w1_EDH has shape \(4, 64, 64\)"):
        write_pruned(trained, tmp_path / "a", PruneConfig(method="magnitude", pattern="1:3"))
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        write_pruned(trained, pruned_24, PruneConfig(method="magnitude", sparsity=0.5))
    with pytest.raises(ValueError, match="not a one-shot method"):
        write_pruned(trained, tmp_path / "b", PruneConfig(method="gradual", sparsity=0.5, end=4))


@pytest.mark.slow
def test_launch_prune_command_line(trained: Path, tmp_path: Path) -> None:
    args = (
        f"checkpoint={trained}", f"out={tmp_path / 'out'}", "prune.sparsity=0.5",
        "prune.scope=all", "eval_batches=1", f"report={tmp_path / 'report.json'}",
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "launch.prune", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "sparsity 0.5000" in done.stdout and "val bpb after" in done.stdout
    assert "values_and_bitmap" in done.stdout and (tmp_path / "report.json").is_file()


def test_a_pruned_checkpoint_pruned_further_keeps_its_masks(
    pruned_24: Path, tmp_path: Path
) -> None:
    first = load_model(pruned_24).model
    zeros_24 = _zeros(first, "experts")
    config = PruneConfig(method="magnitude", sparsity=0.3, scope="all")
    result = write_pruned(pruned_24, tmp_path / "more", config)
    model = load_model(result.directory).model
    masks = load_checkpoint(result.directory, model).extra["pruning"]["masks"]
    for name, zeros in _zeros(model, "experts").items():
        assert bool(zeros[zeros_24[name]].all()), name  # what 2:4 pruned stays pruned
        assert torch.equal(~masks[name]["value"], zeros)
    attention = model.blocks[0].attn.qkv_proj.weight
    assert float((attention == 0).float().mean()) == pytest.approx(0.3, abs=1e-3)
    with pytest.raises(ValueError, match="already pruned"):
        write_pruned(
            pruned_24,
            tmp_path / "perm",
            PruneConfig(method="magnitude", pattern="2:4", permute=True),
        )
