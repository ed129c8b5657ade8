"""Pruning in mixed precision: the masks act on the fp32 master weights under bf16
autocast (pruned weights stay exactly zero, SR-STE keeps its dense weights in fp32 and
resumes exactly), SR-STE's decay term is the same under fp16 loss scaling as without
it, and `launch.prune` of a bf16-trained checkpoint keeps the run's precision record and
loads in bf16, int8 experts included, with its zeros."""

from __future__ import annotations

import shutil
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import tiny_config

from launch.config import CommConfig, TrainConfig
from launch.runtime import ProcessInfo, setup_runtime
from launch.training.engines import TorchEngine
from launch.training.loop import train
from moe.checkpoint import LATEST_FILE, load_checkpoint, read_meta
from moe.inference import generate, load_model
from moe.inference.quant import Int8Experts
from moe.precision import ComputePrecision, ResolvedPrecision
from moe.pruning import (
    NMPattern,
    PruneConfig,
    PruneScope,
    build_pruning,
    prunable_weights,
    write_pruned,
)
from moe.pruning.masks import satisfies_nm
from moe.transformer import MoETransformer
from routing import CapacityOverride

TWO_FOUR = NMPattern(2, 4)
BF16 = ("train.precision=bf16",)


def dropless(model: MoETransformer) -> AbstractContextManager[MoETransformer]:
    return model.capacity_override(CapacityOverride.DROPLESS)


def _zeros(model: torch.nn.Module, scope: PruneScope) -> dict[str, torch.Tensor]:
    return {w.name: (w.param == 0) for w in prunable_weights(model, scope)}


@pytest.fixture(scope="module")
def gradual_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MoE trained 10 steps in bf16, pruned gradually (every prunable weight to
    sparsity 0.5 by step 4): a run directory with checkpoints at steps 4 and 10."""
    run_dir = tmp_path_factory.mktemp("gradual_bf16")
    train(
        tiny_config(
            run_dir, *BF16, "train.steps=10", "train.eval_every=10", "train.checkpoint_every=4",
            "train.keep_last=3", "prune.method=gradual", "prune.sparsity=0.5", "prune.start=0",
            "prune.end=4", "prune.every=2", "prune.scope=all",
        )
    )  # fmt: skip
    return run_dir


def test_masks_hold_on_fp32_masters_under_bf16_autocast(gradual_bf16: Path) -> None:
    """Weights pruned by the step-4 checkpoint are still exactly zero at step 10 (six
    bf16 steps of AdamW later, one more pruning among them), the parameters stay fp32,
    and the run records bf16."""
    config = tiny_config(gradual_bf16)
    at = {}
    for step in (4, 10):
        model = MoETransformer(config.model, config.routing, seed=3)
        load_checkpoint(gradual_bf16 / "checkpoints" / f"step_{step}", model)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        at[step] = _zeros(model, PruneScope.ALL)
        for weight in prunable_weights(model, PruneScope.ALL):
            # The kept weights are fp32 masters, not bf16 values stored in fp32.
            value = weight.param.detach()
            assert bool((value.to(torch.bfloat16).float() != value).any()), weight.name
    for name, zeros in at[4].items():
        # Pruned before steps 0 and 2 by then: s = 0.5 (1 - (1 - 2/4)^3) = 0.4375.
        assert float(zeros.float().mean()) == pytest.approx(0.4375, abs=2e-3), name
        assert float(at[10][name].float().mean()) == pytest.approx(0.5, abs=2e-3), name
        assert bool(at[10][name][zeros].all()), f"{name}: a pruned weight came back in bf16"
    meta = read_meta(gradual_bf16 / "checkpoints" / "step_10")
    assert meta["config"]["train"]["precision"] == "bf16"
    assert meta["config"]["precision"]["precision"] == "bf16"


def test_sr_ste_under_bf16_autocast_resumes_exactly(tmp_path: Path) -> None:
    overrides = (
        *BF16, "train.steps=8", "train.eval_every=4", "train.checkpoint_every=4",
        "prune.method=sr_ste", "prune.pattern=2:4", "prune.sr_ste_decay=0.01",
    )  # fmt: skip
    full = train(tiny_config(tmp_path / "full", *overrides))
    checkpoints = tmp_path / "resumed" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/step_4", checkpoints / "step_4")
    (checkpoints / LATEST_FILE).write_text("step_4\n")
    resumed = train(tiny_config(tmp_path / "resumed", *overrides))
    assert resumed.start_step == 4 and resumed.losses == full.losses[4:]  # bit for bit
    assert full.model is not None and resumed.model is not None
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for weight in prunable_weights(full.model, PruneScope.EXPERTS):
        assert weight.param.dtype == torch.float32
        assert satisfies_nm(weight.param, 1, TWO_FOUR), weight.name
    config = tiny_config(tmp_path, *overrides)
    model = MoETransformer(config.model, config.routing, seed=5)
    extra = load_checkpoint(tmp_path / "full/checkpoints/step_8", model).extra
    dense = extra["pruning"]["dense"]["blocks.0.ffn.experts.w1_EDH"]["value"]
    assert dense.dtype == torch.float32  # SR-STE's dense weights are fp32 masters too
    assert bool((dense.to(torch.bfloat16).float() != dense).any())  # not bf16 values


def _one_sr_ste_step(precision: ResolvedPrecision, tokens_BT: torch.Tensor) -> MoETransformer:
    """One torch-engine step of SR-STE 2:4 (a large decay) on the tiny model, in fp32
    arithmetic; under `precision` fp16 the engine scales the loss (2^16) and unscales the
    gradients after `before_update` has added the SR-STE term."""
    config = tiny_config(Path("/tmp/unused"))
    model = MoETransformer(config.model, config.routing, seed=11)
    train_config = TrainConfig(warmup_steps=0, lr=1e-2, weight_decay=0.0, grad_clip=0.0)
    engine = TorchEngine(model, train_config, setup_runtime(CommConfig(), ProcessInfo()), precision)
    pruning = build_pruning(PruneConfig(method="sr_ste", pattern="2:4", sr_ste_decay=0.5), model)
    engine.begin_step(train_config.lr)
    logits_BTV = model(tokens_BT[:, :-1]).logits_BTV
    loss = F.cross_entropy(logits_BTV.flatten(0, 1), tokens_BT[:, 1:].flatten())
    engine.backward(loss)
    pruning.before_update(engine.gradient_scale())
    engine.finish_step()
    pruning.after_update()
    return model


def test_sr_ste_term_is_unchanged_by_fp16_loss_scaling() -> None:
    """The gradients the optimizer read and the weights it wrote equal the unscaled
    run's: the SR-STE term is added while the gradients still carry the loss scale, so
    it must carry it too (without it, it would be divided by 2^16 with them)."""
    tokens_BT = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    fp32 = ResolvedPrecision(ComputePrecision.FP32, ComputePrecision.FP32, "test")
    fp16 = ResolvedPrecision(ComputePrecision.FP16, ComputePrecision.FP16, "test on CPU")
    plain, scaled = _one_sr_ste_step(fp32, tokens_BT), _one_sr_ste_step(fp16, tokens_BT)
    plain_params = dict(plain.named_parameters())
    for name, param in scaled.named_parameters():
        other = plain_params[name]
        assert param.grad is not None and other.grad is not None, name
        torch.testing.assert_close(param.grad, other.grad, rtol=1e-6, atol=0.0, msg=name)
        torch.testing.assert_close(param, other, rtol=1e-6, atol=0.0, msg=name)


def test_launch_prune_of_a_bf16_run_keeps_its_precision_and_loads_in_bf16(
    gradual_bf16: Path, tmp_path: Path
) -> None:
    """`launch.prune` (2:4 on top of the run's masks, then int8) of the bf16 run: the
    pruned checkpoint's run config still says bf16; loaded in bf16 its weights keep
    every zero (bf16 and int8: round(0 / s) = 0) and computes what the fp32 load does,
    within bf16 rounding."""
    config = PruneConfig(method="magnitude", pattern="2:4")
    floats = write_pruned(gradual_bf16, tmp_path / "pruned", config)
    int8 = write_pruned(gradual_bf16, tmp_path / "pruned_int8", config, "int8")
    for result in (floats, int8):
        meta = read_meta(result.directory)
        assert meta["config"]["train"]["precision"] == "bf16"
        assert meta["config"]["precision"]["precision"] == "bf16"
    fp32 = load_model(floats.directory).model
    zeros = _zeros(fp32, PruneScope.ALL)
    loaded = load_model(floats.directory, precision="bf16")
    assert loaded.precision.precision == ComputePrecision.BF16
    for name, bf16_zeros in _zeros(loaded.model, PruneScope.ALL).items():
        assert torch.equal(bf16_zeros, zeros[name]), name
    for weight in prunable_weights(loaded.model, PruneScope.EXPERTS):
        assert weight.param.dtype == torch.bfloat16 and satisfies_nm(weight.param, 1, TWO_FOUR)
    quantized = load_model(int8.directory, precision="bf16").model
    layers = quantized.moe_layers()
    assert layers
    for _, layer in layers:
        experts = layer.experts
        assert isinstance(experts, Int8Experts)
        assert satisfies_nm(experts.w1_q_EHD, 2, TWO_FOUR)  # q is [out, in]
        assert satisfies_nm(experts.w2_q_EDH, 2, TWO_FOUR)
        assert experts.w1_scale_EH.dtype == torch.float32
    # The same models as loaded in fp32, within bf16 rounding, and they generate.
    tokens_1T = torch.tensor([list(b"In the beginning God")])
    for bf16_model, fp32_model in (
        (loaded.model, fp32),
        (quantized, load_model(int8.directory).model),
    ):
        # Dropless, as the engine routes: capacity drops would depend on near-ties of
        # router scores that bf16 weights move.
        with torch.no_grad(), dropless(fp32_model), dropless(bf16_model):
            want = fp32_model(tokens_1T).logits_BTV
            got = bf16_model(tokens_1T).logits_BTV
        assert got.dtype == torch.bfloat16
        assert float((got.float() - want).norm() / want.norm()) < 3e-2
        assert generate(bf16_model, b"And", 6, temperature=0.0).completion_tokens == 6
