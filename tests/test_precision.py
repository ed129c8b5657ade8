"""Mixed precision in training (`train.precision`, `moe.precision`): which precision a
host gets, that bf16 training tracks fp32, that the optimizer updates fp32 master
weights, that fp16 loss scaling skips an overflowing step and recovers, and that bad
values are refused by name. (Resumption in bf16: tests/test_train.py; the ops under
autocast: tests/test_ops_autocast.py; EP=2 in bf16: tests/test_ep_layer.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from test_train import tiny_config

from launch.config import CommConfig, TrainConfig
from launch.runtime import ProcessInfo, setup_runtime
from launch.training.engines import TorchEngine
from launch.training.loop import EVENTS_FILE, TrainResult, train
from moe.precision import (
    ComputePrecision,
    ResolvedPrecision,
    cpu_flags,
    resolve_precision,
)
from moe.transformer import MoETransformer

CPU = torch.device("cpu")
STEPS = 50


# --- which precision ------------------------------------------------------------------


def test_auto_is_bf16_only_where_the_cpu_multiplies_bf16_faster() -> None:
    """Training and inference differ on a CPU with avx512_bf16 but no AMX: bf16 trains
    faster there and decodes slower."""
    for flags, training, expected, reason in (
        (frozenset({"avx512f", "amx_tile", "amx_bf16"}), False, ComputePrecision.BF16,
         "this CPU has amx_bf16"),
        (frozenset({"avx512f", "amx_bf16", "avx512_bf16"}), True, ComputePrecision.BF16,
         "this CPU has amx_bf16"),
        (frozenset({"avx2", "avx512f", "avx512_bf16"}), False, ComputePrecision.FP32,
         "this CPU has avx512_bf16 but no AMX: bf16 decodes slower than fp32 there"),
        (frozenset({"avx2", "avx512f", "avx512_bf16"}), True, ComputePrecision.BF16,
         "this CPU has avx512_bf16: bf16 trains faster than fp32 there"),
        (frozenset({"avx2", "avx512f", "avx512bw"}), True, ComputePrecision.FP32,
         "lists none of the flags amx_bf16, avx512_bf16"),
        (frozenset(), False, ComputePrecision.FP32, "lists none of the flags amx_bf16, avx512_bf16"),
    ):  # fmt: skip
        if expected == ComputePrecision.BF16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            continue  # this torch has no oneDNN bf16 path: auto is fp32 whatever the flags
        resolved = resolve_precision("auto", CPU, flags=flags, training=training)
        assert resolved.precision == expected, (flags, training)
        assert resolved.requested == ComputePrecision.AUTO
        assert reason in resolved.reason, (flags, resolved.reason)
    # bf16 asked for on an AVX512-BF16 CPU runs natively, and says so.
    native = resolve_precision("bf16", CPU, flags=frozenset({"avx512_bf16"}))
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert native.precision == ComputePrecision.BF16
        assert native.reason == "this CPU has avx512_bf16"
    # bf16 asked for on a CPU without it still runs (emulated), and says so.
    slow = resolve_precision("bf16", CPU, flags=frozenset({"avx2"}))
    assert slow.precision == ComputePrecision.BF16 and "emulated, slow" in slow.reason
    assert resolve_precision("fp32", CPU).record() == {
        "precision": "fp32", "requested": "fp32", "reason": "asked for",
    }  # fmt: skip


def test_bad_precision_is_named_with_what_is_accepted() -> None:
    with pytest.raises(
        ValueError, match=r"train\.precision='fp8' is not one of: auto, fp32, bf16, fp16"
    ):
        TrainConfig(precision="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"train\.precision='fp8' is not one of"):
        tiny_config(Path("/tmp/unused"), "train.precision=fp8")
    with pytest.raises(ValueError, match=r"train\.precision=fp16 needs CUDA, this run is on cpu"):
        resolve_precision("fp16", CPU)


def test_fp16_training_on_cpu_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="accepted here: bf16, fp32 or auto"):
        train(tiny_config(tmp_path, "train.precision=fp16"))
    assert not (tmp_path / "checkpoints").exists()


# --- bf16 tracks fp32 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainResult]:
    """The tiny model trained STEPS steps in fp32 and in bf16 (same seed and batches)."""
    root = tmp_path_factory.mktemp("tracking")
    return {
        precision: train(
            tiny_config(
                root / precision,
                f"train.steps={STEPS}",
                f"train.precision={precision}",
                "train.eval_every=25",
                "train.checkpoint_every=25",
            )
        )
        for precision in ("fp32", "bf16")
    }


def test_bf16_training_tracks_fp32(tracked_runs: dict[str, TrainResult]) -> None:
    """Same data, same initial weights: bf16 losses stay within a few percent of fp32's
    at every step (measured: 1.9% at worst, 0.4% on average) and the validation loss
    within 2% at step 25 and 1% at step 50, yet they are not fp32's (bf16 really ran).
    Measured over seeds 0-7: at step 25, where the loss still falls fast, 0.03-1.1%
    (0.01-1.45% with the router's backward in fp32, as before 2026-12-05); at step
    50 at most 0.35% (0.33%)."""
    fp32, bf16 = (np.array(tracked_runs[p].losses) for p in ("fp32", "bf16"))
    assert len(fp32) == len(bf16) == STEPS
    relative = np.abs(bf16 - fp32) / fp32
    assert relative.max() < 0.05, relative
    assert relative.mean() < 0.01, relative
    assert relative.max() > 1e-4, "bf16 losses equal fp32's: the run did not compute in bf16"
    assert bf16[-5:].mean() < 0.6 * bf16[:5].mean()  # it learns
    evaluations = zip(tracked_runs["bf16"].evaluations, tracked_runs["fp32"].evaluations)
    for (got, want), rel in zip(evaluations, (0.02, 0.01), strict=True):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=rel)


def test_the_run_records_its_precision(tracked_runs: dict[str, TrainResult]) -> None:
    """meta.json (config.train.precision resolved, config.precision with the reason),
    events.jsonl, and fp32 weights on disk: the checkpoint holds the master weights."""
    run_dir = Path(tracked_runs["bf16"].run_dir)
    meta = json.loads((run_dir / "checkpoints" / "step_50" / "meta.json").read_text())
    assert meta["config"]["train"]["precision"] == "bf16"
    assert meta["config"]["precision"]["precision"] == "bf16"
    assert meta["config"]["precision"]["requested"] == "bf16"
    assert "avx512_bf16" in meta["config"]["precision"]["reason"] or (
        "emulated" in meta["config"]["precision"]["reason"]
    )
    (start,) = [json.loads(line) for line in (run_dir / EVENTS_FILE).read_text().splitlines()]
    assert start["precision"] == meta["config"]["precision"]
    dense = safetensors.torch.load_file(
        str(run_dir / "checkpoints" / "step_50" / "dense.safetensors")
    )
    assert {t.dtype for t in dense.values()} == {torch.float32}


def test_auto_records_the_hosts_choice(tmp_path: Path) -> None:
    result = train(tiny_config(tmp_path, "train.precision=auto", "train.steps=2",
                               "train.warmup_steps=1", "train.eval_every=2"))  # fmt: skip
    meta = json.loads((tmp_path / "checkpoints" / "step_2" / "meta.json").read_text())
    native = {"amx_bf16", "avx512_bf16"} & cpu_flags()
    bf16 = bool(native) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    recorded = meta["config"]["precision"]
    assert recorded["precision"] == ("bf16" if bf16 else "fp32")
    assert recorded["requested"] == "auto"
    assert recorded["reason"] == resolve_precision("auto", CPU, training=True).reason
    assert result.final_step == 2


# --- fp32 master weights --------------------------------------------------------------


def test_the_optimizer_updates_fp32_master_weights(tmp_path: Path) -> None:
    """One bf16 step with lr = 1e-6: Adam's first update moves every weight with a
    gradient by about lr, below half of bf16's spacing at all but the smallest weights
    (2^-14 at 0.02, the initialisation's scale; 2^-7 at the norms' 1.0), so the change
    survives only in fp32 masters. A bf16-only update would round almost all of it away:
    checked on the same numbers."""
    lr = 1e-6
    config = tiny_config(
        tmp_path, "train.precision=bf16", "train.steps=1", "train.warmup_steps=0",
        f"train.lr={lr}", "train.min_lr=0", "train.weight_decay=0", "train.grad_clip=0",
        "train.eval_every=1",
    )  # fmt: skip
    initial = MoETransformer(config.model, config.routing, seed=config.train.seed)
    result = train(config)
    assert result.model is not None
    before = dict(initial.named_parameters())
    moved_total = moved_bf16 = elements = 0
    for name, param in result.model.named_parameters():
        assert param.dtype == torch.float32, name
        delta = (param.detach() - before[name].detach()).abs()
        moved = delta > 0
        assert bool(moved.any()), f"{name}: no element moved"
        # Adam's first step: |update| = lr * |g| / (|g| + eps) <= lr (+ fp32 rounding at 1.0).
        assert float(delta.max()) <= 1.2 * lr, name
        moved_total += int((delta > 0.5 * lr).sum())
        elements += delta.numel()
        # The same update applied to bf16 weights leaves them where they were.
        as_bf16 = before[name].detach().to(torch.bfloat16)
        step_taken = param.detach() - before[name].detach()
        moved_bf16 += int(((as_bf16.float() + step_taken).to(torch.bfloat16) != as_bf16).sum())
    assert moved_total > 0.3 * elements, (moved_total, elements)
    assert moved_bf16 < 0.05 * elements, (moved_bf16, elements)


# --- fp16 loss scaling ----------------------------------------------------------------


class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_fp16_loss_scaling_skips_an_overflowing_step_and_recovers() -> None:
    """The torch engine's fp16 path on a regression, on CPU (fp16 compute itself is
    CUDA-only, `test_fp16_training_on_cuda`; the scaling is device-agnostic code): a
    crafted batch with a huge input gives an infinite gradient; that step leaves the
    weights and Adam's state as they were, counts as skipped and halves the scale; the
    next ordinary batches train again, and the scale survives a checkpoint."""
    torch.manual_seed(0)
    model = _Regression()
    config = TrainConfig(steps=40, warmup_steps=0, lr=0.2, weight_decay=0.0, grad_clip=0.0)
    runtime = setup_runtime(CommConfig(), ProcessInfo())
    fp16 = ResolvedPrecision(ComputePrecision.FP16, ComputePrecision.FP16, "test on CPU")
    engine = TorchEngine(model, config, runtime, fp16)
    target_w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def step(x: torch.Tensor) -> torch.Tensor:
        engine.begin_step(config.lr)
        loss = (model(x) - x @ target_w.T).square().mean()
        engine.backward(loss)
        engine.finish_step()
        return loss.detach()

    generator = torch.Generator().manual_seed(1)
    ordinary = [torch.randn(16, 4, generator=generator) for _ in range(40)]
    first = step(ordinary[0])
    assert engine.scalars() == {"loss_scale": 2.0**16, "skipped_steps": 0.0}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {k: v.clone() for k, v in engine.optimizer.state[model.linear.weight].items()}

    crafted = ordinary[1].clone()
    crafted[0, 0] = 1e30  # its squared error overflows: an infinite gradient
    step(crafted)
    assert engine.scalars() == {"loss_scale": 2.0**15, "skipped_steps": 1.0}
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), f"{name} moved on a skipped step"
    for key, value in engine.optimizer.state[model.linear.weight].items():
        assert torch.equal(value, moments[key]), f"Adam's {key} moved on a skipped step"

    losses = [step(x) for x in ordinary[2:]]
    assert engine.scalars()["skipped_steps"] == 1.0
    assert all(torch.isfinite(loss) for loss in losses)
    assert float(losses[-1]) < 0.1 * float(first), (losses[-1], first)
    assert not torch.equal(model.linear.weight.detach(), weights["linear.weight"])

    saved = engine.optimizer_state()
    again = TorchEngine(_Regression(), config, runtime, fp16)
    again.load_optimizer_state(saved)
    assert again.scalars() == engine.scalars()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_training_on_cuda(tmp_path: Path) -> None:
    """fp16 end to end on a GPU: the tiny model trains, its losses track fp32's, and the
    loss scale and the skipped steps are logged."""
    fp16 = train(tiny_config(tmp_path / "fp16", "train.precision=fp16", f"train.steps={STEPS}"))
    fp32 = train(tiny_config(tmp_path / "fp32", "train.precision=fp32", f"train.steps={STEPS}"))
    relative = np.abs(np.array(fp16.losses) - np.array(fp32.losses)) / np.array(fp32.losses)
    assert relative.mean() < 0.02, relative
    metrics = (tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()
    for record in map(json.loads, metrics):
        assert record["loss_scale"] >= 1.0 and record["skipped_steps"] >= 0.0
