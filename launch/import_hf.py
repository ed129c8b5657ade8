"""`python -m launch.import_hf path=HF_DIR out=OUT`: a HF MoE model as a checkpoint.

    python -m launch.import_hf path=models/Mixtral-8x7B-v0.1 out=checkpoints/mixtral
    python -m launch.import_hf path=models/OLMoE-1B-7B-0924 out=checkpoints/olmoe dtype=float32
    python -m launch.generate checkpoint=checkpoints/olmoe prompt='The capital of France is'

Reads a Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE directory (config.json, safetensors
weights, single or sharded, either expert layout, tokenizer.json) and writes the
project's checkpoint into `out` (step 0; one file per expert; the tokenizer files as
attachments), tensor by tensor (`moe.interop.hf_import`). What the model cannot compute
exactly is refused, naming the field or tensor, before anything is written. `dtype`
(float32, bfloat16, float16) converts every tensor; by default they keep their stored
dtype. See docs/MODELS.md.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from launch.cli import exits_on_bad_input
from launch.schema import build, hydra_schema, plain_container
from moe.interop.hf_import import DTYPES, ImportResult, import_hf

CONFIG_PATH = "../conf"


@dataclass
class ImportConfig:
    """`path`: the HF model directory; `out`: a new checkpoint directory; `dtype`: ""
    (keep the stored dtypes) or one of float32, bfloat16, float16."""

    path: str = ""
    out: str = ""
    dtype: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        for key, example in (("path", "models/Mixtral-8x7B-v0.1"), ("out", "checkpoints/mixtral")):
            if not str(getattr(self, key)).strip():
                raise ValueError(f"{key} is required: {key}={example}")
        if self.dtype and self.dtype not in DTYPES:
            raise ValueError(
                f"dtype={self.dtype!r} is invalid; accepted: '' (as stored), {', '.join(DTYPES)}"
            )


def register_import_config() -> None:
    ConfigStore.instance().store(name="base_import_hf", node=hydra_schema(ImportConfig))


def to_import_config(cfg: DictConfig | dict[str, Any]) -> ImportConfig:
    return build(ImportConfig, plain_container(cfg))


def peak_resident_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux (of this program's memory map;
    `ru_maxrss` would carry the parent's peak across fork and exec), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def describe(result: ImportResult, seconds: float) -> str:
    model, routing = result.model, result.routing
    experts = f"{model.num_experts} experts, top-{routing.top_k}" if routing else "dense"
    peak = peak_resident_bytes()
    return (
        f"[import_hf] {result.model_type}: {model.n_layers} blocks, width {model.d_model}, "
        f"{experts}, vocabulary {model.vocab_size}, tokenizer {result.tokenizer!r}\n"
        f"[import_hf] {result.tensors} tensors, {result.checkpoint_bytes:,} bytes in "
        f"{seconds:.1f} s, peak resident memory {peak:,} bytes -> {result.directory}"
    )


@hydra.main(config_path=CONFIG_PATH, config_name="import_hf", version_base=None)
@exits_on_bad_input("launch.import_hf")
def main(cfg: DictConfig) -> None:
    config = to_import_config(cfg)
    start = time.perf_counter()
    result = import_hf(config.path, config.out, dtype=config.dtype or None,
                       progress=config.progress and sys.stderr.isatty())  # fmt: skip
    print(describe(result, time.perf_counter() - start), flush=True)


register_import_config()

if __name__ == "__main__":
    main()
