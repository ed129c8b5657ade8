"""The top-level run configuration: the Hydra schema that `conf/` extends.

`RunConfig` gathers the schemas of every package (model, routing, comm, data) with the
launch-only settings (`TrainConfig`, `WandbConfig`, `run_dir`). `register_configs()` puts
the schema twin (`launch.schema`) of each in Hydra's ConfigStore under a `base_*` name so
that the YAML files in `conf/` can extend it (`defaults: [base_train, _self_]`); unknown
keys and ill-typed values then fail in Hydra, and `to_run_config()` builds the real
dataclasses, whose `__post_init__` rejects bad values with a `ValueError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from comm.alltoall import Algorithm
from launch.schema import build, hydra_schema, plain_container
from moe.config import ModelConfig
from moe.data import DataConfig
from moe.precision import ComputePrecision, parse_precision
from moe.pruning import PruneConfig
from routing.config import RoutingConfig, parse_enum

__all__ = [
    "Backend",
    "CommConfig",
    "DataConfig",
    "ModelConfig",
    "PruneConfig",
    "RayConfig",
    "ResumeMode",
    "RoutingConfig",
    "RunConfig",
    "TrainConfig",
    "TrainingEngineKind",
    "WandbConfig",
    "WandbMode",
    "register_configs",
    "to_run_config",
]


class TrainingEngineKind(str, Enum):
    """Who runs the optimizer step (`train.engine`; not the inference engine)."""

    TORCH = "torch"  # plain torch: AdamW, our gradient reduction and clipping
    DEEPSPEED = "deepspeed"  # DeepSpeed engine with ZeRO stage 1 or 2


class ResumeMode(str, Enum):
    """What to do with checkpoints already in `run_dir/checkpoints`."""

    AUTO = "auto"  # resume from the latest if there is one, else start fresh
    NEVER = "never"  # start fresh; refuse to run if checkpoints exist
    MUST = "must"  # resume from the latest; fail if there is none


class WandbMode(str, Enum):
    """wandb's own modes (`WANDB_MODE=online` in the environment overrides `offline`)."""

    OFFLINE = "offline"
    ONLINE = "online"
    DISABLED = "disabled"


def _at_least(value: float, low: float, key: str) -> None:
    if value < low:
        raise ValueError(f"{key}={value} must be >= {low}")


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpoint cadence of one run.

    The learning rate rises linearly from 0 over `warmup_steps`, then follows a cosine
    from `lr` down to `min_lr` at `steps`. One step is `grad_accum` micro-batches.

    `init_from`: a checkpoint (e.g. an imported HF model) to fine-tune: a fresh run starts
    from its weights (any EP size; a fresh optimizer), its model config replaces `model`
    and its router (kind, top_k, weight normalisation, tasks) the router fields of
    `routing`; capacity and routing losses stay the run's; its pruning masks are kept and
    its tokenizer goes into the run's checkpoints. A resumed run loads its own checkpoint
    instead (`launch.training.checkpointing.InitialWeights`).

    `precision` (`moe.precision`): fp32, bf16 (autocast over fp32 master weights), fp16
    (CUDA, with loss scaling) or auto (bf16 where the device multiplies bf16 natively,
    fp32 elsewhere; the run prints and records which and why).
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2
    seed: int = 0
    engine: TrainingEngineKind = TrainingEngineKind.TORCH
    zero_stage: int = 1
    resume: ResumeMode = ResumeMode.AUTO
    sample_tokens: int = 0
    sample_prompt: str = "In the beginning"
    progress: bool = True
    # torch.compile the model's forward and backward (launch.training.compile.CompiledStep);
    # `compile_cache_dir`: inductor's on-disk cache ("" = torch's default directory).
    compile: bool = False
    compile_cache_dir: str = ""
    # Keep freed host memory in the heap instead of unmapping it (launch.training.allocator):
    # large per-step temporaries are reused rather than page-faulted in every step.
    reuse_heap: bool = True
    precision: ComputePrecision = ComputePrecision.AUTO
    # A checkpoint (step, checkpoints or run directory) a fresh run starts from: see the
    # class docstring. Its pruning masks, if any, are kept (moe.pruning.build_pruning).
    init_from: str = ""

    def __post_init__(self) -> None:
        self.engine = parse_enum(TrainingEngineKind, self.engine, "train.engine")
        self.precision = parse_precision(self.precision, "train.precision")
        self.resume = parse_enum(ResumeMode, self.resume, "train.resume")
        for key in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every"):
            _at_least(getattr(self, key), 1, f"train.{key}")
        for key in ("warmup_steps", "checkpoint_every", "sample_tokens"):
            _at_least(getattr(self, key), 0, f"train.{key}")
        _at_least(self.keep_last, 1, "train.keep_last")
        if not self.lr > 0:
            raise ValueError(f"train.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must be in [0, train.lr={self.lr}]")
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} exceeds train.steps={self.steps}"
            )
        _at_least(self.weight_decay, 0.0, "train.weight_decay")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be in [0, 1)")
        if not self.grad_clip >= 0:
            raise ValueError(f"train.grad_clip={self.grad_clip} must be >= 0 (0 disables)")
        if self.compile and self.engine != TrainingEngineKind.TORCH:
            raise ValueError(
                f"train.compile=true needs train.engine=torch (got {self.engine.value}); "
                "DeepSpeed wraps the model itself"
            )
        if self.compile_cache_dir and not self.compile:
            raise ValueError(
                f"train.compile_cache_dir={self.compile_cache_dir!r} is set but "
                "train.compile=false; set train.compile=true or leave the cache dir empty"
            )
        if self.zero_stage not in (1, 2):
            raise ValueError(f"train.zero_stage={self.zero_stage} is not one of: 1, 2")


class Backend(str, Enum):
    """torch.distributed backend; `auto` is NCCL with CUDA, gloo without."""

    AUTO = "auto"
    GLOO = "gloo"
    NCCL = "nccl"


@dataclass
class CommConfig:
    """Expert parallelism and how the processes talk.

    `ep_size` experts shards; the world size must be a multiple of it (the rest is data
    parallelism over expert replicas). `ranks_per_node` 0 takes the launcher's local
    world size (torchrun's LOCAL_WORLD_SIZE, Ray's local world size). `alltoall` is
    `comm.alltoall.Algorithm` itself (one enum, one meaning): `flat`, `hierarchical`, or
    `auto`, which asks comm's cost model on every call which of the two is cheaper for
    the bytes at hand (so a group within one node always gets flat).
    """

    ep_size: int = 1
    ranks_per_node: int = 0
    alltoall: Algorithm = Algorithm.AUTO
    backend: Backend = Backend.AUTO
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        self.alltoall = parse_enum(Algorithm, self.alltoall, "comm.alltoall")
        self.backend = parse_enum(Backend, self.backend, "comm.backend")
        _at_least(self.ep_size, 1, "comm.ep_size")
        _at_least(self.ranks_per_node, 0, "comm.ranks_per_node")
        if not self.timeout_s > 0:
            raise ValueError(f"comm.timeout_s={self.timeout_s} must be > 0")


@dataclass
class WandbConfig:
    """Experiment tracking. The run lives in `run_dir/wandb`; offline unless told."""

    project: str = "moe-system"
    mode: WandbMode = WandbMode.OFFLINE
    name: str = ""
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mode = parse_enum(WandbMode, self.mode, "wandb.mode")
        if not self.project:
            raise ValueError("wandb.project must be a non-empty string")


@dataclass
class RayConfig:
    """How `launch.ray_train` runs the workers (ignored by torchrun).

    `num_workers` 0 means `comm.ep_size` workers; `use_gpu` None asks the cluster (GPUs
    present: one per worker). `max_failures` is how often a dead worker is replaced (the
    run then resumes from its last checkpoint). `num_cpus` sizes an embedded local Ray
    instance (0: enough for the workers); with RAY_ADDRESS set, the cluster's own count
    is used.
    """

    num_workers: int = 0
    use_gpu: bool | None = None
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    num_cpus: int = 0

    def __post_init__(self) -> None:
        _at_least(self.num_workers, 0, "ray.num_workers")
        _at_least(self.max_failures, -1, "ray.max_failures")
        _at_least(self.num_cpus, 0, "ray.num_cpus")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"ray.cpus_per_worker={self.cpus_per_worker} must be > 0")


@dataclass
class RunConfig:
    """Everything one training run needs; `run_dir` receives everything it writes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    run_dir: str = "runs/default"

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir must be a non-empty path")


_GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "routing": RoutingConfig,
    "comm": CommConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "wandb": WandbConfig,
    "ray": RayConfig,
    "prune": PruneConfig,
}


def register_configs() -> None:
    """Store the schema twin of every config in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=hydra_schema(RunConfig))
    for group, schema in _GROUPS.items():
        store.store(group=group, name=f"base_{group}", node=hydra_schema(schema))


def to_run_config(cfg: DictConfig | RunConfig | dict[str, Any]) -> RunConfig:
    """Turn a composed Hydra config (or a plain dict) into validated dataclasses.

    Missing keys take the schema defaults; every `__post_init__` runs, so a bad value
    raises a `ValueError` that names the key and the accepted values.
    """
    if isinstance(cfg, RunConfig):
        return cfg
    data = plain_container(cfg, throw_on_missing=True) if isinstance(cfg, DictConfig) else cfg
    return build(RunConfig, data)
