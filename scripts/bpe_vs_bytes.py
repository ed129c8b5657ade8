"""Bits per byte on the KJV: the demo model on bytes against the same model on a 4k BPE,
at equal training FLOPs.

    python scripts/bpe_vs_bytes.py --json docs/results/bpe_vs_bytes.json \\
        --plot docs/results/bpe_vs_bytes.png
    python scripts/bpe_vs_bytes.py --smoke --out /tmp/bpe_smoke     # seconds: a tiny model

What runs: a byte-level BPE of `--vocab-size` tokens trained on the KJV's training books
(`launch.tokenizer`'s `train_tokenizer`), then two training runs of the one training loop
(`launch.training.loop.train`, one process): `bytes` (the demo's settings: `model=small`,
batch 32 x 128 tokens, 600 steps) and `bpe` (`data.tokenizer`, `model.vocab_size` =
the BPE's), with the same batch and sequence length and as many steps as the FLOPs of
the byte run buy. Both runs checkpoint under `--out` and resume when the script is
started again (a finished run is only evaluated).

FLOPs accounting (per training token, forward and backward = 3x forward, Kaplan et al.
2020): 6 x (active non-embedding parameters + d_model x vocab) + 6 x layers x T x d_model.
The first term is the matmuls a token passes through (attention projections, router,
its top-k experts, and the output head, which costs d_model x vocab per token even when
tied to the embedding; the embedding lookup costs none); the second is attention's
scores and weighted sum over T positions. The BPE model pays a larger head per token
but one token covers about four bytes, so at equal FLOPs it sees more text in fewer
steps. The LR schedule (warmup, cosine) is scaled to each run's steps.

What is compared: bits per byte on the whole validation split (every validation window,
each target once): mean cross entropy per token / ln 2 x (validation tokens / bytes of
validation text); for bytes the ratio is 1. The context differs: T=128 tokens is 128
bytes for one model and about 500 for the other; that is part of what a tokenizer buys.
The output: a JSON record (settings, machine load, per run its FLOPs per token, steps,
tokens, final bits per byte, the evaluation curve) and a plot of bits per byte against
training FLOPs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import read_metrics

from launch.config import RunConfig, register_configs, to_run_config
from launch.tokenizer import TokenizerRunConfig, train_tokenizer
from launch.training.evaluation import evaluate
from launch.training.loop import train
from moe.data import DataConfig, build_dataset
from moe.interop.bpe import BPEConfig
from moe.interop.tokenizer import TOKENIZER_FILE, HFTokenizer
from moe.params import count_parameters
from moe.transformer import MoETransformer

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("bytes", "bpe")


def train_flops_per_token(config: RunConfig) -> float:
    """Training FLOPs per token of `config`'s model (see the module docstring)."""
    model = MoETransformer(config.model, config.routing)
    active = count_parameters(model).active
    head = config.model.d_model * config.model.vocab_size
    attention = config.model.n_layers * config.data.seq_len * config.model.d_model
    return 6.0 * (active + head) + 6.0 * attention


def run_config(args: argparse.Namespace, variant: str, steps: int, tokenizer: Path) -> RunConfig:
    """The run of `variant` with `steps` steps (the demo's settings otherwise)."""
    warmup = max(1, round(args.warmup_fraction * steps))
    evals = max(1, steps // args.evaluations)
    overrides = [
        "experiment=demo", "comm=local", f"model={args.model}", f"run_dir={args.out / variant}",
        f"data.seq_len={args.seq_len}", f"data.cache_dir={args.out / 'token_cache'}",
        f"train.steps={steps}", f"train.batch_size={args.batch_size}",
        f"train.warmup_steps={warmup}", f"train.eval_every={evals}",
        f"train.checkpoint_every={evals}", f"train.eval_batches={args.eval_batches}",
        "train.sample_tokens=0", "wandb.mode=disabled", f"train.progress={not args.quiet}",
        f"train.seed={args.seed}",
    ]  # fmt: skip
    if args.smoke:
        overrides += ["train.lr=1e-2", "train.min_lr=1e-3"]
    if variant == "bpe":
        size = HFTokenizer.from_dir(tokenizer).vocab_size
        overrides += [f"data.tokenizer={tokenizer}", f"model.vocab_size={size}"]
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_run_config(compose("config", overrides=overrides))


def ensure_tokenizer(args: argparse.Namespace) -> Path:
    """The BPE under `--out` (trained on the KJV's training books when missing)."""
    directory = args.out / f"tokenizer_{args.vocab_size}"
    if not (directory / TOKENIZER_FILE).is_file():
        config = TokenizerRunConfig(
            data=DataConfig(), tokenizer=BPEConfig(vocab_size=args.vocab_size),
            out=str(directory), progress=not args.quiet,
        )  # fmt: skip
        train_tokenizer(config)
    return directory


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def run_variant(config: RunConfig, flops_per_token: float, args: argparse.Namespace) -> dict:
    """Train (or resume, or only evaluate) one run; its figures."""
    result = train(config)
    assert result.model is not None
    dataset = build_dataset(config.data)
    batch = args.batch_size
    batches = dataset.num_validation_windows // batch
    if args.final_eval_batches:
        batches = min(batches, args.final_eval_batches)
    evaluation = evaluate(result.model, dataset, batch, batches, 0, 1, torch.device("cpu"))
    tokens_per_step = config.train.batch_size * config.data.seq_len
    curve = [
        {
            "step": record["step"],
            "flops": record["step"] * tokens_per_step * flops_per_token,
            "val_bpb": record["val_bpb"],
        }
        for record in read_metrics(Path(config.run_dir))
    ]
    return {
        "run_dir": _relative(Path(config.run_dir)),
        "vocab_size": config.model.vocab_size,
        "flops_per_token": flops_per_token,
        "steps": config.train.steps,
        "tokens": config.train.steps * tokens_per_step,
        "train_flops": config.train.steps * tokens_per_step * flops_per_token,
        "val_tokens_per_byte": dataset.val_tokens_per_byte,
        "val_windows": batches * batch,
        "val_loss_per_token": evaluation.val_loss,
        "val_bpb": evaluation.val_bpb,
        "curve": curve,
    }


def _relative(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (portable records)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def plot(results: dict[str, dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.subplots()
    for name, row in results.items():
        points = row["curve"]
        axes.plot([p["flops"] for p in points], [p["val_bpb"] for p in points], "o-",
                  label=f"{name} (vocab {row['vocab_size']}): {row['val_bpb']:.3f} bpb")  # fmt: skip
    axes.set_xlabel("training FLOPs")
    axes.set_ylabel("validation bits per byte")
    axes.set_title("KJV: bytes vs BPE at equal training FLOPs")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bpe_vs_bytes")
    parser.add_argument("--model", default="small", help="a conf/model preset")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument(
        "--byte-steps", type=int, default=None, help="steps of the byte run (600; smoke: 6)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup-fraction", type=float, default=50 / 600)
    parser.add_argument("--evaluations", type=int, default=6, help="curve points per run")
    parser.add_argument("--eval-batches", type=int, default=8, help="per curve point")
    parser.add_argument(
        "--final-eval-batches", type=int, default=0, help="0: every validation window"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--smoke", action="store_true", help="model=tiny, 6 steps, 320 tokens, 4 eval batches"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.vocab_size = "tiny", 320
        args.batch_size, args.seq_len, args.eval_batches, args.evaluations = 8, 32, 2, 2
        args.final_eval_batches = 4
    if args.byte_steps is None:
        args.byte_steps = 6 if args.smoke else 600
    for key in ("vocab_size", "byte_steps", "batch_size", "seq_len", "evaluations"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    load_before = load_average()
    tokenizer = ensure_tokenizer(args)
    byte_config = run_config(args, "bytes", args.byte_steps, tokenizer)
    flops = {"bytes": train_flops_per_token(byte_config)}
    probe = run_config(args, "bpe", args.byte_steps, tokenizer)
    flops["bpe"] = train_flops_per_token(probe)
    # Equal FLOPs: the same batch and sequence length, steps in inverse proportion.
    bpe_steps = max(1, round(args.byte_steps * flops["bytes"] / flops["bpe"]))
    configs = {"bytes": byte_config, "bpe": run_config(args, "bpe", bpe_steps, tokenizer)}
    results = {name: run_variant(configs[name], flops[name], args) for name in VARIANTS}
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "host": socket.gethostname(),
        "date": datetime.date.today().isoformat(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "flops_ratio_bpe_over_bytes": flops["bpe"] / flops["bytes"],
        "runs": results,
        "bpb_bpe_minus_bytes": results["bpe"]["val_bpb"] - results["bytes"]["val_bpb"],
    }
    for name, row in results.items():
        print(
            f"{name}: vocab {row['vocab_size']}, {row['steps']} steps, "
            f"{row['train_flops']:.3e} FLOPs ({row['flops_per_token']:.3e}/token), "
            f"val {row['val_loss_per_token']:.4f} nats/token x {row['val_tokens_per_byte']:.4f} "
            f"tokens/byte = {row['val_bpb']:.4f} bits per byte",
            flush=True,
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    if args.plot is not None:
        plot(results, args.plot)
    return record


if __name__ == "__main__":
    main()
