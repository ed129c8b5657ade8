"""`python -m launch.subset checkpoint=P task=T out=Q [overrides]`: write a task subset.

    python -m launch.subset checkpoint=runs/demo task=law out=runs/subset_law
    python -m launch.subset checkpoint=runs/demo task=3 out=runs/subset_3 coverage=0.9
    python -m launch.subset checkpoint=runs/task_moe task=2 out=runs/sub2 quantize=int8
    python -m launch.subset checkpoint=checkpoints/imported task=law out=runs/sub +data=kjv

`checkpoint` is a step directory or a run directory (its latest step); `task` a task id
or a task name of the run's data (the KJV book groups: law, history, wisdom_poetry,
prophets, gospels_acts, epistles_revelation). Task-level routing keeps each layer's K
experts of the task; token-level routing keeps the experts that carry `coverage` of the
task's routed token-slots, measured on `max_windows` of its training windows
(`moe.inference.subset`). `+data=PRESET` (with `data.*` overrides) measures on that
corpus instead of the checkpoint's own (an imported model has none). The subset loads
alone: `python -m launch.generate checkpoint=Q prompt=... task=T`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from launch.cli import exits_on_bad_input
from launch.config import register_configs
from launch.generate import Quantization
from launch.schema import build, hydra_schema, plain_container
from moe.data import DataConfig
from moe.inference.subset import SubsetResult, weight_bytes, write_subset
from moe.inference.task_usage import DEFAULT_MAX_WINDOWS, DEFAULT_SEED
from routing.config import parse_enum

CONFIG_PATH = "../conf"


@dataclass
class SubsetConfig:
    """What `launch.subset` writes: the subset of `checkpoint` for `task` into `out`.
    `coverage` in (0, 1] (token-level routing only); `max_windows` training windows of
    the task, drawn with `seed`, measure the experts' use; `data`: the corpus they come
    from (None: the checkpoint's own data config)."""

    checkpoint: str = ""
    task: str = ""
    out: str = ""
    coverage: float = 0.99
    quantize: Quantization = Quantization.NONE
    max_windows: int = DEFAULT_MAX_WINDOWS
    seed: int = DEFAULT_SEED
    data: DataConfig | None = None

    def __post_init__(self) -> None:
        self.quantize = parse_enum(Quantization, self.quantize, "quantize")
        for key, example in (("checkpoint", "runs/demo"), ("task", "law"), ("out", "runs/sub")):
            if not str(getattr(self, key)).strip():
                raise ValueError(f"{key} is required: {key}={example}")
        self.task = str(self.task)
        if not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"coverage={self.coverage} is invalid; accepted: a number in (0, 1]")
        if self.max_windows < 1:
            raise ValueError(f"max_windows={self.max_windows} is invalid; accepted: >= 1")


def register_subset_config() -> None:
    register_configs()  # the `data` group's schema (`+data=kjv`)
    ConfigStore.instance().store(name="base_subset", node=hydra_schema(SubsetConfig))


def to_subset_config(cfg: DictConfig | dict[str, Any]) -> SubsetConfig:
    return build(SubsetConfig, plain_container(cfg))


def run_subset(config: SubsetConfig) -> SubsetResult:
    return write_subset(
        config.checkpoint, config.task, config.out, coverage=config.coverage,
        quantize=config.quantize.value, max_windows=config.max_windows, seed=config.seed,
        data=config.data,
    )  # fmt: skip


def describe(result: SubsetResult) -> str:
    """Experts kept per layer and the bytes against the full checkpoint, as text."""
    full_bytes = weight_bytes(result.source)
    lines = [
        f"[subset] task {result.task}, {result.routing} routing"
        + (f", coverage {result.coverage}" if result.routing == "token" else "")
        + f" -> {result.directory}"
    ]
    for block, ids in result.experts.items():
        lines.append(
            f"[subset] block {block}: {len(ids)} of {result.num_experts[block]} experts {ids}"
        )
    lines.append(
        f"[subset] {result.checkpoint_bytes:,} bytes, {result.checkpoint_bytes / full_bytes:.1%} "
        f"of the full checkpoint's {full_bytes:,} (without optimizer state)"
    )
    return "\n".join(lines)


@hydra.main(config_path=CONFIG_PATH, config_name="subset", version_base=None)
@exits_on_bad_input("launch.subset")
def main(cfg: DictConfig) -> None:
    config = to_subset_config(cfg)
    result = run_subset(config)
    print(describe(result), flush=True)


register_subset_config()

if __name__ == "__main__":
    main()
