"""`python -m launch.generate checkpoint=P prompt="..." [overrides]`: print continuations.

    python -m launch.generate checkpoint=runs/demo prompt='And God said, '
    python -m launch.generate checkpoint=runs/demo prompt='In the beginning' \\
        temperature=0 max_tokens=200 quantize=int8 precision=bf16
    python -m launch.generate checkpoint=runs/subset_task2 prompt='Blessed are' task=2
    torchrun --nproc-per-node 2 -m launch.generate checkpoint=runs/demo \\
        'prompts=[In the beginning,And God said]'   # experts split over 2 ranks

`checkpoint` is a step directory or a run directory (its latest step); the model's
shape and tokenizer come from the checkpoint (bytes when it carries none; an imported
HF model carries its own): prompts are text, `max_tokens` counts the model's tokens, stop
strings match on the text, and the tokenizer's eos ends a completion. `max_len` (0: the
model's max_seq_len) bounds the context of each KV-cache slot. `precision=bf16` computes
with bf16 weights and a bf16 KV cache, sampling in fp32 (`moe.precision`; fp32 by
default, `auto` is bf16 where the device multiplies bf16 natively). `compile=true`
decodes through the compiled step (`moe.inference.decode`: one inductor graph per
batch-size bucket, compiled at start or, with `compile_warmup=lazy`, on first use;
`compile_cache_dir` keeps inductor's kernels for the next run); off by default here,
since a few completions rarely repay the compile (docs/INFERENCE.md). Routing is
dropless unless `routing=trained` (see `moe.inference.engine`). Under torchrun every
rank holds 1/N of every layer's experts (expert parallelism over all N ranks, the same
dispatchers as training) and decodes its share of the prompts (round-robin); rank 0
prints every completion in order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import hydra
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from launch.cli import exits_on_bad_input
from launch.config import CommConfig
from launch.runtime import (
    ProcessInfo,
    dispatcher_factory,
    process_info_from_env,
    setup_runtime,
    teardown_runtime,
)
from launch.schema import build, hydra_schema, plain_container
from launch.training.compile import use_cache_dir
from moe.inference import Completion, InferenceEngine, SamplingParams, load_model
from moe.inference.decode import CompileWarmup, DecodeCompileOptions
from moe.precision import ComputePrecision, parse_precision
from routing import CapacityOverride
from routing.config import parse_enum

CONFIG_PATH = "../conf"


class Quantization(str, Enum):
    NONE = "none"
    INT8 = "int8"  # per-output-channel int8 expert weights (moe.inference.quant)


@dataclass
class GenerateConfig:
    """What `launch.generate` runs. `prompt` (one) or `prompts` (several, decoded as one
    batch); `stop`: strings that end a completion; `top_k` 0 and `top_p` 1 are off;
    `temperature` 0 is greedy. `comm` picks the backend; the EP size is the number of
    launched ranks. `compile`, `compile_warmup`, `compile_cache_dir`: the compiled decode
    step (see the module docstring)."""

    checkpoint: str = ""
    prompt: str = ""
    prompts: list[str] = field(default_factory=list)
    task: int | None = None
    max_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    quantize: Quantization = Quantization.NONE
    precision: ComputePrecision = ComputePrecision.FP32
    routing: CapacityOverride = CapacityOverride.DROPLESS
    max_batch: int = 32
    compile: bool = False
    compile_warmup: CompileWarmup = CompileWarmup.START
    compile_cache_dir: str = ""
    max_len: int = 0
    comm: CommConfig = field(default_factory=CommConfig)

    def __post_init__(self) -> None:
        self.quantize = parse_enum(Quantization, self.quantize, "quantize")
        self.precision = parse_precision(self.precision, "precision")
        self.routing = parse_enum(CapacityOverride, self.routing, "routing")
        self.compile_warmup = parse_enum(CompileWarmup, self.compile_warmup, "compile_warmup")
        if self.compile and self.routing != CapacityOverride.DROPLESS:
            raise ValueError(
                f"compile=true needs routing=dropless (got routing={self.routing.value}): a "
                "compiled step pads its batch, and padding would take capacity"
            )
        if not self.checkpoint:
            raise ValueError("checkpoint is required: checkpoint=RUN_DIR or checkpoint=STEP_DIR")
        if bool(self.prompt) == bool(self.prompts) or any(not p for p in self.prompts):
            raise ValueError(
                f"prompt={self.prompt!r}, prompts={list(self.prompts)!r}: give exactly one of "
                "prompt (a non-empty string) or prompts (a list of non-empty strings)"
            )
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch} is invalid; accepted: >= 1")
        if self.max_len < 0:
            raise ValueError(
                f"max_len={self.max_len} is invalid; accepted: 0 (the model's) or >= 1"
            )
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} is invalid; accepted: >= 1")
        self.sampling()  # validates max_tokens, temperature, top_k, top_p, stop

    def all_prompts(self) -> list[str]:
        return list(self.prompts) if self.prompts else [self.prompt]

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, stop=tuple(self.stop), seed=self.seed,
        )  # fmt: skip


def register_generate_config() -> None:
    ConfigStore.instance().store(name="base_generate", node=hydra_schema(GenerateConfig))


def to_generate_config(cfg: DictConfig | dict[str, Any]) -> GenerateConfig:
    return build(GenerateConfig, plain_container(cfg))


def run_generate(
    config: GenerateConfig,
    info: ProcessInfo,
    compile_options: DecodeCompileOptions | None = None,
) -> list[Completion]:
    """Generate every prompt; returns, on every rank, the completions of all prompts in
    order (each rank computed its round-robin share). `compile_options` (with
    `config.compile`) replaces the ones the config gives (the Python API's finer
    control: buckets, backend)."""
    comm = CommConfig(
        ep_size=info.world_size, ranks_per_node=config.comm.ranks_per_node,
        alltoall=config.comm.alltoall, backend=config.comm.backend,
        timeout_s=config.comm.timeout_s,
    )  # fmt: skip
    runtime = setup_runtime(comm, info)
    try:
        loaded = load_model(
            config.checkpoint,
            quantize=config.quantize.value,
            dispatcher_factory=dispatcher_factory(runtime, comm),
            device=runtime.device,
            precision=config.precision,
        )
        if config.compile and config.compile_cache_dir:
            use_cache_dir(config.compile_cache_dir)
        engine = InferenceEngine(
            loaded.model, max_batch=config.max_batch, task_ids=loaded.task_ids,
            routing=config.routing, tokenizer=loaded.tokenizer, max_len=config.max_len or None,
            compile=config.compile,
            compile_options=compile_options or DecodeCompileOptions(warmup=config.compile_warmup),
        )  # fmt: skip
        report = engine.compile_report()
        if report is not None and info.is_main and report["compilations"]:
            print(f"[compile] {describe_compilation(report)}", file=sys.stderr, flush=True)
        prompts = config.all_prompts()
        mine = list(range(info.rank, len(prompts), info.world_size))
        by_request = {engine.submit(prompts[i], config.sampling(), config.task): i for i in mine}
        group = runtime.groups.ep if runtime.groups is not None else None
        done = {by_request[c.request_id]: c for c in engine.run(group)}
        if runtime.groups is None:
            return [done[i] for i in range(len(prompts))]
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, done, group=runtime.groups.ep)
        merged = {i: c for part in gathered for i, c in part.items()}
        return [merged[i] for i in range(len(prompts))]
    finally:
        teardown_runtime(runtime)


def describe_compilation(report: dict[str, Any]) -> str:
    """One line of a `CompiledDecoder.report()`: buckets compiled and seconds each."""
    each = ", ".join(
        f"{r['batch']}: {r['first_call_s']:.1f} s" for r in report["per_bucket"] if r["graphs"]
    )
    return (
        f"{report['compilations']} decode buckets compiled ({report['backend']}, "
        f"{report['graphs']} graphs) in {report['first_calls_s']:.1f} s [{each}]"
    )


@hydra.main(config_path=CONFIG_PATH, config_name="generate", version_base=None)
@exits_on_bad_input("launch.generate")
def main(cfg: DictConfig) -> None:
    info = process_info_from_env()
    config = to_generate_config(cfg)
    completions = run_generate(config, info)
    if info.is_main:
        for prompt, completion in zip(config.all_prompts(), completions):
            print(f"{prompt}{completion.text}", flush=True)
            print(
                f"[generate] {completion.completion_tokens} tokens, {completion.finish_reason}, "
                f"first token {completion.time_to_first_token_s * 1e3:.1f} ms, "
                f"{completion.per_token_latency_s * 1e3:.2f} ms/token",
                file=sys.stderr, flush=True,
            )  # fmt: skip


register_generate_config()

if __name__ == "__main__":
    main()
