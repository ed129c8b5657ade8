"""`python -m launch.export_hf checkpoint=CK out=HF_DIR`: a checkpoint in the Mixtral layout.

    python -m launch.export_hf checkpoint=runs/demo out=exported/demo
    python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('exported/demo')"

Writes config.json, the safetensors weights (sharded above `shard_gb`) and the tokenizer
files of a model whose every feature Mixtral has: SwiGLU experts in every block, the
softmax top-k router with renormalised weights, no biases, q/k norm, shared expert or
PR-MoE residual MLP. Anything else is refused, naming the feature
(`moe.interop.hf_export`, docs/MODELS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from launch.cli import exits_on_bad_input
from launch.schema import build, hydra_schema, plain_container
from moe.interop.hf_export import export_hf

CONFIG_PATH = "../conf"


@dataclass
class ExportConfig:
    """`checkpoint`: a step, checkpoints or run directory; `out`: a new directory;
    `shard_gb`: the largest weight file."""

    checkpoint: str = ""
    out: str = ""
    shard_gb: float = 5.0

    def __post_init__(self) -> None:
        for key, example in (("checkpoint", "runs/demo"), ("out", "exported/demo")):
            if not str(getattr(self, key)).strip():
                raise ValueError(f"{key} is required: {key}={example}")
        if not self.shard_gb > 0:
            raise ValueError(f"shard_gb={self.shard_gb} is invalid; accepted: > 0")


def register_export_config() -> None:
    ConfigStore.instance().store(name="base_export_hf", node=hydra_schema(ExportConfig))


def to_export_config(cfg: DictConfig | dict[str, Any]) -> ExportConfig:
    return build(ExportConfig, plain_container(cfg))


@hydra.main(config_path=CONFIG_PATH, config_name="export_hf", version_base=None)
@exits_on_bad_input("launch.export_hf")
def main(cfg: DictConfig) -> None:
    config = to_export_config(cfg)
    result = export_hf(config.checkpoint, config.out, shard_bytes=int(config.shard_gb * 2**30))
    print(
        f"[export_hf] Mixtral layout: {result.tensors} tensors, {result.weight_bytes:,} bytes "
        f"of weights -> {result.directory} ({', '.join(result.files)})",
        flush=True,
    )


register_export_config()

if __name__ == "__main__":
    main()
