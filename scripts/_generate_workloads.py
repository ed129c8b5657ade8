"""The workloads of `scripts/bench_generate.py`: the variants of the checkpoint, the
prompts, one timed serving of a batch of requests, and what its decode steps read.

- `build_variants`: fp32 (`load_model`), a task subset (`--subset`, else written by
  `write_subset(checkpoint, --task, coverage=0.99)` into the benchmark's temporary
  directory) and int8 experts (`load_model(quantize="int8")`); with `--precision` bf16
  also the bf16 model and its int8-expert twin (`load_model(precision="bf16")`); with
  `--compile`, the fp32 checkpoint decoding through the compiled step
  (`InferenceEngine(compile=True)`: one engine of `max_batch` = the largest B, its
  buckets compiled when it is built, kept for every measurement); a variant whose module
  does not import is skipped with the reason printed;
- `validation_prompts`: distinct windows of the task's validation text;
- `run_requests`: B prompts submitted at once to a fresh `InferenceEngine(max_batch=B)`,
  greedy, each step timed (`_engine_timing.engine_step_seconds`): the first step
  prefills every prompt, the others decode one token per request;
- `count_traffic`: the same run, untimed (the warm-up), counting the experts each decode
  step routes to (a forward hook on the routers); from them the bytes a decode step
  reads (non-expert parameters, the experts touched, the KV cache) and its FLOPs.

Shapes: B requests (batch), P prompt bytes, N new tokens per request, E experts of a
layer, K experts per token.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _engine_timing import engine_step_seconds

from moe.data import DataConfig, build_corpus
from moe.experts import Activation, expert_parameter_ids
from moe.inference import InferenceEngine, LoadedModel, SamplingParams, load_model
from moe.inference.decode import DecodeCompileOptions
from moe.transformer import MoETransformer

SUBSET_COVERAGE = 0.99


@dataclass
class Variant:
    name: str
    loaded: LoadedModel
    task_id: int | None  # what every request names (None: the model needs none)
    engine: InferenceEngine | None = None  # kept across measurements (compiled)

    @property
    def compute_dtype(self) -> str:
        """The matmul dtype of this variant's compute floor ("fp32" or "bf16")."""
        return self.loaded.precision.precision.value


@dataclass
class Timing:
    prefill_s: float
    decode_s: float


@dataclass
class Traffic:
    """What one decode step reads, averaged over the decode steps of a measurement."""

    bytes_per_step: float
    experts_per_layer: float  # held by the model (a subset holds fewer)
    experts_touched_per_layer: float  # counted from the routing
    experts_expected_per_layer: float  # E * (1 - (1 - K/E)^B)
    flops_per_step: float


@dataclass
class Measurement:
    variant: Variant
    batch: int
    traffic: Traffic
    timings: list[Timing] = field(default_factory=list)


# --- requests ------------------------------------------------------------------------


def validation_prompts(loaded: LoadedModel, task: int, count: int, prompt_len: int) -> list[bytes]:
    """`count` distinct, non-overlapping windows of `prompt_len` bytes from task `task`'s
    validation text (then its training text) in the checkpoint's own corpus."""
    if not loaded.run_config.get("data"):
        raise ValueError(f"checkpoint {loaded.checkpoint} has no data config to take prompts from")
    corpus = build_corpus(DataConfig(**loaded.run_config["data"]))
    if not 0 <= task < corpus.num_tasks:
        raise ValueError(
            f"--task={task} is not a task of the checkpoint's data; accepted: "
            f"0..{corpus.num_tasks - 1} ({', '.join(corpus.task_names)})"
        )
    stream_N = torch.cat([corpus.val_N[task], corpus.train_N[task]])
    if len(stream_N) < count * prompt_len:
        raise ValueError(
            f"task {task} has {len(stream_N)} bytes, fewer than {count} prompts of "
            f"--prompt-len={prompt_len}"
        )
    return [bytes(stream_N[i * prompt_len : (i + 1) * prompt_len].tolist()) for i in range(count)]


def run_requests(
    variant: Variant,
    prompts: list[bytes],
    new_tokens: int,
    before_step: Callable[[int], None] | None = None,
) -> Timing:
    """Serve `prompts` at once, greedy (`_engine_timing.engine_step_seconds`); the first
    step's time and the decode steps'. `before_step(i)` runs untimed before step i."""
    model = variant.loaded.model
    batch = len(prompts)
    engine = variant.engine or InferenceEngine(
        model,
        max_batch=batch,
        max_step_tokens=max(model.config.max_seq_len, sum(len(p) for p in prompts)),
        task_ids=variant.loaded.task_ids,
        tokenizer=variant.loaded.tokenizer,
    )
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    seconds = engine_step_seconds(
        engine, prompts, params, variant.task_id, before_step, check_prefill=True,
        restore=variant.engine is None,
    )  # fmt: skip
    assert len(seconds) == new_tokens, f"{len(seconds)} steps for {new_tokens} tokens"
    return Timing(prefill_s=seconds[0], decode_s=sum(seconds[1:]))


# --- bytes and FLOPs of a decode step -------------------------------------------------


def non_expert_bytes(model: MoETransformer) -> int:
    """Bytes of every non-expert parameter, once each. An untied input embedding counts
    whole although a step reads B rows of it (an overestimate of 256 x D here)."""
    experts = expert_parameter_ids(model)
    return sum(p.nbytes for p in model.parameters() if id(p) not in experts)


def count_traffic(variant: Variant, prompts: list[bytes], new_tokens: int) -> Traffic:
    """Run the requests once, untimed, counting the experts each decode step routes to
    (this is also the warm-up of the measurement)."""
    model = variant.loaded.model
    batch, config = len(prompts), model.config
    layers = model.moe_layers()
    expert_bytes = {
        block: sum(t.nbytes for t in layer.experts.state_dict().values())
        / layer.experts.num_experts
        for block, layer in layers
    }
    touched: list[dict[int, int]] = []  # per decode step: block -> experts with tokens
    decoding = [False]

    def hook_for(block: int) -> Callable:
        def hook(module: torch.nn.Module, args: object, plan: object) -> None:
            if decoding[0]:
                touched[-1][block] = int((plan.counts_E > 0).sum())  # type: ignore[attr-defined]

        return hook

    def before_step(index: int) -> None:
        decoding[0] = index > 0
        if decoding[0]:
            touched.append({})

    handles = [layer.router.register_forward_hook(hook_for(b)) for b, layer in layers]
    try:
        run_requests(variant, prompts, new_tokens, before_step)
    finally:
        for handle in handles:
            handle.remove()
    steps = new_tokens - 1
    expert_read = sum(
        count * expert_bytes[block] for step in touched for block, count in step.items()
    ) / max(1, steps)
    # Decode step j (1..N-1) attends P + j positions of every sequence's cache.
    prompt_len = statistics.mean(len(p) for p in prompts)
    kv_bytes_per_position = (
        len(model.blocks) * 2 * config.n_kv_heads * config.head_dim
        * model.embed.weight.element_size()
    )  # fmt: skip
    kv_read = batch * (prompt_len + new_tokens / 2) * kv_bytes_per_position
    expected = [
        layer.experts.num_experts
        * (1 - (1 - layer.routing.top_k / layer.experts.num_experts) ** batch)
        for _, layer in layers
    ]
    experts = expert_parameter_ids(model)
    dense_params = sum(p.numel() for p in model.parameters() if id(p) not in experts)
    active_expert_params = sum(
        layer.routing.top_k
        * (3 if layer.experts.activation == Activation.SWIGLU else 2)
        * layer.experts.d_model
        * layer.experts.d_hidden
        for _, layer in layers
    )
    return Traffic(
        bytes_per_step=non_expert_bytes(model) + expert_read + kv_read,
        experts_per_layer=statistics.mean(layer.experts.num_experts for _, layer in layers)
        if layers
        else 0.0,
        experts_touched_per_layer=sum(sum(s.values()) for s in touched)
        / max(1, steps * len(layers)),
        experts_expected_per_layer=statistics.mean(expected) if expected else 0.0,
        flops_per_step=2.0 * (dense_params + active_expert_params) * batch,
    )


# --- variants -------------------------------------------------------------------------


def module_missing(module: str) -> str | None:
    """Why `module` does not import, or None when it does."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        return f"{module} is not importable yet ({error})"
    return None


def build_variants(args: argparse.Namespace, workdir: Path) -> list[Variant]:
    fp32 = load_model(args.checkpoint)
    max_len = fp32.model.config.max_seq_len
    if args.prompt_len + args.new_tokens - 1 > max_len:
        raise ValueError(
            f"--prompt-len={args.prompt_len} + --new-tokens={args.new_tokens} - 1 exceeds "
            f"the model's max_seq_len={max_len}: the cache slot would refill mid-decode"
        )
    fp32_task = args.task if fp32.task_ids is not None else None
    variants = [Variant("fp32", fp32, fp32_task)]
    reason = module_missing("moe.inference.subset")
    if reason is not None:
        print(f"skipping subset: {reason}")
    else:
        path = args.subset
        if path is None:
            from moe.inference.subset import write_subset

            print(f"writing the task {args.task} subset (coverage {SUBSET_COVERAGE}) ...")
            path = write_subset(args.checkpoint, args.task, workdir / "subset",
                                coverage=SUBSET_COVERAGE).directory  # fmt: skip
        variants.append(Variant("subset", load_model(path), args.task))
    reason = module_missing("moe.inference.quant")
    if reason is not None:
        print(f"skipping int8: {reason}")
    else:
        variants.append(Variant("int8", load_model(args.checkpoint, quantize="int8"), fp32_task))
        if "bf16" in args.precision:
            int8_bf16 = load_model(args.checkpoint, quantize="int8", precision="bf16")
            variants.append(Variant("int8_bf16", int8_bf16, fp32_task))
    if "bf16" in args.precision:
        bf16 = Variant("bf16", load_model(args.checkpoint, precision="bf16"), fp32_task)
        variants.insert(1, bf16)
    if "fp32" not in args.precision:
        variants = [v for v in variants if v.name not in ("fp32", "subset", "int8")]
    if args.compile:
        for layout in args.compile_layouts:  # "compiled" is the padded layout's
            compiled = load_model(args.checkpoint)
            engine = InferenceEngine(
                compiled.model, max_batch=max(args.batches), task_ids=compiled.task_ids,
                tokenizer=compiled.tokenizer,
                max_step_tokens=max(max_len, max(args.batches) * args.prompt_len), compile=True,
                compile_options=DecodeCompileOptions(backend=args.compile_backend,
                                                     expert_layout=layout),
            )  # fmt: skip
            name = "compiled" if layout == "padded" else f"compiled_{layout}"
            variants.append(Variant(name, compiled, fp32_task, engine))
    return variants
