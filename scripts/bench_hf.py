"""An imported HF MoE model side by side with transformers: import cost, then decode.

    python scripts/bench_hf.py --json docs/results/bench_hf.json
    python scripts/bench_hf.py --family qwen3_moe --layers 2 --batches 1,32
    python scripts/bench_hf.py --quick     # tiny shapes: a smoke test

1. A model of a real family's width, expert count and vocabulary (`--family`: OLMoE-1B-7B
   or Qwen3-MoE-30B-A3B) reduced to `--layers` blocks, random weights, written by
   transformers' own `save_pretrained` (fp32) with a byte-level BPE tokenizer trained on
   the KJV and padded with added tokens to the model's vocabulary.
2. `python -m launch.import_hf` on it in a child process: wall time, the child's peak
   resident memory against the checkpoint's bytes and against a child that only imports
   the same modules and builds the model's skeleton (the interpreter's share).
3. Greedy decode of B prompts of `--prompt-len` random token ids, `--new-tokens` each,
   at every batch of `--batches`, in this process on `--threads` threads: this project's
   `InferenceEngine` (B requests at once, iteration-level batching) against
   transformers' `generate(do_sample=False)` on the same [B, P] batch, in alternated
   rounds (the first variant rotates), median over `--rounds`. Decode tokens/s =
   B * (N - 1) / decode seconds: the engine's step times after the first (prefill)
   step; for transformers generate(N) minus generate(1) of the same batch, so its
   prefill is taken out alike. Both sides' greedy tokens are compared (the share of
   identical sequences is reported: ties in fp32 may flip a late token).

The machine's 1-minute load average is recorded before and after: on a shared machine
the ratios are what to read, not the absolute figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (transformers config class, its arguments) per family: the real widths and experts.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "olmoe": ("OlmoeConfig", dict(
        hidden_size=2048, intermediate_size=1024, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
        max_position_embeddings=4096, norm_topk_prob=False, clip_qkv=None,
    )),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, vocab_size=151936, max_position_embeddings=4096,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    )),
    "quick": ("OlmoeConfig", dict(
        hidden_size=128, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
        num_experts=8, num_experts_per_tok=2, vocab_size=1024, max_position_embeddings=256,
    )),
}  # fmt: skip


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on a few KJV books, padded to `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moe.data.kjv import read_books

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator([text for *_, text in read_books()[:5]], trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    tokenizer.add_tokens([f"<pad_{i}>" for i in range(missing)])
    assert tokenizer.get_vocab_size() == vocab_size
    tokenizer.save(str(directory / "tokenizer.json"))


def build_hf(directory: Path, family: str, layers: int) -> dict[str, Any]:
    """Write the random model of `family` with `layers` blocks; returns its config. (Run
    in a child process: the memory it took goes back with it.)"""
    import transformers

    name, args = FAMILIES[family]
    config = getattr(transformers, name)(
        **args, num_hidden_layers=layers, tie_word_embeddings=False, eos_token_id=None,
        bos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    write_tokenizer(directory, config.vocab_size)
    del model
    gc.collect()
    return dict(config.to_dict())


def child_peak_rss(code: str) -> int:
    """Peak resident bytes (VmHWM) of a child Python running `code`."""
    script = f"{code}\nfrom launch.import_hf import peak_resident_bytes\nprint('PEAK', peak_resident_bytes())"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout  # fmt: skip
    return int(re.findall(r"PEAK (\d+)", out)[-1])


def measure_import(hf_dir: Path, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "launch.import_hf", f"path={hf_dir}", f"out={out}",
               "progress=false"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"import_hf failed: {done.stderr[-2000:]}")
    peak = int(re.search(r"peak resident memory ([\d,]+)", done.stdout).group(1).replace(",", ""))  # type: ignore[union-attr]
    checkpoint_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    skeleton = (
        "import torch, json\nfrom launch.import_hf import main\n"
        "from moe.interop.hf_config import configs_from_hf\nfrom moe.transformer import MoETransformer\n"
        f"m, r, _ = configs_from_hf(json.load(open({str(hf_dir / 'config.json')!r})))\n"
        "with torch.device('meta'):\n    MoETransformer(m, r)"
    )
    largest = 0
    from safetensors import safe_open

    for file in hf_dir.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle)
                view = handle.get_slice(key)
                numel = 1
                for size in view.get_shape():
                    numel *= size
                largest = max(largest, numel * 4)
    return {
        "import_s": seconds, "peak_rss_bytes": peak, "checkpoint_bytes": checkpoint_bytes,
        "baseline_rss_bytes": child_peak_rss(skeleton), "largest_tensor_bytes": largest,
        "hf_bytes": sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")),
    }  # fmt: skip


def hf_round(model: Any, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Decode seconds of transformers' greedy generate, and its new tokens."""
    mask = torch.ones_like(prompts)

    def run(n: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompts, attention_mask=mask, do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0)  # fmt: skip
        return time.perf_counter() - start, out

    first, _ = run(1)
    full, out = run(new_tokens)
    return full - first, out[:, prompts.shape[1] :].tolist()


def ours_round(
    model: Any, tokenizer: Any, prompts: torch.Tensor, new_tokens: int
) -> tuple[float, float, list[list[int]]]:
    """(decode seconds, prefill seconds, new tokens) of the engine on the batch."""
    from moe.inference import InferenceEngine, SamplingParams

    batch, length = prompts.shape
    engine = InferenceEngine(
        model, max_batch=batch, tokenizer=tokenizer, max_len=length + new_tokens,
        max_step_tokens=max(length + new_tokens, batch * length), warmup=False,
    )  # fmt: skip
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    ids = [engine.submit(row, params) for row in prompts.tolist()]
    steps, done = [], {}
    while engine.has_work():
        start = time.perf_counter()
        events = engine.step()
        steps.append(time.perf_counter() - start)
        done.update({e.request_id: e.completion for e in events if e.completion is not None})
    engine.restore()
    return sum(steps[1:]), steps[0], [list(done[i].token_ids) for i in ids]


def run_batches(
    args: argparse.Namespace, hf: Any, ours: Any, tokenizer: Any
) -> list[dict[str, Any]]:
    rows = []
    vocab = ours.config.vocab_size
    for batch in args.batches:
        prompts = torch.randint(0, vocab, (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(batch))  # fmt: skip
        # One untimed round each: first-call costs (allocations, lazy imports).
        hf_round(hf, prompts[:, :4], 2)
        ours_round(ours, tokenizer, prompts[:, :4], 2)
        times: dict[str, list[float]] = {"hf": [], "ours": []}
        prefill, same = [], None
        for index in range(args.rounds):
            order = ["hf", "ours"] if index % 2 == 0 else ["ours", "hf"]
            outputs = {}
            for name in order:
                if name == "hf":
                    seconds, outputs[name] = hf_round(hf, prompts, args.new_tokens)
                else:
                    seconds, first, outputs[name] = ours_round(
                        ours, tokenizer, prompts, args.new_tokens
                    )
                    prefill.append(first)
                times[name].append(seconds)
            if same is None:
                same = sum(a == b for a, b in zip(outputs["hf"], outputs["ours"])) / batch
        decoded = batch * (args.new_tokens - 1)
        ratios = [h / o for h, o in zip(times["hf"], times["ours"])]
        row = {
            "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "hf_decode_tokens_per_s": decoded / statistics.median(times["hf"]),
            "ours_decode_tokens_per_s": decoded / statistics.median(times["ours"]),
            "ours_over_hf_round_median": statistics.median(ratios),
            "ours_prefill_ms": 1000 * statistics.median(prefill),
            "identical_sequences": same,
            "rounds_s": times,
        }  # fmt: skip
        print(f"[bench_hf] B={batch}: transformers {row['hf_decode_tokens_per_s']:.1f} tok/s, "
              f"ours {row['ours_decode_tokens_per_s']:.1f} tok/s, ours/transformers "
              f"{row['ours_over_hf_round_median']:.2f}x (identical sequences {same:.0%})",
              flush=True)  # fmt: skip
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="olmoe", choices=[f for f in FAMILIES if f != "quick"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workdir", default="", help="where the models go (default: a temp dir)")
    parser.add_argument("--json", default="")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    args = parser.parse_args()
    args.batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    if args.quick:
        args.family, args.rounds, args.new_tokens, args.prompt_len = "quick", 2, 6, 8
        args.batches = [1, 4]
    torch.set_num_threads(args.threads)
    import transformers

    from moe.inference import load_model

    load_before = os.getloadavg()[0]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_hf_"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, checkpoint = work / "hf", work / "checkpoint"
    print(
        f"[bench_hf] writing a random {args.family} with {args.layers} blocks into {hf_dir}",
        flush=True,
    )
    config = _in_child(build_hf, hf_dir, args.family, args.layers)
    imported = measure_import(hf_dir, checkpoint)
    print(f"[bench_hf] import: {imported['import_s']:.1f} s, peak RSS "
          f"{imported['peak_rss_bytes'] / 2**20:.0f} MiB (interpreter and skeleton "
          f"{imported['baseline_rss_bytes'] / 2**20:.0f} MiB) for a checkpoint of "
          f"{imported['checkpoint_bytes'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    loaded = load_model(checkpoint)
    rows = run_batches(args, hf, loaded.model, loaded.tokenizer)
    result = {
        "family": args.family, "layers": args.layers, "threads": args.threads,
        "config": {k: config[k] for k in ("hidden_size", "num_attention_heads",
                                          "num_key_value_heads", "vocab_size",
                                          "num_experts_per_tok") if k in config},
        "num_experts": config.get("num_experts", config.get("num_local_experts")),
        "import": imported, "decode": rows,
        "load_avg_1min_before": load_before, "load_avg_1min_after": os.getloadavg()[0],
        "host": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                 "torch": torch.__version__, "transformers": transformers.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"[bench_hf] wrote {args.json}", flush=True)


def _in_child(function: Any, *args: Any) -> Any:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def _cpu() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
