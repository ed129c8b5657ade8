"""The training loop, and the training function that both launchers (torchrun and Ray) call.

`run_training(config, runtime, dataset, model, objective)` is the one loop: it builds the
optimizer engine, resumes from the latest checkpoint when there is one, and trains with
warmup + cosine LR, gradient accumulation, gradient clipping over the global norm,
periodic evaluation (validation loss and bits per byte) and checkpoints. What it
minimises is the `launch.training.objectives.Objective` it is given: `train(config, info)` (one
rank of a language-modelling run: runtime, data, model with its expert-parallel
dispatchers) passes `LanguageModelling`; `launch.training.distillation.distill` passes
`Distillation` with a frozen teacher.

Exact resumption: the batch of a step is a pure function of (seed, step), and the
global RNG is reseeded from (seed, step, rank) before every step, so a resumed run
draws exactly what the uninterrupted one drew.

Two kinds of state plug in through protocols, so the loop names neither a routing
policy nor a pruning method: stateful routing (`routing.PolicyState`, from
`model.policy_state()`) and pruning (`moe.pruning.PruningState`, from `prune` and the
masks of the checkpoint the run resumes or starts from: `train.init_from`), which
hooks around the optimizer step (`begin_step`, `before_update`, `after_update`).

Precision: `train.precision` is resolved on the run's device (`moe.precision`: `auto` is
bf16 where the device multiplies bf16 natively); the forward of every step and the
evaluations run under that autocast, the parameters stay fp32. The choice and its reason
are printed, written to events.jsonl and recorded in the run's config (meta.json of every
checkpoint, wandb): `train.precision` resolved, `precision` with what was asked and why.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launch.build import build_model
from launch.config import ResumeMode, RunConfig, TrainingEngineKind
from launch.runtime import ProcessInfo, Runtime, setup_runtime, teardown_runtime
from launch.training.allocator import reuse_heap
from launch.training.checkpointing import CheckpointManager, InitialWeights, config_dict
from launch.training.compile import training_step
from launch.training.engines import build_engine
from launch.training.evaluation import RoutingMonitor, evaluate
from launch.training.objectives import LanguageModelling, Objective
from launch.training.optim import learning_rate
from launch.training.step_log import MoETimer, StepLosses, progress_bar, take_comm_time
from launch.training.tracking import Tracker
from moe.data import TokenDataset, build_dataset
from moe.inference import generate
from moe.params import count_parameters
from moe.precision import resolve_precision
from moe.pruning import build_pruning
from moe.transformer import MoETransformer

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
    sample: str = ""
    run_dir: str = ""
    model: MoETransformer | None = field(default=None, repr=False)


def check_compatible(config: RunConfig, dataset: TokenDataset) -> None:
    """The model and routing of `config` against its data (ValueError naming the key).

    The model's vocabulary must hold every id of the data: `model.vocab_size` is at least
    the tokenizer's (equal for a new model; larger only when a model comes with a padded
    embedding); it is not set from the tokenizer, so that the config says what is trained."""
    if config.data.seq_len > config.model.max_seq_len:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len="
            f"{config.model.max_seq_len}; lower data.seq_len or raise model.max_seq_len"
        )
    if config.model.vocab_size < dataset.vocab_size:
        source = f"data.tokenizer={config.data.tokenizer}" if config.data.tokenizer else "bytes"
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the data's vocabulary "
            f"({source}: {dataset.vocab_size} tokens); set model.vocab_size={dataset.vocab_size}"
        )
    config.routing.validate_for_data(dataset.num_tasks)
    check_engine_prunes(config.prune.active, config)


def check_engine_prunes(pruning: bool, config: RunConfig) -> None:
    """Pruning needs the torch engine (ValueError otherwise)."""
    if pruning and config.train.engine != TrainingEngineKind.TORCH:
        raise ValueError(
            f"pruning (prune.method={config.prune.method.value}, or the masks of "
            f"train.init_from) needs train.engine=torch (got {config.train.engine.value}): "
            "the masks act on the gradients and weights around the optimizer step, which "
            "DeepSpeed keeps in its own buffers"
        )


def train(
    config: RunConfig,
    info: ProcessInfo | None = None,
    on_checkpoint: CheckpointHook | None = None,
    resume_from: Path | None = None,
) -> TrainResult:
    """Run one rank of the training run `config` (see the module docstring).

    `on_checkpoint` is called on every rank after each checkpoint (the Ray launcher
    reports it); `resume_from` names the checkpoint to resume from instead of the run's
    latest (the Ray launcher passes the one Ray restored). With `train.init_from` a fresh
    run starts from that checkpoint's weights, model and router (`InitialWeights`)."""
    info = info or ProcessInfo()
    initial = InitialWeights.read(config.train.init_from) if config.train.init_from else None
    if initial is not None:
        config = initial.adopt(config)
    runtime = setup_runtime(
        config.comm, info, need_process_group=config.train.engine == TrainingEngineKind.DEEPSPEED
    )
    try:
        dataset = build_dataset(config.data, progress=info.is_main and config.train.progress)
        check_compatible(config, dataset)
        check_batch(config, info.world_size)
        model = build_model(config, runtime)
        return run_training(
            config, runtime, dataset, model, LanguageModelling(), on_checkpoint, resume_from
        )
    finally:
        teardown_runtime(runtime)


def check_batch(config: RunConfig, world_size: int) -> None:
    if config.train.batch_size % world_size:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} is not a multiple of the world size "
            f"{world_size}; the global batch is split evenly over the ranks"
        )


def _resume_path(
    checkpoints: CheckpointManager, config: RunConfig, resume_from: Path | None
) -> Path | None:
    """The checkpoint this run resumes from (None: it starts fresh), by `train.resume`."""
    mode = config.train.resume
    if mode == ResumeMode.NEVER:
        if checkpoints.latest() is not None:
            raise ValueError(
                f"train.resume=never but {checkpoints.directory} holds checkpoints; "
                "choose another run_dir or train.resume=auto"
            )
        return None
    path = resume_from if resume_from is not None else checkpoints.latest()
    if path is None and mode == ResumeMode.MUST:
        raise ValueError(f"train.resume=must but there is no checkpoint in {checkpoints.directory}")
    return path


def run_training(
    config: RunConfig,
    runtime: Runtime,
    dataset: TokenDataset,
    model: MoETransformer,
    objective: Objective,
    on_checkpoint: CheckpointHook | None = None,
    resume_from: Path | None = None,
    on_fresh_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Train `model` (this rank's part, built from `config.model`) on `dataset` to
    minimise `objective` (see the module docstring); every rank calls it.

    `on_fresh_start` runs when the run starts without a checkpoint, before the optimizer
    is built (the distillation student's initialisation), then `train.init_from`'s
    weights load (`InitialWeights`: its pruning masks are kept; its tokenizer must be the
    data's); a resumed run loads its weights from the checkpoint instead. Nothing is
    written under `run_dir` before it. Every checkpoint carries the data's tokenizer
    files (none for bytes), and the sample at the end reads that tokenizer."""
    info, device, train_cfg = runtime.info, runtime.device, config.train
    if train_cfg.reuse_heap:
        reuse_heap()
    run_dir = Path(config.run_dir)
    precision = resolve_precision(train_cfg.precision, device, training=True)
    run_record = config_dict(config) | objective.config_record()
    run_record["train"]["precision"] = precision.precision.value
    run_record["precision"] = precision.record()
    initial = InitialWeights.read(train_cfg.init_from) if train_cfg.init_from else None
    checkpoints = CheckpointManager(
        run_dir / "checkpoints", runtime, train_cfg.keep_last, dataset.tokenizer
    )
    resume_path = _resume_path(checkpoints, config, resume_from)
    initial_pruning: dict[str, Any] = {}
    if resume_path is None and on_fresh_start is not None:
        on_fresh_start()
    if resume_path is None and initial is not None:
        initial.check_data(dataset.tokenizer)
        initial_pruning = initial.load(model)
        if info.is_main:
            print(f"[{objective.name}] weights from {initial.directory}", flush=True)
    model.train()
    # The state of stateful routing policies (DynaMoE); the loop knows only the protocol.
    policy_state = model.policy_state()
    sum_over_ranks = runtime.sum_over_ranks()
    engine = build_engine(model, train_cfg, runtime, precision)
    compiled = training_step(engine.module, policy_state, train_cfg)
    sampler = dataset.sampler(
        train_cfg.batch_size, train_cfg.seed, info.rank, info.world_size, config.data.balance_tasks
    )
    start_step = 0
    resumed = None
    if resume_path is not None:
        compared = ("model", "routing", "prune", *objective.config_record())
        resumed = checkpoints.load(resume_path, model, run_record, compared)
        start_step = resumed.step
        sampler.load_state_dict(resumed.sampler_state)
        policy_state.load_state_dict(resumed.routing_state)
        engine.load_optimizer_state(resumed.optimizer_state)
    # Masks and pruning schedules; the loop knows only the protocol.
    pruning = build_pruning(
        config.prune, model, resumed.pruning_state if resumed is not None else initial_pruning,
        rank=info.rank, world_size=info.world_size,
    )  # fmt: skip
    check_engine_prunes(pruning.active, config)  # the masks of train.init_from, too
    counts = count_parameters(model)
    tracker = Tracker(run_dir, config.wandb, run_record, enabled=info.is_main)
    name = objective.name
    workers = _worker_processes(runtime)
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
                "workers": workers,
                "precision": precision.record(),
            },
        )
        print(
            f"[{name}] {counts.total:,} parameters ({counts.active:,} active non-embedding, "
            f"{counts.expert:,} in experts), world={info.world_size} ep={runtime.ep_size} "
            f"device={device} precision={precision.describe()}, "
            f"steps {start_step}->{train_cfg.steps}"
            + (f" (resumed from step {start_step})" if resumed is not None else ""),
            flush=True,
        )
        if pruning.describe():
            print(f"[{name}] {pruning.describe()}", flush=True)
    monitor = RoutingMonitor()
    routed = objective.routed_model(model)
    result = TrainResult(start_step=start_step, final_step=start_step, run_dir=str(run_dir))
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum * config.data.seq_len
    progress = progress_bar(info.is_main and train_cfg.progress, start_step, train_cfg.steps, name)
    window_start, window_steps = time.perf_counter(), 0
    loss = ce = last_loss = float("nan")
    means: dict[str, float] = {}
    last_terms: dict[str, float] = {}
    step_losses = StepLosses(info.world_size, sum_over_ranks)
    last_policy: dict[str, float] = {}  # e.g. DynaMoE rebuilds, cache hit rate
    # Hooks inside a compiled model would break its graph: no MoE-layer timing there.
    moe_time = MoETimer(routed, enabled=compiled is None or routed is not model)
    for step in range(start_step, train_cfg.steps):
        torch.manual_seed(train_cfg.seed * 1_000_003 + step * 1009 + info.rank)
        lr = learning_rate(step, train_cfg)
        engine.begin_step(lr)
        pruning.begin_step(step)
        for _ in range(train_cfg.grad_accum):
            batch = sampler.next_batch()
            tokens_BT = batch.tokens_BT.to(device)
            policy_state.before_forward(batch.sample_ids_B, tokens_BT[:, :-1].numel())
            with precision.autocast(device):
                losses = objective(
                    compiled or engine.module,
                    tokens_BT[:, :-1], tokens_BT[:, 1:], batch.task_ids_B.to(device),
                )  # fmt: skip
            engine.backward(losses.loss)
            parts = {"loss": losses.loss, "ce": losses.ce, **losses.terms}
            step_losses.add(parts, 1 / train_cfg.grad_accum)
            monitor.observe(routed)
        step_losses.end_step()
        pruning.before_update(engine.gradient_scale())
        grad_norm = engine.finish_step()
        pruning.after_update()
        if compiled is not None and step == start_step:
            compiled.report_first_step(time.perf_counter() - window_start, info.is_main)
        policy_state.end_step(sum_over_ranks)
        result.final_step = done = step + 1
        window_steps += 1
        if progress is not None:
            progress.update(1)
        log_due = done % train_cfg.log_every == 0 or done == train_cfg.steps
        eval_due = done % train_cfg.eval_every == 0 or done == train_cfg.steps
        checkpoint_due = train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0
        if log_due or eval_due or checkpoint_due:
            # The global mean losses of every step since the last flush: one all-reduce.
            for means in step_losses.flush():
                loss, ce = means.pop("loss"), means.pop("ce")
                result.losses.append(loss)
            last_loss, last_terms = ce, means
            if progress is not None:
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if log_due:
            elapsed = time.perf_counter() - window_start
            last_policy = policy_state.scalars() | pruning.scalars()
            scalars = {
                "train/loss": loss,
                "train/ce": ce,
                "train/lr": lr,
                "train/grad_norm": float(grad_norm),
                **{f"train/{key}": value for key, value in means.items()},
                "train/tokens_per_s": tokens_per_step * window_steps / max(elapsed, 1e-9),
                "train/moe_layer_time_s": moe_time.take() / window_steps,
                "train/alltoall_time_s": take_comm_time(routed) / window_steps,
                **monitor.scalars(routed),
                **(compiled.scalars() if compiled is not None else {}),
                **{f"train/{key}": value for key, value in engine.scalars().items()},
                **last_policy,
            }
            tracker.log(done, scalars)
        if eval_due:
            elapsed = time.perf_counter() - window_start
            with precision.autocast(device):
                evaluation = evaluate(
                    model, dataset, train_cfg.batch_size, train_cfg.eval_batches,
                    info.rank, info.world_size, device, sum_over_ranks,
                )  # fmt: skip
            record = {
                "step": done,
                "train_loss": last_loss,
                "val_loss": evaluation.val_loss,
                "val_bpb": evaluation.val_bpb,
                "tokens_per_s": tokens_per_step * window_steps / max(elapsed, 1e-9),
                "lr": lr,
                **last_terms,
                **engine.scalars(),  # fp16: loss_scale, skipped_steps
                **{
                    k.replace("/", "_"): v
                    # The routing scalars of this step (not of the last log: a resumed
                    # run may not have logged yet, and the record must not depend on it).
                    for k, v in (monitor.scalars(routed) | last_policy).items()
                    if k.count("/") == 1
                },
                **(compiled.scalars() if compiled is not None else {}),
            }
            result.evaluations.append(record)
            tracker.log_evaluation(record)
            if progress is not None:
                progress.write(
                    f"step {done}: train {last_loss:.4f}  val {evaluation.val_loss:.4f}  "
                    f"val bpb {evaluation.val_bpb:.4f}  {record['tokens_per_s']:.0f} tok/s"
                )
            window_start, window_steps = time.perf_counter(), 0
        if checkpoint_due or done == train_cfg.steps:
            # Per-rank routing state (DynaMoE's caches) is kept only in a one-process run.
            routing_state = policy_state.state_dict(per_rank=info.world_size == 1)
            pruning_state = pruning.state_dict(sum_over_ranks)  # collective
            path = checkpoints.save(
                done, model, engine.optimizer_state(), sampler.state_dict(), run_record,
                routing_state, pruning_state,
            )  # fmt: skip
            if on_checkpoint is not None:
                on_checkpoint(done, path, result.evaluations[-1] if result.evaluations else {})
    if progress is not None:
        progress.close()
    moe_time.remove()
    if not result.evaluations:
        # Resumed at (or past) train.steps: nothing was trained, but report where it stands.
        with precision.autocast(device):
            evaluation = evaluate(
                model, dataset, train_cfg.batch_size, train_cfg.eval_batches,
                info.rank, info.world_size, device, sum_over_ranks,
            )  # fmt: skip
        result.evaluations.append(
            {"step": start_step, "val_loss": evaluation.val_loss, "val_bpb": evaluation.val_bpb}
        )
    loads = monitor.global_load(sum_over_ranks)
    heatmap = tracker.save_heatmap(loads, monitor.layer_names())
    if train_cfg.sample_tokens > 0:
        result.sample = generate(
            model,
            train_cfg.sample_prompt,
            train_cfg.sample_tokens,
            temperature=0.8,
            top_k=40,
            task_id=0 if config.routing.needs_task_ids else None,  # a task router needs one
            seed=train_cfg.seed,
            tokenizer=dataset.tokenizer,
        ).text
    if info.is_main:
        _print_summary(result, heatmap, tracker, train_cfg.sample_prompt, name)
    tracker.finish()
    result.model = model
    return result


def _worker_processes(runtime: Runtime) -> list[dict[str, Any]]:
    """Every rank's host and pid, in rank order (a collective when distributed): the events
    file names the processes of each start, so that a person (or a fault test) can find
    the process of a rank without the launcher's help."""
    mine = {"rank": runtime.info.rank, "host": socket.gethostname(), "pid": os.getpid()}
    if runtime.groups is None:
        return [mine]
    gathered: list[Any] = [None] * runtime.info.world_size
    dist.all_gather_object(gathered, mine, group=runtime.groups.world)
    return gathered


def _append_event(run_dir: Path, event: dict[str, Any]) -> None:
    """One line of `run_dir/events.jsonl`: starts and resumptions of the run."""
    with open(run_dir / EVENTS_FILE, "a") as handle:
        handle.write(json.dumps({"time": time.time(), **event}) + "\n")


def _print_summary(
    result: TrainResult, heatmap: Path | None, tracker: Tracker, prompt: str, name: str
) -> None:
    if result.evaluations:
        last = result.evaluations[-1]
        print(
            f"[{name}] step {last['step']}: validation loss {last['val_loss']:.4f} nats, "
            f"{last['val_bpb']:.4f} bits per byte",
            flush=True,
        )
    if result.sample:
        print(f"[{name}] sample: {prompt}{result.sample}", flush=True)
    print(f"[{name}] run directory: {result.run_dir}", flush=True)
    if heatmap is not None:
        print(f"[{name}] expert-load heatmap: {heatmap}", flush=True)
    if tracker.wandb_dir is not None:
        print(f"[{name}] wandb run: {tracker.wandb_dir}", flush=True)
