"""The training function that both launchers (torchrun and Ray) call.

`train(config, info)` runs one rank of a run: it builds the runtime (devices, topology,
process groups), the data, the model with its expert-parallel dispatchers and the
optimizer, resumes from the latest checkpoint when there is one, and trains with
warmup + cosine LR, gradient accumulation, gradient clipping over the global norm,
periodic evaluation (validation loss and bits per byte) and checkpoints.

Exact resumption: the batch of a step is a pure function of (seed, step), and the
global RNG is reseeded from (seed, step, rank) before every step, so a resumed run
draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from launch.build import build_model
from launch.checkpointing import CheckpointManager, config_dict
from launch.config import Engine as EngineKind
from launch.config import ResumeMode, RunConfig
from launch.engines import build_engine
from launch.evaluation import RoutingMonitor, all_reduce_mean, evaluate
from launch.optim import learning_rate
from launch.runtime import ProcessInfo, Runtime, setup_runtime, teardown_runtime
from launch.tracking import Tracker
from moe.data import build_dataset
from moe.inference import generate
from moe.params import count_parameters
from moe.transformer import MoETransformer, lm_loss

FAIL_MARKER = "injected_failure"
EVENTS_FILE = "events.jsonl"
# Called on every rank after each checkpoint: (step, checkpoint dir, metrics) (Ray reports).
CheckpointHook = Callable[[int, Path, dict[str, float]], None]


@dataclass
class TrainResult:
    """What a rank saw: the global mean loss of every step it ran, its evaluations."""

    start_step: int
    final_step: int
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    sample: bytes = b""
    run_dir: str = ""
    model: MoETransformer | None = field(default=None, repr=False)


def _check_compatible(config: RunConfig, num_tasks: int) -> None:
    if config.data.seq_len > config.model.max_seq_len:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len="
            f"{config.model.max_seq_len}; lower data.seq_len or raise model.max_seq_len"
        )
    config.routing.validate_for_data(num_tasks)


def _maybe_fail(config: RunConfig, step: int, runtime: Runtime) -> None:
    """Test hook: the chosen rank dies abruptly the first time it reaches the step."""
    victim = 1 if runtime.info.world_size > 1 else 0
    if config.train.fail_at_step != step or runtime.info.rank != victim:
        return
    marker = Path(config.run_dir) / FAIL_MARKER
    if marker.exists():
        return
    marker.write_text(f"rank {runtime.info.rank} failed at step {step}\n")
    print(f"[rank {runtime.info.rank}] injected failure at step {step}", flush=True)
    os._exit(17)


def train(
    config: RunConfig,
    info: ProcessInfo | None = None,
    on_checkpoint: CheckpointHook | None = None,
    resume_from: Path | None = None,
) -> TrainResult:
    """Run one rank of the training run `config` (see the module docstring).

    `on_checkpoint` is called on every rank after each checkpoint (the Ray launcher
    reports it); `resume_from` names the checkpoint to resume from instead of the run's
    latest (the Ray launcher passes the one Ray restored)."""
    info = info or ProcessInfo()
    runtime = setup_runtime(
        config.comm, info, need_process_group=config.train.engine == EngineKind.DEEPSPEED
    )
    try:
        return _train(config, runtime, on_checkpoint, resume_from)
    finally:
        teardown_runtime(runtime)


def _train(
    config: RunConfig,
    runtime: Runtime,
    on_checkpoint: CheckpointHook | None,
    resume_from: Path | None,
) -> TrainResult:
    info, device, train_cfg = runtime.info, runtime.device, config.train
    run_dir = Path(config.run_dir)
    dataset = build_dataset(config.data)
    _check_compatible(config, dataset.num_tasks)
    if train_cfg.batch_size % info.world_size:
        raise ValueError(
            f"train.batch_size={train_cfg.batch_size} is not a multiple of the world size "
            f"{info.world_size}; the global batch is split evenly over the ranks"
        )
    model = build_model(config, runtime)
    model.train()
    engine = build_engine(model, train_cfg, runtime)
    sampler = dataset.sampler(
        train_cfg.batch_size, train_cfg.seed, info.rank, info.world_size, config.data.balance_tasks
    )
    checkpoints = CheckpointManager(run_dir / "checkpoints", runtime, train_cfg.keep_last)
    start_step = 0
    resumed = None
    if train_cfg.resume != ResumeMode.NEVER:
        resumed = checkpoints.load_latest(model, config, resume_from)
    elif checkpoints.latest() is not None:
        raise ValueError(
            f"train.resume=never but {checkpoints.directory} holds checkpoints; "
            "choose another run_dir or train.resume=auto"
        )
    if resumed is not None:
        start_step = resumed.step
        sampler.load_state_dict(resumed.sampler_state)
        engine.load_optimizer_state(resumed.optimizer_state)
    elif train_cfg.resume == ResumeMode.MUST:
        raise ValueError(f"train.resume=must but there is no checkpoint in {checkpoints.directory}")
    counts = count_parameters(model)
    tracker = Tracker(run_dir, config.wandb, config_dict(config), enabled=info.is_main)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _append_event(
            run_dir,
            {
                "event": "start",
                "step": start_step,
                "resumed_from": str(resumed.directory) if resumed is not None else None,
                "world_size": info.world_size,
                "ep_size": runtime.ep_size,
            },
        )
        print(
            f"[train] {counts.total:,} parameters ({counts.active:,} active non-embedding, "
            f"{counts.expert:,} in experts), world={info.world_size} ep={runtime.ep_size} "
            f"device={device}, steps {start_step}->{train_cfg.steps}"
            + (f" (resumed from step {start_step})" if resumed is not None else ""),
            flush=True,
        )
    monitor = RoutingMonitor()
    result = TrainResult(start_step=start_step, final_step=start_step, run_dir=str(run_dir))
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum * config.data.seq_len
    progress = _progress(info.is_main and train_cfg.progress, start_step, train_cfg.steps)
    window_start, window_steps, last_loss = time.perf_counter(), 0, float("nan")
    moe_time = _MoETimer(model)
    for step in range(start_step, train_cfg.steps):
        _maybe_fail(config, step, runtime)
        torch.manual_seed(train_cfg.seed * 1_000_003 + step * 1009 + info.rank)
        lr = learning_rate(step, train_cfg)
        engine.begin_step(lr)
        loss_sum, ce_sum = 0.0, 0.0
        for _ in range(train_cfg.grad_accum):
            batch = sampler.next_batch()
            tokens_BT = batch.tokens_BT.to(device)
            output = engine.module(tokens_BT[:, :-1], batch.task_ids_B.to(device))
            losses = lm_loss(output, tokens_BT[:, 1:])
            engine.backward(losses.loss)
            loss_sum += float(losses.loss.detach()) / train_cfg.grad_accum
            ce_sum += float(losses.ce.detach()) / train_cfg.grad_accum
            monitor.observe(model)
        grad_norm = engine.finish_step()
        loss, ce = all_reduce_mean([loss_sum, ce_sum], info.world_size, device)
        result.losses.append(loss)
        result.final_step = step + 1
        last_loss, window_steps = ce, window_steps + 1
        done = step + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            elapsed = time.perf_counter() - window_start
            scalars = {
                "train/loss": loss,
                "train/ce": ce,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_per_s": tokens_per_step * window_steps / max(elapsed, 1e-9),
                "train/moe_layer_time_s": moe_time.take() / window_steps,
                "train/alltoall_time_s": _take_comm_time(model) / window_steps,
                **monitor.scalars(model),
            }
            tracker.log(done, scalars)
        if done % train_cfg.eval_every == 0 or done == train_cfg.steps:
            elapsed = time.perf_counter() - window_start
            evaluation = evaluate(
                model, dataset, train_cfg.batch_size, train_cfg.eval_batches,
                info.rank, info.world_size, device,
            )  # fmt: skip
            record = {
                "step": done,
                "train_loss": last_loss,
                "val_loss": evaluation.val_loss,
                "val_bpb": evaluation.val_bpb,
                "tokens_per_s": tokens_per_step * window_steps / max(elapsed, 1e-9),
                "lr": lr,
            }
            result.evaluations.append(record)
            tracker.log_evaluation(record)
            if progress is not None:
                progress.write(
                    f"step {done}: train {last_loss:.4f}  val {evaluation.val_loss:.4f}  "
                    f"val bpb {evaluation.val_bpb:.4f}  {record['tokens_per_s']:.0f} tok/s"
                )
            window_start, window_steps = time.perf_counter(), 0
        checkpoint_due = train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0
        if checkpoint_due or done == train_cfg.steps:
            path = checkpoints.save(
                done, model, engine.optimizer_state(), sampler.state_dict(), config
            )
            if on_checkpoint is not None:
                on_checkpoint(done, path, result.evaluations[-1] if result.evaluations else {})
    if progress is not None:
        progress.close()
    moe_time.remove()
    if not result.evaluations:
        # Resumed at (or past) train.steps: nothing was trained, but report where it stands.
        evaluation = evaluate(
            model, dataset, train_cfg.batch_size, train_cfg.eval_batches,
            info.rank, info.world_size, device,
        )  # fmt: skip
        result.evaluations.append(
            {"step": start_step, "val_loss": evaluation.val_loss, "val_bpb": evaluation.val_bpb}
        )
    loads = monitor.global_load(info.world_size, device)
    heatmap = tracker.save_heatmap(loads, monitor.layer_names())
    if train_cfg.sample_tokens > 0:
        result.sample = generate(
            model,
            train_cfg.sample_prompt.encode("utf-8"),
            train_cfg.sample_tokens,
            temperature=0.8,
            top_k=40,
            task_id=0 if config.routing.needs_task_ids else None,  # a task router needs one
            seed=train_cfg.seed,
        )
    if info.is_main:
        _print_summary(result, heatmap, tracker, train_cfg.sample_prompt)
    tracker.finish()
    result.model = model
    return result


def _append_event(run_dir: Path, event: dict[str, Any]) -> None:
    """One line of `run_dir/events.jsonl`: starts and resumptions of the run."""
    with open(run_dir / EVENTS_FILE, "a") as handle:
        handle.write(json.dumps({"time": time.time(), **event}) + "\n")


def _print_summary(
    result: TrainResult, heatmap: Path | None, tracker: Tracker, prompt: str
) -> None:
    if result.evaluations:
        last = result.evaluations[-1]
        print(
            f"[train] step {last['step']}: validation loss {last['val_loss']:.4f} nats, "
            f"{last['val_bpb']:.4f} bits per byte",
            flush=True,
        )
    if result.sample:
        text = result.sample.decode("utf-8", errors="replace")
        print(f"[train] sample: {prompt}{text}", flush=True)
    print(f"[train] run directory: {result.run_dir}", flush=True)
    if heatmap is not None:
        print(f"[train] expert-load heatmap: {heatmap}", flush=True)
    if tracker.wandb_dir is not None:
        print(f"[train] wandb run: {tracker.wandb_dir}", flush=True)


def _progress(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", file=sys.stderr, dynamic_ncols=True)


def _take_comm_time(model: Any) -> float:
    """Seconds this rank spent in the MoE all-to-alls (counts and rows, forward and
    backward) since the last call, over all layers; 0 at EP=1."""
    total = 0.0
    for _, layer in model.moe_layers():
        timer = getattr(layer.dispatcher, "comm_timer", None)
        if timer is not None:
            total += timer.take()
    return total


class _MoETimer:
    """Wall time spent inside the MoE layers (router, all-to-all, experts), from
    forward hooks; on CUDA it is the host time of the launches, a lower bound."""

    def __init__(self, model: Any) -> None:
        self.total = 0.0
        self._started: dict[int, float] = {}
        self._handles = []
        for block, layer in model.moe_layers():
            self._handles.append(layer.register_forward_pre_hook(self._pre(block)))
            self._handles.append(layer.register_forward_hook(self._post(block)))

    def _pre(self, block: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._started[block] = time.perf_counter()

        return hook

    def _post(self, block: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.total += time.perf_counter() - self._started.pop(block, time.perf_counter())

        return hook

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
