"""One rank of a distillation run: a frozen MoE teacher, a dense student, the trainer loop.

`distill(config, info)` is to `launch.distill` (torchrun) and `launch.ray_train` (Ray)
what `launch.training.loop.train` is to training: it reads the teacher's shape from its
checkpoint, derives the student (`moe.distill.student.student_config`: the teacher's transformer
with every FFN one expert of the expert code, `ffn_kind=expert`), checks the data
against the teacher, loads the teacher (expert-parallel over the EP group when
`comm.ep_size > 1`, dropless unless `distill.teacher_routing=trained`), initialises the
student when the run starts fresh (`distill.init`; usage measured on the run's first
`distill.usage_batches` global training batches, summed over the ranks) and hands both
to `launch.training.loop.run_training` with the `Distillation` objective.

With `distill.init=checkpoint` the student is instead the model of `train.init_from`
(its own shape, routing and weights; an MoE student is expert-parallel like a training
model): a pruned MoE (`launch.prune`) distilled from its unpruned self keeps its masks
through the run (`prune`, `moe.pruning`).

A dense student is replicated on every rank (data parallel); its one-expert FFNs are dense
parameters for the optimizer and the gradient reduction. Its checkpoints are ordinary
checkpoints (`moe.inference.load_model`, `launch.generate`); their config records the
student's `model`, plus `teacher` (the resolved step directory) and `distill`, which a
resumed run must match.

Precision: teacher and student compute in the run's `train.precision`. The teacher
keeps its checkpoint's fp32 weights and runs inside the loop's autocast with the
student (the objective calls both), and its expert usage is measured under the same
autocast; the student's fp32 parameters are the master weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from launch.build import build_model
from launch.config import (
    CommConfig,
    DataConfig,
    RayConfig,
    RoutingConfig,
    RunConfig,
    TrainConfig,
    TrainingEngineKind,
    WandbConfig,
    register_configs,
)
from launch.runtime import (
    ProcessInfo,
    Runtime,
    dispatcher_factory,
    setup_runtime,
    teardown_runtime,
)
from launch.schema import build, hydra_schema, plain_container
from launch.training.checkpointing import check_same_tokenizer, plain
from launch.training.loop import (
    CheckpointHook,
    TrainResult,
    check_batch,
    check_compatible,
    run_training,
)
from launch.training.objectives import Distillation
from moe.checkpoint import read_meta
from moe.checkpoint.experts import CheckpointExperts
from moe.data import TokenDataset, build_dataset
from moe.distill import (
    StudentInit,
    check_init,
    check_loss_settings,
    initialise_student,
    student_config,
)
from moe.inference.loading import configs_of, load_model, resolve_checkpoint
from moe.precision import resolve_precision
from moe.pruning import PruneConfig
from moe.transformer import MoETransformer
from moe.usage import ExpertUsage
from routing import CapacityOverride
from routing.config import parse_enum


@dataclass
class DistillConfig:
    """The `distill` group: the loss (`temperature` T > 0, `alpha` >= 0 the weight of the
    hard-label cross entropy), the student's FFN `width` (0: the teacher's active width
    top_k * expert_hidden), its initialisation `init`, the number of training batches
    `usage_batches` on which the teacher's expert usage is measured for `top`/`merge`
    (the run's first global batches), and the teacher's routing."""

    temperature: float = 2.0
    alpha: float = 0.5
    width: int = 0
    init: StudentInit = StudentInit.TOP
    usage_batches: int = 8
    teacher_routing: CapacityOverride = CapacityOverride.DROPLESS

    def __post_init__(self) -> None:
        self.init = parse_enum(StudentInit, self.init, "distill.init")
        self.teacher_routing = parse_enum(
            CapacityOverride, self.teacher_routing, "distill.teacher_routing"
        )
        check_loss_settings(self.temperature, self.alpha)
        if not isinstance(self.width, int) or self.width < 0:
            raise ValueError(
                f"distill.width={self.width} is invalid; accepted: 0 (the teacher's active "
                "width top_k * expert_hidden) or a positive integer"
            )
        if self.usage_batches < 1:
            raise ValueError(
                f"distill.usage_batches={self.usage_batches} is invalid; accepted: >= 1"
            )


@dataclass
class DistillRunConfig:
    """Everything one distillation run needs. `teacher`: a checkpoint step directory or
    a run directory (its latest step); the student's shape comes from it."""

    teacher: str = ""
    distill: DistillConfig = field(default_factory=DistillConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    run_dir: str = "runs/distill"

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ValueError("teacher is required: teacher=RUN_DIR or teacher=STEP_DIR")
        if not self.run_dir:
            raise ValueError("run_dir must be a non-empty path")
        from_checkpoint = self.distill.init == StudentInit.CHECKPOINT
        if from_checkpoint != bool(self.train.init_from):
            raise ValueError(
                f"distill.init={self.distill.init.value} with train.init_from="
                f"{self.train.init_from!r}; accepted: distill.init=checkpoint together with "
                "train.init_from=STUDENT_CHECKPOINT (the student is that checkpoint's model), "
                "or another distill.init without train.init_from"
            )


@dataclass(frozen=True)
class Teacher:
    """The teacher's checkpoint and what it says about the model."""

    checkpoint: Path
    meta: dict[str, Any]
    model: Any  # moe.config.ModelConfig
    routing: RoutingConfig | None


def read_teacher(path: str, key: str = "teacher") -> Teacher:
    """Resolve and read the teacher checkpoint (ValueError naming `key`=`path` when it
    is not one); `key="train.init_from"` reads a checkpoint student the same way."""
    try:
        checkpoint = resolve_checkpoint(path)
        meta = read_meta(checkpoint)
        model, routing = configs_of(meta)
    except ValueError as error:
        raise ValueError(f"{key}={path!r} cannot be read: {error}") from None
    return Teacher(checkpoint, meta, model, routing)


def student_run_config(config: DistillRunConfig, teacher: Teacher) -> RunConfig:
    """The student's run: its model from the teacher (`distill.init=checkpoint`: the
    model and routing of `train.init_from`); comm, data, train... from `config`. A dense
    student's `routing` is unused: the defaults."""
    if config.distill.init == StudentInit.CHECKPOINT:
        student = read_teacher(config.train.init_from, "train.init_from")
        model, routing = student.model, student.routing or RoutingConfig()
        if model.vocab_size != teacher.model.vocab_size:
            raise ValueError(
                f"the student train.init_from={config.train.init_from!r} has vocab_size="
                f"{model.vocab_size} but the teacher has {teacher.model.vocab_size}"
            )
    else:
        model = student_config(teacher.model, teacher.routing, config.distill.width)
        routing = RoutingConfig()
        check_init(teacher.model, model.ffn_hidden, config.distill.init)
    return RunConfig(
        model=model, routing=routing, comm=config.comm, data=config.data,
        train=config.train, wandb=config.wandb, ray=config.ray, prune=config.prune,
        run_dir=config.run_dir,
    )  # fmt: skip


def check_teacher_fits(teacher: Teacher, dataset: TokenDataset, config: DistillRunConfig) -> None:
    """The teacher against the data: the same vocabulary, windows it can read, a task id
    for every task when it routes by task."""
    vocab = teacher.model.vocab_size
    if vocab != dataset.vocab_size:
        raise ValueError(
            f"teacher {teacher.checkpoint} has vocab_size={vocab} but data.source="
            f"{config.data.source.value} has a vocabulary of {dataset.vocab_size}; distill on "
            "data with the teacher's vocabulary"
        )
    check_same_tokenizer(teacher.checkpoint, teacher.meta, dataset.tokenizer)
    if teacher.routing is not None:
        teacher.routing.validate_for_data(dataset.num_tasks)


def load_teacher(teacher: Teacher, runtime: Runtime, config: DistillRunConfig) -> MoETransformer:
    """The frozen teacher on this rank: its experts sharded over the EP group like a
    training model's, dropless unless `distill.teacher_routing=trained`."""
    loaded = load_model(
        teacher.checkpoint,
        dispatcher_factory=dispatcher_factory(runtime, config.comm),
        device=runtime.device,
    )
    model = loaded.model
    model.override_capacity(config.distill.teacher_routing)
    return model.eval().requires_grad_(False)


def teacher_usage(
    teacher: MoETransformer,
    dataset: TokenDataset,
    config: DistillRunConfig,
    runtime: Runtime,
) -> dict[int, torch.Tensor]:
    """Slots routed to each expert over the run's first `distill.usage_batches` global
    training batches (every rank its share, summed over the ranks)."""
    info, train = runtime.info, config.train
    sampler = dataset.sampler(
        train.batch_size, train.seed, info.rank, info.world_size, config.data.balance_tasks
    )
    usage = ExpertUsage()
    # The usage the run's forward would see: the teacher in the run's precision.
    precision = resolve_precision(train.precision, runtime.device, training=True)
    with torch.no_grad(), precision.autocast(runtime.device):
        for _ in range(config.distill.usage_batches):
            batch = sampler.next_batch()
            tokens_BT = batch.tokens_BT[:, :-1].to(runtime.device)
            teacher(tokens_BT, batch.task_ids_B.to(runtime.device))
            usage.observe(teacher)
    return usage.totals(runtime.sum_over_ranks())


def distill(
    config: DistillRunConfig,
    info: ProcessInfo | None = None,
    on_checkpoint: CheckpointHook | None = None,
    resume_from: Path | None = None,
) -> TrainResult:
    """Run one rank of the distillation run `config` (see the module docstring). Bad
    input (a teacher that is not a checkpoint, a bad width, a teacher that does not fit
    the data) raises ValueError before anything is written under `run_dir`."""
    info = info or ProcessInfo()
    teacher = read_teacher(config.teacher)
    run_config = student_run_config(config, teacher)
    runtime = setup_runtime(
        config.comm, info, need_process_group=config.train.engine == TrainingEngineKind.DEEPSPEED
    )
    try:
        dataset = build_dataset(config.data, progress=info.is_main and config.train.progress)
        check_teacher_fits(teacher, dataset, config)
        check_compatible(run_config, dataset)
        check_batch(run_config, info.world_size)
        teacher_model = load_teacher(teacher, runtime, config)
        student = build_model(run_config, runtime)
        record = {
            "teacher": str(teacher.checkpoint.resolve()),
            "distill": plain(config.distill),
        }
        objective = Distillation(
            teacher_model, config.distill.temperature, config.distill.alpha, record
        )

        def initialise() -> None:
            init = config.distill.init
            if init == StudentInit.CHECKPOINT:
                return  # the loop loads train.init_from
            usage = {}
            if init != StudentInit.RANDOM and teacher_model.moe_layers():
                usage = teacher_usage(teacher_model, dataset, config, runtime)
            report = initialise_student(
                student,
                teacher_model,
                init,
                usage,
                CheckpointExperts(teacher.checkpoint, teacher.meta),
            )
            if info.is_main:
                summary = "; ".join(f"block {b}: {how}" for b, how in report.items())
                print(
                    f"[distill] student FFN width {run_config.model.ffn_hidden}, init="
                    f"{init.value}" + (f" ({summary})" if summary else ""),
                    flush=True,
                )

        return run_training(
            run_config, runtime, dataset, student, objective, on_checkpoint, resume_from,
            on_fresh_start=initialise,
        )  # fmt: skip
    finally:
        teardown_runtime(runtime)


def register_distill_configs() -> None:
    """The training schemas (`launch.config.register_configs`) plus the root schema of
    `conf/distill.yaml` and the `distill` group's (idempotent)."""
    register_configs()
    store = ConfigStore.instance()
    store.store(name="base_distill_config", node=hydra_schema(DistillRunConfig))
    store.store(group="distill", name="base_distill", node=hydra_schema(DistillConfig))


def to_distill_config(cfg: DictConfig | DistillRunConfig | dict[str, Any]) -> DistillRunConfig:
    """A composed `conf/distill.yaml` (or a plain dict) as validated dataclasses."""
    if isinstance(cfg, DistillRunConfig):
        return cfg
    data = plain_container(cfg, throw_on_missing=True) if isinstance(cfg, DictConfig) else cfg
    return build(DistillRunConfig, data)
