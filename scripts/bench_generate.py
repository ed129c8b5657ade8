"""Benchmark of batched generation on CPU: prefill and decode tokens/s of the inference
engine at several batch sizes, each decode figure against this machine's floor.

Variants (one checkpoint, built three ways):
- fp32:   the checkpoint as trained (`load_model`);
- subset: a task subset checkpoint, `--subset`, or else written once into a temporary
          directory by `write_subset(checkpoint, --task, coverage=0.99)`; requests carry
          the task id;
- int8:   `load_model(quantize="int8")`: int8 weight-only experts;
- compiled (`--compile`): the fp32 checkpoint decoding through the compiled step
          (`InferenceEngine(compile=True)`, `moe.inference.decode`): one engine of
          `max_batch` = the largest B, built (and its buckets compiled, timed and
          reported under "compile") before the measurements, reused by every B. Its
          floor is fp32's (same model, same routing); note its padded MoE layout reads
          every expert of a layer, which the floor does not count.
A variant whose module (`moe.inference.subset`, `moe.inference.quant`) does not import
is skipped with the reason printed.

One measurement (variant, B): B distinct prompts of `--prompt-len` bytes from the
validation text of task `--task` (the checkpoint's own data config, the KJV for the
demo runs), greedy, `max_tokens=--new-tokens`, all submitted to a fresh
`InferenceEngine(max_batch=B)`. The first `step()` prefills every prompt in one call
and samples each first token; the other new_tokens - 1 steps decode one token per
request. prefill tokens/s = B * prompt_len / first step; decode tokens/s =
B * (new_tokens - 1) / the decode steps. B = 1 is "one request at a time", the baseline
of the target: decode tokens/s at the largest B over B = 1 (issue 7 asks >= 8 at 32).
Every (variant, B) runs once untimed first (warm-up; it also counts the routing, see
below); the timed rounds then run every (variant, B) once each, the first one rotating
from round to round (`_bench_utils.interleaved_times`); figures are medians.

Floor of a decode step (Pope et al. 2022; METHODS.md "Inference cost"):
- memory: bytes read / read bandwidth. Bytes = every non-expert parameter (tied
  embeddings once) + per MoE layer the experts the step touched x bytes per expert (the
  nbytes of the expert tensors: fp32 weights, or int8 weights + fp32 scales) + the KV
  cache read (each sequence's length x blocks x 2 x kv heads x head width x 4 bytes),
  averaged over the decode steps. Experts touched are counted from the routing of each
  decode step (a forward hook on the routers, in the untimed run); the uniform-routing
  expectation E * (1 - (1 - K/E)^B) is reported beside them.
- compute: 2 * active parameters * B FLOPs over the FLOP/s of a large fp32 matmul.
Bandwidth is measured in the same run: the median time of `torch.sum` over a buffer far
larger than the last-level cache (and of a copy, reported). `floor_fraction` = memory
floor / measured step (1.0 = at the floor); `roofline_fraction` uses max(memory,
compute); `bound` names the larger. The demo model's weights fit in the L3 cache, so
`cached_floor_fraction` repeats the memory floor with the read bandwidth of a buffer of
the step's size, read over and over (it stays cached as the weights do).

    python scripts/bench_generate.py [--checkpoint runs/demo_token] [--subset PATH]
        [--task 0] [--batches 1,8,32] [--prompt-len 64] [--new-tokens 64] [--repeats 3]
        [--threads 2] [--json PATH] [--plot PATH] [--quick] [--compile]

Shapes: B requests (batch), P prompt bytes, N new tokens per request, E experts of a
layer, K experts per token.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _bench_utils import MIB, interleaved_times, timed_runs

from moe.data import DataConfig, build_corpus
from moe.experts import Activation, expert_parameter_ids
from moe.inference import InferenceEngine, LoadedModel, SamplingParams, load_model
from moe.inference.decode import DecodeCompileOptions
from moe.transformer import MoETransformer

VARIANTS = ("fp32", "subset", "int8", "compiled")
TARGET_RATIO = 8.0
# Compiled decode tokens/s over fp32's, by batch (issue 26's targets).
COMPILED_TARGETS = {1: 4.0, 32: 3.0}
SUBSET_COVERAGE = 0.99
REQUIRED_KEYS = (
    "variant", "batch", "prefill_tokens_per_s", "decode_tokens_per_s", "floor_fraction"
)  # fmt: skip


@dataclass
class Variant:
    name: str
    loaded: LoadedModel
    task_id: int | None  # what every request names (None: the model needs none)
    engine: InferenceEngine | None = None  # kept across measurements (compiled)


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
    """Serve `prompts` at once, greedy; the first step's time and the decode steps'.
    `before_step(i)` runs untimed before step i."""
    model = variant.loaded.model
    batch = len(prompts)
    engine = variant.engine or InferenceEngine(
        model,
        max_batch=batch,
        max_step_tokens=max(model.config.max_seq_len, sum(len(p) for p in prompts)),
        task_ids=variant.loaded.task_ids,
    )
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    for prompt in prompts:
        engine.submit(prompt, params, variant.task_id)
    seconds: list[float] = []
    try:
        while engine.has_work():
            if before_step is not None:
                before_step(len(seconds))
            start = time.perf_counter()
            events = engine.step()
            seconds.append(time.perf_counter() - start)
            if len(seconds) == 1:
                assert len(events) == batch, "the first step must prefill every request"
    finally:
        if variant.engine is None:
            engine.restore()
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


# --- the machine ----------------------------------------------------------------------


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    return statistics.median(timed_runs(run, repeats))


def read_bandwidth_gbs(nbytes: int, repeats: int = 9) -> float:
    """GB/s of `torch.sum` over an fp32 buffer of `nbytes`."""
    buffer = torch.ones(max(1, nbytes // 4))
    return buffer.nbytes / median_seconds(buffer.sum, repeats) / 1e9


def copy_bandwidth_gbs(nbytes: int, repeats: int = 9) -> float:
    """GB/s moved (read + written) by a copy of an fp32 buffer of `nbytes`."""
    source, target = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    return 2 * source.nbytes / median_seconds(lambda: target.copy_(source), repeats) / 1e9


def matmul_flops(size: int, repeats: int = 5) -> float:
    """FLOP/s of an fp32 [size, size] @ [size, size] matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2.0 * size**3 / median_seconds(lambda: a @ b, repeats)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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
    if args.compile:
        compiled = load_model(args.checkpoint)
        model = compiled.model
        engine = InferenceEngine(
            model, max_batch=max(args.batches), task_ids=compiled.task_ids, compile=True,
            max_step_tokens=max(model.config.max_seq_len, max(args.batches) * args.prompt_len),
            compile_options=DecodeCompileOptions(backend=args.compile_backend),
        )  # fmt: skip
        variants.append(Variant("compiled", compiled, fp32_task, engine))
    return variants


def compiled_speedups(rows: list[dict]) -> dict[str, dict]:
    """Per batch: compiled decode tokens/s over fp32's, against COMPILED_TARGETS."""
    by = {(r["variant"], r["batch"]): r["decode_tokens_per_s"] for r in rows}
    out = {}
    for (variant, batch), speed in by.items():
        if variant == "compiled" and ("fp32", batch) in by:
            ratio = speed / by["fp32", batch]
            target = COMPILED_TARGETS.get(batch)
            out[str(batch)] = {"speedup": ratio, "target": target,
                               "meets_target": None if target is None else ratio >= target}  # fmt: skip
    return out


# --- output ---------------------------------------------------------------------------


def make_row(m: Measurement, args: argparse.Namespace, machine: dict) -> dict:
    prefill_s = statistics.median(t.prefill_s for t in m.timings)
    decode_s = statistics.median(t.decode_s for t in m.timings)
    steps = args.new_tokens - 1
    step_s = decode_s / steps
    memory_s = m.traffic.bytes_per_step / (machine["read_gbs"] * 1e9)
    cached_s = m.traffic.bytes_per_step / (machine["read_gbs_cached"] * 1e9)
    compute_s = m.traffic.flops_per_step / machine["matmul_flops"]
    return {
        "variant": m.variant.name,
        "batch": m.batch,
        "prefill_tokens_per_s": m.batch * args.prompt_len / prefill_s,
        "decode_tokens_per_s": m.batch * steps / decode_s,
        "floor_fraction": memory_s / step_s,
        "decode_step_ms": 1e3 * step_s,
        "prefill_ms": 1e3 * prefill_s,
        "memory_floor_ms": 1e3 * memory_s,
        "compute_floor_ms": 1e3 * compute_s,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "roofline_fraction": max(memory_s, compute_s) / step_s,
        "cached_floor_fraction": cached_s / step_s,
        "bytes_per_decode_step": m.traffic.bytes_per_step,
        "experts_per_layer": m.traffic.experts_per_layer,
        "experts_touched_per_layer": m.traffic.experts_touched_per_layer,
        "experts_expected_per_layer": m.traffic.experts_expected_per_layer,
        "experts_touched_from": "routing of each decode step",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": len(m.timings),
    }


def decode_ratios(rows: list[dict]) -> dict[str, dict]:
    """Per variant: decode tokens/s at the largest batch over batch 1."""
    ratios = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        own = {r["batch"]: r["decode_tokens_per_s"] for r in rows if r["variant"] == variant}
        if 1 not in own or len(own) < 2:
            continue
        largest = max(own)
        ratio = own[largest] / own[1]
        ratios[variant] = {
            "batch": largest, "baseline_batch": 1, "decode_ratio": ratio,
            "target": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO,
        }  # fmt: skip
    return ratios


def format_table(rows: list[dict], ratios: dict[str, dict]) -> str:
    header = (
        f"{'variant':<7} {'B':>3} | {'prefill tok/s':>13} {'decode tok/s':>12} "
        f"{'step ms':>8} | {'mem fl ms':>9} {'cmp fl ms':>9} {'bound':>7} {'floor fr':>8} "
        f"{'cached fr':>9} | {'experts touched/held (exp.)':>27}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['variant']:<7} {r['batch']:>3} | {r['prefill_tokens_per_s']:>13.0f} "
            f"{r['decode_tokens_per_s']:>12.0f} {r['decode_step_ms']:>8.2f} | "
            f"{r['memory_floor_ms']:>9.3f} {r['compute_floor_ms']:>9.3f} {r['bound']:>7} "
            f"{r['floor_fraction']:>8.3f} {r['cached_floor_fraction']:>9.3f} | "
            f"{r['experts_touched_per_layer']:>9.2f} / {r['experts_per_layer']:<4.3g} "
            f"({r['experts_expected_per_layer']:.2f})"
        )
    for variant, ratio in ratios.items():
        verdict = "meets" if ratio["meets_target"] else "misses"
        lines.append(
            f"{variant}: decode tok/s at B={ratio['batch']} / B=1 = {ratio['decode_ratio']:.2f}x "
            f"({verdict} the {TARGET_RATIO:.0f}x target)"
        )
    return "\n".join(lines)


def plot_decode(rows: list[dict], path: str, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for index, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        own = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["batch"])
        batches = [r["batch"] for r in own]
        color = f"C{index}"
        ax.plot(batches, [r["decode_tokens_per_s"] for r in own], "o-", color=color,
                label=f"{variant} measured")  # fmt: skip
        floor = [1e3 * r["batch"] / max(r["memory_floor_ms"], r["compute_floor_ms"]) for r in own]
        ax.plot(batches, floor, "--", color=color, label=f"{variant} floor")
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yscale("log")
    ax.set_xlabel("batch (concurrent requests)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(
        f"Decode throughput vs floor (max of memory at {machine['read_gbs']:.1f} GB/s, "
        f"compute)\n{machine['threads']} threads, {machine['cpu']}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------


def parse_batches(text: str) -> list[int]:
    try:
        batches = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        batches = []
    if not batches or batches[0] < 1:
        raise argparse.ArgumentTypeError(
            f"--batches={text!r} is invalid; accepted: comma-separated integers >= 1"
        )
    return batches


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo_token", help="run or step directory")
    parser.add_argument("--subset", help="a task subset checkpoint (default: write one)")
    parser.add_argument("--task", type=int, default=0, help="task of the prompts and subset")
    parser.add_argument("--batches", type=parse_batches, default=None, help="default 1,8,32")
    parser.add_argument("--prompt-len", type=int, default=None, help="bytes (default 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="per request (default 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of decode tokens/s")
    parser.add_argument("--quick", action="store_true", help="batches 1,4; 8 tokens; 1 round")
    parser.add_argument("--compile", action="store_true", help="add the compiled variant")
    parser.add_argument("--compile-backend", default="inductor",
                        help="its dynamo backend (the smoke test: aot_eager)")  # fmt: skip
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"batches": [1, 4] if quick else [1, 8, 32], "prompt_len": 16 if quick else 64,
                "new_tokens": 8 if quick else 64, "repeats": 1 if quick else 3}  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag, value, low in (("--prompt-len", args.prompt_len, 1), ("--repeats", args.repeats, 1),
                             ("--threads", args.threads, 1), ("--task", args.task, 0)):  # fmt: skip
        if value < low:
            parser.error(f"{flag}={value} must be >= {low}")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens={args.new_tokens} must be >= 2 (one prefill, >= 1 decode)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="bench_generate_") as workdir:
        variants = build_variants(args, Path(workdir))
        prompts = validation_prompts(variants[0].loaded, args.task, max(args.batches),
                                     args.prompt_len)  # fmt: skip
        total = len(variants) * len(args.batches) * (1 + args.repeats)
        with tqdm(total=total, desc="measurements", file=sys.stderr) as progress:
            measurements = {}
            for variant in variants:
                for batch in args.batches:  # untimed: the warm-up, counting the routing
                    if variant.engine is not None:  # compiled: fp32's routing; no hooks
                        run_requests(variant, prompts[:batch], args.new_tokens)
                        traffic = measurements[f"fp32@{batch}"].traffic
                    else:
                        traffic = count_traffic(variant, prompts[:batch], args.new_tokens)
                    measurements[f"{variant.name}@{batch}"] = Measurement(variant, batch, traffic)
                    progress.update()

            def measure(m: Measurement) -> Callable[[], None]:
                def run() -> None:
                    m.timings.append(run_requests(m.variant, prompts[: m.batch], args.new_tokens))
                    progress.update()

                return run

            largest_step = max(m.traffic.bytes_per_step for m in measurements.values())
            machine = {
                "threads": args.threads,
                "cpu": cpu_model(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "read_gbs": read_bandwidth_gbs((64 if args.quick else 512) * MIB),
                "copy_gbs": copy_bandwidth_gbs((64 if args.quick else 512) * MIB),
                "read_gbs_cached": read_bandwidth_gbs(int(largest_step), repeats=51),
                "matmul_flops": matmul_flops(512 if args.quick else 1024),
            }
            interleaved_times(
                {name: measure(m) for name, m in measurements.items()},
                repeats=args.repeats,
                warmup=0,
            )
    rows = [make_row(m, args, machine) for m in measurements.values()]
    rows.sort(key=lambda r: (VARIANTS.index(r["variant"]), r["batch"]))
    ratios = decode_ratios(rows)
    compiled = next((v.engine for v in variants if v.engine is not None), None)
    compile_report = compiled.compile_report() if compiled is not None else None
    speedups = compiled_speedups(rows)
    print(
        f"Generation, {args.checkpoint}, task {args.task}, prompt {args.prompt_len} B, "
        f"{args.new_tokens} new tokens, greedy, {args.threads} threads, median of "
        f"{args.repeats}; read {machine['read_gbs']:.1f} GB/s (cached "
        f"{machine['read_gbs_cached']:.1f}), copy {machine['copy_gbs']:.1f} GB/s, matmul "
        f"{machine['matmul_flops'] / 1e9:.1f} GFLOP/s"
    )
    print(format_table(rows, ratios))
    for batch, entry in speedups.items():
        target = entry["target"]
        verdict = (
            ""
            if target is None
            else (f" ({'meets' if entry['meets_target'] else 'misses'} the {target:.0f}x target)")
        )
        print(f"compiled / fp32 decode tok/s at B={batch}: {entry['speedup']:.2f}x{verdict}")
    if compile_report is not None:
        for bucket in compile_report["per_bucket"]:
            print(f"compiled bucket {bucket['batch']}: first call {bucket['first_call_s']:.1f} s "
                  f"({bucket['graphs']} graphs, inductor {bucket['compile_s']:.1f} s)")  # fmt: skip
    if args.json:
        settings = {k: getattr(args, k) for k in ("checkpoint", "subset", "task", "batches",
                                                   "prompt_len", "new_tokens", "repeats")}  # fmt: skip
        payload = {"machine": machine, "settings": settings, "rows": rows, "ratios": ratios,
                   "compiled_speedups": speedups, "compile": compile_report}  # fmt: skip
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        plot_decode(rows, args.plot, machine)


if __name__ == "__main__":
    main()
