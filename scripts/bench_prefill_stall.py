"""A long prompt arriving among running decodes: its time to first token, and how long
the running sequences wait for their next token meanwhile, with and without chunked
prefill, eager and compiled (`InferenceEngine(chunked_prefill=..., compile=...)`).

    python scripts/bench_prefill_stall.py --checkpoint runs/demo_token --max-seq-len 4096 \\
        --long-prompt 2000 --running 31 --budgets 256,512 --threads 2 --repeats 3 \\
        [--compile] --json docs/results/bench_prefill_stall.json

One measurement (variant): an engine of `--running` + 1 slots; `--running` requests of
64 bytes of the checkpoint's validation text decode greedily; after each has 8 tokens a
request with a `--long-prompt`-byte prompt (the same text, further on) arrives, asking
for one token. Measured from its arrival to its first token: `ttft_s` (the engine's
`time_to_first_token_s`), the steps taken, and the longest step (`stall_s`: the longest
wait of a running sequence for its next token in that window) and the median step.
Variants: `whole` (chunked_prefill=False: the prompt is prefilled in one step beside the
decodes) and `chunk<N>` for each budget N of `--budgets` (max_step_tokens=N: the decodes
first, the prompt in chunks of what is left); with `--compile` each again compiled (the
decodes through the compiled step, kv_lengths powers of two from 256 so short sequences
do not read the whole window). Rounds alternate the variants; figures are medians.

The demo model has max_seq_len 128; `--max-seq-len` rebuilds it with a longer window and
loads the checkpoint's weights unchanged (rotary positions have no learned table, so the
weights load at any length; text past the trained length is out of distribution, which
changes no timing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _generate_workloads import validation_prompts
from _machine import cpu_model

from moe.inference import InferenceEngine, SamplingParams, load_model
from moe.inference.decode import CompileWarmup, DecodeCompileOptions
from moe.transformer import MoETransformer

WARM_TOKENS = 8  # tokens each running sequence has before the long prompt arrives


def widened(checkpoint: str, max_seq_len: int) -> Any:
    """The checkpoint's model with `max_seq_len` positions (its weights unchanged)."""
    loaded = load_model(checkpoint)
    model = loaded.model
    if max_seq_len > model.config.max_seq_len:
        config = dataclasses.replace(model.config, max_seq_len=max_seq_len)
        wide = MoETransformer(config, model.routing)
        wide.load_state_dict(model.state_dict())
        loaded = dataclasses.replace(loaded, model=wide.eval())
    return loaded


def kv_ladder(max_seq_len: int) -> tuple[int, ...]:
    lengths, n = [], 256
    while n < max_seq_len:
        lengths.append(n)
        n *= 2
    return tuple(lengths)


def measure(engine: InferenceEngine, running: list[bytes], long_prompt: bytes, task: int | None,
            ) -> dict[str, float]:  # fmt: skip
    """One scenario on `engine` (see the module docstring)."""
    decode = SamplingParams(max_tokens=10_000, temperature=0.0)
    ids = [engine.submit(p, decode, task) for p in running]
    tokens = dict.fromkeys(ids, 0)
    while min(tokens.values()) < WARM_TOKENS:
        for event in engine.step():
            tokens[event.request_id] += 1
    long_id = engine.submit(long_prompt, SamplingParams(max_tokens=1, temperature=0.0), task)
    steps: list[float] = []
    ttft = None
    while ttft is None:
        started = time.perf_counter()
        events = engine.step()
        steps.append(time.perf_counter() - started)
        for event in events:
            if event.request_id == long_id and event.completion is not None:
                ttft = event.completion.time_to_first_token_s
    for request_id in ids:
        engine.cancel(request_id)
    return {"ttft_s": ttft, "steps": len(steps), "stall_s": max(steps),
            "step_p50_s": statistics.median(steps)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo_token")
    parser.add_argument("--task", type=int, default=0, help="task of the prompts")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--long-prompt", type=int, default=2000, help="bytes")
    parser.add_argument("--running", type=int, default=31, help="decoding sequences")
    parser.add_argument("--budgets", default="256,512", help="max_step_tokens when chunked")
    parser.add_argument("--compile", action="store_true", help="also the compiled variants")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    if args.long_prompt + 1 > args.max_seq_len or min(budgets) <= args.running:
        parser.error(
            f"--long-prompt={args.long_prompt} must fit --max-seq-len={args.max_seq_len}, and "
            f"every budget of --budgets={args.budgets} must exceed --running={args.running}"
        )
    torch.set_num_threads(args.threads)
    loaded = widened(args.checkpoint, args.max_seq_len)
    model = loaded.model
    task = args.task if loaded.task_ids is not None else None
    texts = validation_prompts(loaded, args.task, args.running + 1 + args.long_prompt // 64, 64)
    running, long_prompt = texts[: args.running], b"".join(texts[args.running :])
    long_prompt = long_prompt[: args.long_prompt]
    slots = args.running + 1
    engines: dict[str, InferenceEngine] = {}
    compile_reports = {}
    for compiled in (False, True) if args.compile else (False,):
        options = DecodeCompileOptions(
            kv_lengths=kv_ladder(args.max_seq_len), warmup=CompileWarmup.LAZY
        )
        suffix = "+compiled" if compiled else ""
        common = dict(max_batch=slots, task_ids=loaded.task_ids, compile=compiled,
                      compile_options=options, tokenizer=loaded.tokenizer)  # fmt: skip
        engines[f"whole{suffix}"] = InferenceEngine(
            model, max_step_tokens=args.max_seq_len, chunked_prefill=False, **common
        )
        for budget in budgets:
            engines[f"chunk{budget}{suffix}"] = InferenceEngine(
                model, max_step_tokens=budget, **common
            )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for name, engine in engines.items():  # untimed: compiles what the scenario needs
        print(f"[warm-up] {name}", file=sys.stderr, flush=True)
        measure(engine, running, long_prompt, task)
        if engine.compile_report() is not None:
            compile_reports[name] = engine.compile_report()
    names = list(engines)
    for round_index in range(args.repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            results[name].append(measure(engines[name], running, long_prompt, task))
        print(f"[round {round_index + 1}/{args.repeats}] done", file=sys.stderr, flush=True)
    rows = []
    for name in names:
        row: dict[str, Any] = {"variant": name}
        for key in ("ttft_s", "steps", "stall_s", "step_p50_s"):
            row[key] = statistics.median(r[key] for r in results[name])
        rows.append(row)
        print(f"{name:<18} TTFT {row['ttft_s'] * 1e3:8.1f} ms in {row['steps']:3.0f} steps; "
              f"running sequences wait up to {row['stall_s'] * 1e3:7.1f} ms "
              f"(median step {row['step_p50_s'] * 1e3:6.1f} ms)")  # fmt: skip
    if args.json:
        payload = {
            "machine": {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
                        "python": platform.python_version(),
                        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")},
            "settings": {k: getattr(args, k) for k in ("checkpoint", "task", "max_seq_len",
                         "long_prompt", "running", "budgets", "repeats", "compile")},
            "rows": rows, "rounds": results, "compile": compile_reports,
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
