"""`python -m launch.prune checkpoint=CK out=OUT [overrides]`: prune a checkpoint in one
shot and write an ordinary checkpoint.

    python -m launch.prune checkpoint=runs/demo out=runs/demo_s50 prune.sparsity=0.5
    python -m launch.prune checkpoint=runs/demo out=runs/demo_24 prune.pattern=2:4 \\
        prune.permute=true
    python -m launch.prune checkpoint=runs/demo out=runs/demo_24_int8 prune.pattern=2:4 \\
        prune.scope=all quantize=int8 eval_batches=8

`prune.method=magnitude` (the default here): unstructured to `prune.sparsity` (per
matrix, or `prune.granularity=global`) or N:M along each weight's reduction dimension
(`prune.pattern=2:4`), optionally after Pool & Yu's channel permutation of the expert
hidden units (`prune.permute=true`); `prune.scope=experts|dense|all` (`moe.pruning`).
The output loads wherever a checkpoint does (generate, subset, serve, distill;
`train.init_from` fine-tunes it with its masks kept) and records the masks and the
report in its meta.json. It prints the sparsity, the magnitude kept (with and without
the permutation) and the expert memory: dense, int8, and what a packed N:M format
would take (on CUDA sm80+ `moe.pruning.semi_structured` runs 2:4 experts packed).
`quantize=int8` stores the pruned experts int8. `eval_batches` > 0 also reports the
validation bits per byte before and after, on the checkpoint's own data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from launch.cli import exits_on_bad_input
from launch.generate import Quantization
from launch.schema import build, hydra_schema
from launch.training.evaluation import evaluate
from moe.checkpoint import read_meta
from moe.data import DataConfig, build_dataset
from moe.inference.loading import resolve_checkpoint
from moe.pruning import PruneConfig, PruneMethod
from moe.pruning.write import PruneResult, write_pruned
from moe.transformer import MoETransformer
from routing import CapacityOverride
from routing.config import parse_enum

CONFIG_PATH = "../conf"


@dataclass
class PruneRunConfig:
    """What `launch.prune` writes: `checkpoint` pruned as `prune` says into `out`;
    `quantize` the experts afterwards; `eval_batches` validation batches of
    `eval_batch_size` rows before and after (0: no evaluation); `report`: also write the
    report as JSON to this path."""

    checkpoint: str = ""
    out: str = ""
    prune: PruneConfig = field(default_factory=PruneConfig)
    quantize: Quantization = Quantization.NONE
    eval_batches: int = 0
    eval_batch_size: int = 32
    report: str = ""

    def __post_init__(self) -> None:
        self.quantize = parse_enum(Quantization, self.quantize, "quantize")
        for key, example in (("checkpoint", "runs/demo"), ("out", "runs/demo_pruned")):
            if not str(getattr(self, key)).strip():
                raise ValueError(f"{key} is required: {key}={example}")
        if self.prune.method != PruneMethod.MAGNITUDE:
            raise ValueError(
                f"prune.method={self.prune.method.value} is invalid for launch.prune; "
                "accepted: magnitude (gradual and sr_ste prune while training: launch.train "
                "or launch.distill with prune.method=...)"
            )
        if self.eval_batches < 0 or self.eval_batch_size < 1:
            raise ValueError(
                f"eval_batches={self.eval_batches}, eval_batch_size={self.eval_batch_size} "
                "are invalid; accepted: eval_batches >= 0, eval_batch_size >= 1"
            )


def register_prune_config() -> None:
    store = ConfigStore.instance()
    store.store(name="base_prune_run", node=hydra_schema(PruneRunConfig))


def to_prune_config(cfg: DictConfig | dict[str, Any]) -> PruneRunConfig:
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    data = {k: v for k, v in data.items() if k != "hydra"}  # type: ignore[union-attr]
    return build(PruneRunConfig, data)


def _evaluator(config: PruneRunConfig) -> Any:
    """bits per byte on the checkpoint's own validation data (dropless routing)."""
    if config.eval_batches == 0:
        return None
    run_config = read_meta(resolve_checkpoint(config.checkpoint))["config"]
    if not run_config.get("data"):
        raise ValueError(
            f"eval_batches={config.eval_batches} but checkpoint {config.checkpoint} records "
            "no data config; use eval_batches=0"
        )
    dataset = build_dataset(DataConfig(**run_config["data"]))

    def bits_per_byte(model: MoETransformer) -> float:
        with model.capacity_override(CapacityOverride.DROPLESS):
            result = evaluate(
                model, dataset, config.eval_batch_size, config.eval_batches, 0, 1,
                torch.device("cpu"),
            )  # fmt: skip
        return result.val_bpb

    return bits_per_byte


def run_prune(config: PruneRunConfig) -> PruneResult:
    return write_pruned(
        config.checkpoint, config.out, config.prune, config.quantize.value,
        evaluate=_evaluator(config),
    )  # fmt: skip


def describe(result: PruneResult) -> str:
    """The report as text: sparsity, magnitude kept, memory, evaluation."""
    report = result.report
    lines = [
        f"[prune] {result.source} -> {result.directory}",
        f"[prune] sparsity {report.sparsity:.4f} of the pruned weights; magnitude kept "
        f"{report.kept:.4f}"
        + (
            f" (without the permutation {report.kept_without_permutation:.4f})"
            if report.kept_without_permutation is not None
            else ""
        ),
    ]
    for record in report.permutation:
        lines.append(
            f"[prune] {record['weight']}: N:M keeps {record['magnitude_kept_without']:.4f} "
            f"of |w| in the original order, {record['magnitude_kept_with']:.4f} permuted "
            f"({record['swaps']} swaps over {record['matrices']} matrices)"
        )
    if report.memory:
        dense = report.memory["dense"]
        formats = ", ".join(
            f"{name} {size:,} B ({size / dense:.1%})" for name, size in report.memory.items()
        )
        lines.append(f"[prune] expert weights: {formats}")
        lines.append(
            f"[prune] expert files on disk: {result.expert_file_bytes:,} B (source "
            f"{result.source_expert_file_bytes:,} B); on the CPU pruned weights stay "
            "dense with zeros"
        )
    for key, value in result.evaluation.items():
        lines.append(f"[prune] {key.replace('_', ' ')}: {value:.4f}")
    return "\n".join(lines)


@hydra.main(config_path=CONFIG_PATH, config_name="prune", version_base=None)
@exits_on_bad_input("launch.prune")
def main(cfg: DictConfig) -> None:
    config = to_prune_config(cfg)
    result = run_prune(config)
    print(describe(result), flush=True)
    if config.report:
        path = Path(config.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "source": str(result.source), "checkpoint": str(result.directory),
            "expert_file_bytes": result.expert_file_bytes,
            "source_expert_file_bytes": result.source_expert_file_bytes,
            "evaluation": result.evaluation, **result.report.as_dict(),
        }  # fmt: skip
        path.write_text(json.dumps(payload, indent=1))


register_prune_config()

if __name__ == "__main__":
    main()
