"""Distillation: the KD loss against a hand computation, the student's FFN is one expert of
the expert class (a dense parameter), `top`/`merge` give the expected weights, a one-expert
teacher is reproduced exactly, the teacher is frozen, the loss falls, resuming is exact,
the student is an ordinary checkpoint, bad input fails before anything is written, and
(distributed) an EP=2 teacher computes what the EP=1 teacher computes while the student's
gradients are all-reduced."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_utils import run_distributed, values_or_raise
from hydra import compose, initialize_config_dir
from test_train import tiny_config

from launch.config import CommConfig, RunConfig, TrainConfig
from launch.generate import GenerateConfig, run_generate
from launch.runtime import ProcessInfo, setup_runtime, teardown_runtime
from launch.training.checkpointing import config_dict
from launch.training.distillation import (
    DistillRunConfig,
    distill,
    load_teacher,
    read_teacher,
    register_distill_configs,
    student_run_config,
    to_distill_config,
)
from launch.training.engines import TorchEngine
from launch.training.gradients import reduce_gradients
from launch.training.loop import train
from launch.training.objectives import Distillation
from launch.training.optim import split_parameters
from moe.checkpoint import LATEST_FILE, read_meta, save_checkpoint
from moe.checkpoint.experts import CheckpointExperts
from moe.config import FFNKind, ModelConfig
from moe.distill import (
    StudentInit,
    combine_experts,
    distillation_loss,
    initialise_student,
    kd_loss,
    student_config,
)
from moe.experts import ExpertFFN, GroupedExperts, expert_parameter_ids
from moe.inference import load_model
from moe.params import count_parameters
from moe.transformer import MoETransformer
from routing import RoutingConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
ROOT = Path(__file__).resolve().parents[1]


def distill_config(run_dir: Path, teacher: Path | str, *overrides: str) -> DistillRunConfig:
    register_distill_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "distill",
            overrides=[
                f"teacher={teacher}",
                "data=synthetic",
                "train=tiny",
                f"run_dir={run_dir}",
                "wandb.mode=disabled",
                "train.progress=false",
                *overrides,
            ],
        )
    return to_distill_config(cfg)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MoE (4 experts of width 64, top-2) trained for 30 steps: a run directory."""
    run_dir = tmp_path_factory.mktemp("teacher")
    train(
        tiny_config(run_dir, "train.steps=30", "train.eval_every=30", "train.checkpoint_every=30")
    )
    return run_dir


def _probe_tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))


def _save(model: MoETransformer, directory: Path, routing: RoutingConfig | None) -> Path:
    run = RunConfig(model=model.config, routing=routing or RoutingConfig())
    return save_checkpoint(directory / "checkpoints", model, None, 1, config_dict(run))


# --- the loss ----------------------------------------------------------------------------


def test_kd_loss_matches_a_hand_computation() -> None:
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
    labels = [1, 2]
    temperature, alpha = 2.0, 0.3

    def softmax(row: list[float], t: float) -> list[float]:
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]

    kl = 0.0
    for s_row, t_row in zip(student, teacher):
        p, q = softmax(t_row, temperature), softmax(s_row, temperature)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kd_expected = temperature**2 * kl / 2  # mean over the 2 positions
    ce_expected = -sum(math.log(softmax(row, 1.0)[y]) for row, y in zip(student, labels)) / 2

    s, t = torch.tensor([student]), torch.tensor([teacher])  # [B=1, T=2, V=3]
    assert float(kd_loss(s, t, temperature)) == pytest.approx(kd_expected, rel=1e-6)
    losses = distillation_loss(s, t, torch.tensor([labels]), temperature, alpha)
    assert float(losses.kd) == pytest.approx(kd_expected, rel=1e-6)
    assert float(losses.ce) == pytest.approx(ce_expected, rel=1e-6)
    assert float(losses.loss) == pytest.approx(kd_expected + alpha * ce_expected, rel=1e-6)
    assert float(kd_loss(t, t, temperature)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="vocabularies must match"):
        kd_loss(s, t[..., :2], temperature)


# --- the student -------------------------------------------------------------------------


def _tiny_teacher(num_experts: int = 4, top_k: int = 2, seed: int = 0) -> MoETransformer:
    config = ModelConfig(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, ffn_hidden=48,
        expert_hidden=16, num_experts=num_experts,
    )  # fmt: skip
    routing = RoutingConfig(top_k=top_k, capacity="dropless")
    model = MoETransformer(config, routing, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # norm gains away from their init of 1, so that copying shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
    return model


def test_student_ffn_is_one_expert_of_the_expert_class() -> None:
    teacher = _tiny_teacher()
    config = student_config(teacher.config, teacher.routing, 0)
    assert config.ffn_hidden == 2 * 16 and config.moe_every == 0
    assert config.ffn_kind == FFNKind.EXPERT
    student = MoETransformer(config, seed=1)
    teacher_experts = teacher.moe_layers()[0][1].experts
    for block in student.blocks:
        assert isinstance(block.ffn, ExpertFFN)
        experts = block.ffn.experts
        assert type(experts) is type(teacher_experts) is GroupedExperts
        assert experts.num_experts == 1 and experts.replicated
        assert experts.expert_ids == (0,)
        assert [n for n, _ in experts.named_parameters()] == [
            n for n, _ in teacher_experts.named_parameters()
        ]
        # One expert's layout: [1, D, W] and [1, W, D].
        assert experts.w1_EDH.shape == (1, 32, 32) and experts.w2_EHD.shape == (1, 32, 32)
        x = torch.randn(3, 5, 32)
        torch.testing.assert_close(
            block.ffn(x), experts.expert_forward(x.reshape(-1, 32), 0).reshape(3, 5, 32)
        )
    # A dense parameter for the optimizer, the gradient reduction and the counts.
    assert expert_parameter_ids(student) == set()
    assert split_parameters(student).expert == []
    assert count_parameters(student).expert == 0
    with pytest.raises(ValueError, match="ffn_kind='conv'"):
        ModelConfig(ffn_kind="conv")
    with pytest.raises(ValueError, match=r"distill\.width=-3"):
        student_config(teacher.config, teacher.routing, -3)


def test_top_and_merge_give_the_expected_weights() -> None:
    generator = torch.Generator().manual_seed(3)
    w1 = torch.randn(4, 5, 3, generator=generator)
    w2 = torch.randn(4, 3, 5, generator=generator)
    usage = torch.tensor([3.0, 10.0, 0.0, 5.0], dtype=torch.float64)
    weights = {"w1_EDH": w1, "w2_EHD": w2}

    top = combine_experts(weights, usage, StudentInit.TOP, 2)  # experts 1 and 3
    torch.testing.assert_close(top["w1_EDH"][0], torch.cat([w1[1], w1[3]], dim=1))
    torch.testing.assert_close(top["w2_EHD"][0], torch.cat([w2[1] * 10 / 15, w2[3] * 5 / 15]))
    top1 = combine_experts(weights, usage, StudentInit.TOP, 1)
    torch.testing.assert_close(top1["w1_EDH"][0], w1[1])
    torch.testing.assert_close(top1["w2_EHD"][0], w2[1])

    merged = combine_experts(weights, usage, StudentInit.MERGE, 1)
    p = usage.float() / 18
    torch.testing.assert_close(merged["w1_EDH"][0], (w1 * p[:, None, None]).sum(0))
    torch.testing.assert_close(merged["w2_EHD"][0], (w2 * p[:, None, None]).sum(0))
    # Two slices: usage order 1, 3, 0, 2 dealt into groups {1, 0} and {3, 2}.
    two = combine_experts(weights, usage, StudentInit.MERGE, 2)
    group0_w1 = w1[1] * 10 / 13 + w1[0] * 3 / 13
    group1_w1 = w1[3] * 1.0 + w1[2] * 0.0
    torch.testing.assert_close(two["w1_EDH"][0], torch.cat([group0_w1, group1_w1], dim=1))
    group0_w2 = (w2[1] * 10 / 13 + w2[0] * 3 / 13) * 13 / 18
    group1_w2 = w2[3] * 5 / 18
    torch.testing.assert_close(two["w2_EHD"][0], torch.cat([group0_w2, group1_w2]))


def test_initialise_student_copies_the_teacher(tmp_path: Path) -> None:
    teacher = _tiny_teacher()
    checkpoint = _save(teacher, tmp_path, teacher.routing)
    meta = read_meta(checkpoint)
    usage = {0: torch.tensor([1.0, 7.0, 4.0, 2.0]), 1: torch.tensor([9.0, 0.0, 0.0, 3.0])}
    for init in (StudentInit.TOP, StudentInit.MERGE):
        student = MoETransformer(student_config(teacher.config, teacher.routing, 0), seed=5)
        report = initialise_student(
            student, teacher, init, usage, CheckpointExperts(checkpoint, meta)
        )
        for name, tensor in student.state_dict().items():
            if ".ffn." not in name:
                torch.testing.assert_close(tensor, teacher.state_dict()[name], rtol=0, atol=0)
        for block, layer in teacher.moe_layers():
            weights = {k: v.detach() for k, v in layer.experts.state_dict().items()}
            want = combine_experts(weights, usage[block].double(), init, 2)
            got = student.blocks[block].ffn.experts.state_dict()
            for key in want:
                torch.testing.assert_close(got[key], want[key])
    assert report == {0: "merge: 4 experts into 2 slice(s)", 1: "merge: 4 experts into 2 slice(s)"}


def test_top_from_a_one_expert_teacher_reproduces_its_logits(tmp_path: Path) -> None:
    teacher = _tiny_teacher(num_experts=1, top_k=1, seed=4)
    checkpoint = _save(teacher, tmp_path, teacher.routing)
    student = MoETransformer(student_config(teacher.config, teacher.routing, 0), seed=9)
    usage = {block: torch.tensor([5.0]) for block, _ in teacher.moe_layers()}
    initialise_student(
        student,
        teacher,
        StudentInit.TOP,
        usage,
        CheckpointExperts(checkpoint, read_meta(checkpoint)),
    )
    student.eval()
    with torch.no_grad():
        want = teacher(_probe_tokens()).logits_BTV
        got = student(_probe_tokens()).logits_BTV
    assert torch.equal(got, want)


# --- runs --------------------------------------------------------------------------------


def test_teacher_gets_no_gradient_and_is_not_in_the_optimizer(teacher_dir: Path) -> None:
    config = distill_config(teacher_dir / "unused", teacher_dir)
    teacher_info = read_teacher(config.teacher)
    run_config = student_run_config(config, teacher_info)
    runtime = setup_runtime(CommConfig(), ProcessInfo())
    try:
        teacher = load_teacher(teacher_info, runtime, config)
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        student = MoETransformer(run_config.model, seed=0)
        objective = Distillation(teacher, 2.0, 0.5, {})
        engine = TorchEngine(student, TrainConfig(steps=2, warmup_steps=0), runtime)
        tokens = _probe_tokens()
        engine.begin_step(1e-2)
        engine.backward(objective(engine.module, tokens[:, :-1], tokens[:, 1:], None).loss)
        engine.finish_step()
    finally:
        teardown_runtime(runtime)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    optimized = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters()}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert not teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is not None for p in student.parameters())


def test_distillation_loss_falls_and_the_student_is_an_ordinary_checkpoint(
    teacher_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "student"
    overrides = ("train.eval_every=10", "train.checkpoint_every=30", "wandb.mode=offline")
    result = distill(distill_config(run_dir, teacher_dir, "train.steps=30", *overrides))
    assert result.final_step == 30
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    for record in records:
        assert {"step", "train_loss", "val_loss", "val_bpb", "tokens_per_s", "kd_loss"} <= set(
            record
        )
    assert records[-1]["kd_loss"] < records[0]["kd_loss"]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert (run_dir / "checkpoints" / LATEST_FILE).read_text().strip() == "step_30"
    assert (run_dir / "plots" / "expert_load.png").stat().st_size > 0  # the teacher's load
    assert list((run_dir / "wandb").glob("offline-run-*"))
    meta = read_meta(run_dir / "checkpoints" / "step_30")
    assert meta["config"]["model"]["ffn_kind"] == "expert"
    assert meta["config"]["teacher"] == str((teacher_dir / "checkpoints" / "step_30").resolve())
    assert meta["config"]["distill"]["init"] == "top"

    loaded = load_model(run_dir)
    assert result.model is not None
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(_probe_tokens()).logits_BTV, result.model(_probe_tokens()).logits_BTV
        )
    completions = run_generate(
        GenerateConfig(checkpoint=str(run_dir), prompt="ab", max_tokens=6, temperature=0.0),
        ProcessInfo(),
    )
    assert completions[0].completion_tokens == 6


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_continues_exactly(teacher_dir: Path, tmp_path: Path, precision: str) -> None:
    """Also in bf16: teacher and student under the run's autocast, the student's fp32
    masters in the checkpoint."""
    overrides = ("train.steps=8", "train.checkpoint_every=4", "train.eval_every=4",
                 f"train.precision={precision}")  # fmt: skip
    full = distill(distill_config(tmp_path / "full", teacher_dir, *overrides))
    meta = read_meta(tmp_path / "full" / "checkpoints" / "step_8")
    assert meta["config"]["train"]["precision"] == precision
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_4", resumed_dir / "step_4")
    (resumed_dir / LATEST_FILE).write_text("step_4\n")
    resumed = distill(distill_config(tmp_path / "resumed", teacher_dir, *overrides))
    assert resumed.start_step == 4
    assert resumed.losses == full.losses[4:]  # bit for bit
    for key in ("val_loss", "kd_loss", "train_loss"):
        assert resumed.evaluations[-1][key] == full.evaluations[-1][key]
    # Another temperature is another run: refused, naming the section.
    with pytest.raises(ValueError, match="distill="):
        distill(
            distill_config(tmp_path / "resumed", teacher_dir, *overrides, "distill.temperature=3")
        )


# --- bad input ---------------------------------------------------------------------------


def test_a_teacher_that_is_not_a_checkpoint_fails_before_writing(tmp_path: Path) -> None:
    not_a_checkpoint = tmp_path / "notes"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "readme.txt").write_text("hello")
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"teacher='{not_a_checkpoint}'.*not a checkpoint"):
        distill(distill_config(run_dir, not_a_checkpoint))
    assert not run_dir.exists()


def test_a_bad_student_width_fails_before_writing(teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"distill\.width=-1 is invalid"):
        distill(distill_config(run_dir, teacher_dir, "distill.width=-1"))
    # top/merge build the FFN from whole experts (expert_hidden=64, 4 experts).
    with pytest.raises(ValueError, match=r"distill.init=top needs distill.width.*got width 100"):
        distill(distill_config(run_dir, teacher_dir, "distill.width=100"))
    with pytest.raises(ValueError, match=r"distill.init='best' is not one of"):
        distill_config(run_dir, teacher_dir, "distill.init=best")
    assert not run_dir.exists()


def test_a_teacher_with_another_vocabulary_fails_before_writing(tmp_path: Path) -> None:
    config = ModelConfig(
        vocab_size=300, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=64,
        expert_hidden=16, num_experts=2,
    )  # fmt: skip
    routing = RoutingConfig(top_k=1)
    teacher = _save(MoETransformer(config, routing), tmp_path / "teacher", routing)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"vocab_size=300 .* vocabulary of 256"):
        distill(distill_config(run_dir, teacher))
    assert not run_dir.exists()


# --- several processes -------------------------------------------------------------------


SHORT_RUN = ("train.steps=20", "train.eval_every=10", "train.checkpoint_every=10")


def _ep_rank(rank: int, world_size: int, teacher: str, run_dir: str) -> dict:
    info = ProcessInfo(rank=rank, world_size=world_size, local_rank=rank, local_world_size=2)
    config = distill_config(Path(run_dir), teacher, "comm=ep2", "comm.backend=gloo", *SHORT_RUN)
    teacher_info = read_teacher(config.teacher)
    runtime = setup_runtime(config.comm, info)
    try:
        model = load_teacher(teacher_info, runtime, config)
        assert runtime.groups is not None
        with torch.no_grad():
            logits = model(_probe_tokens()).logits_BTV.numpy()
        # The dense student's gradients: each rank its own tokens, then the reduction.
        student = MoETransformer(student_run_config(config, teacher_info).model, seed=0)
        objective = Distillation(model, 2.0, 0.5, {})
        tokens = _probe_tokens()[rank : rank + 1]
        objective(student, tokens[:, :-1], tokens[:, 1:], None).loss.backward()
        ffn = {n: p for n, p in student.named_parameters() if ".ffn." in n}
        local = {n: p.grad.clone().numpy() for n, p in ffn.items()}
        reduce_gradients(student, runtime.groups)
        reduced = {n: p.grad.numpy() for n, p in ffn.items()}
    finally:
        teardown_runtime(runtime)
    result = distill(config, info)
    return {"logits": logits, "local": local, "reduced": reduced, "losses": result.losses}


@pytest.mark.distributed
@pytest.mark.slow
def test_ep2_teacher_equals_ep1_and_student_gradients_are_all_reduced(
    teacher_dir: Path, tmp_path: Path
) -> None:
    ranks = values_or_raise(
        run_distributed(_ep_rank, 2, str(teacher_dir), str(tmp_path / "ep2"), timeout_s=240.0)
    )
    config = distill_config(tmp_path / "unused", teacher_dir)
    ep1 = load_teacher(
        read_teacher(str(teacher_dir)), setup_runtime(config.comm, ProcessInfo()), config
    )
    with torch.no_grad():
        want = ep1(_probe_tokens()).logits_BTV.numpy()
    for rank in ranks:
        np.testing.assert_allclose(rank["logits"], want, rtol=1e-5, atol=1e-5)
    for name, local0 in ranks[0]["local"].items():
        assert not np.allclose(local0, ranks[1]["local"][name]), name  # different tokens
        mean = (local0 + ranks[1]["local"][name]) / 2
        np.testing.assert_allclose(ranks[0]["reduced"][name], mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(ranks[0]["reduced"][name], ranks[1]["reduced"][name])
    # A whole 2-rank run (teacher EP=2, student data parallel) computes the 1-rank run.
    ep1_run = distill(distill_config(tmp_path / "ep1", teacher_dir, *SHORT_RUN))
    assert ranks[0]["losses"] == ranks[1]["losses"]
    np.testing.assert_allclose(ranks[0]["losses"], ep1_run.losses, rtol=2e-5, atol=2e-5)
    meta = read_meta(tmp_path / "ep2" / "checkpoints" / "step_20")
    assert meta["world_size"] == 2 and meta["config"]["comm"]["ep_size"] == 2


@pytest.mark.slow
def test_command_line_distill_then_generate(teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "cli"
    env = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    distilled = subprocess.run(
        [
            sys.executable, "-m", "launch.distill", f"teacher={teacher_dir}", "data=synthetic",
            "train=tiny", "train.steps=4", "train.warmup_steps=1", "train.eval_every=4",
            "distill.init=merge", "train.progress=false", f"run_dir={run_dir}",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert distilled.returncode == 0, distilled.stderr[-3000:]
    assert "init=merge" in distilled.stdout
    generated = subprocess.run(
        [sys.executable, "-m", "launch.generate", f"checkpoint={run_dir}", "prompt=ab",
         "max_tokens=5", "temperature=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("ab")
    bad = subprocess.run(
        [sys.executable, "-m", "launch.distill", f"teacher={tmp_path / 'nothing'}",
         f"run_dir={tmp_path / 'bad'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "is not a checkpoint" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.distributed
def test_ray_distill_two_workers(teacher_dir: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from launch.ray_train import run_ray

    config = distill_config(
        tmp_path, teacher_dir, "comm=ep2", "train.steps=4", "train.warmup_steps=1",
        "train.eval_every=4", "train.checkpoint_every=2",
    )  # fmt: skip
    try:
        result = run_ray(config)
    finally:
        ray.shutdown()
    assert result.error is None and result.metrics["step"] == 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4] and "kd_loss" in records[0]
    assert read_meta(tmp_path / "checkpoints" / "step_4")["world_size"] == 2
