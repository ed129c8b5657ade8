"""Task expert subsets against the full model, per task: experts kept, bytes, memory, loss.

    OMP_NUM_THREADS=2 python scripts/subset_report.py --checkpoint-task runs/task_moe \\
        --checkpoint-token runs/demo [--json PATH] [--markdown]

For every task of the checkpoints' data (the KJV book groups for the demo runs) and
every variant (task routing from `--checkpoint-task`; token routing at each of
`--coverages`, default 1.0 0.99 0.9, from `--checkpoint-token`), the script writes the
subset (`moe.inference.subset.write_subset`, into `--out-dir` or a temporary directory)
and reports, next to the full model:
- experts kept per MoE layer (of E);
- checkpoint bytes (every file of the step directory but the optimizer state, which a
  training checkpoint carries and a subset does not);
- resident memory: the bytes of the model's parameters and buffers, and the resident
  set (VmRSS) of a fresh process right after `load_model` (one subprocess per variant;
  `rss_model_bytes` is the part above the same process's RSS before loading);
- validation bits per byte on the task's validation windows (the fixed shuffled
  validation sequence of `TokenDataset`, the first `--eval-windows` of the task), dropless
  routing for both models.
Token-level subsets are chosen on training windows, so even at coverage 1.0 a
validation token may need an expert the subset lacks (its router then picks among the
kept ones): the bits-per-byte change measures that.

The JSON holds `rows` (one per task and variant) and `full` (one per checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_utils import release_free_memory, status_kib
from _task_eval import task_val_bpb

from moe.data import DataConfig, TokenDataset, build_corpus
from moe.inference import load_model, resolve_checkpoint
from moe.inference.subset import weight_bytes, write_subset


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _vm_rss_bytes() -> int | None:
    kib = status_kib("VmRSS")
    return None if kib is None else kib * 1024


def measure_rss_here(checkpoint: str) -> dict[str, int | None]:
    """VmRSS of this process after loading `checkpoint`, and the part loading added.
    The checkpoint is loaded and dropped once first, so that torch's one-time lazy
    initialisation (several MiB) is in the baseline and only the model counts."""
    load_model(checkpoint)  # warm-up; dropped at once
    release_free_memory()
    before = _vm_rss_bytes()
    model = load_model(checkpoint).model
    release_free_memory()
    after = _vm_rss_bytes()
    assert model is not None
    delta = after - before if after is not None and before is not None else None
    return {"rss_bytes": after, "rss_model_bytes": delta}


def measure_rss(checkpoint: Path, enabled: bool) -> dict[str, int | None]:
    """`measure_rss_here` in a fresh Python process (so nothing else inflates it)."""
    if not enabled:
        return {"rss_bytes": None, "rss_model_bytes": None}
    done = subprocess.run(
        [sys.executable, __file__, "--measure-rss", str(checkpoint)],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def report_checkpoint(
    checkpoint: str, routing: str, coverages: list[float], args: argparse.Namespace, out: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The full model's figures and one row per (task, variant) of one checkpoint."""
    source = resolve_checkpoint(checkpoint)
    loaded = load_model(source)
    kind = (
        "task" if loaded.model.routing and loaded.model.routing.router.value == "task" else "token"
    )
    if kind != routing:
        raise ValueError(
            f"--checkpoint-{routing}={checkpoint} has {kind}-level routing; accepted: a "
            f"checkpoint with {routing}-level routing"
        )
    data = DataConfig(**loaded.run_config["data"])
    corpus = build_corpus(data)
    dataset = TokenDataset.from_corpus(corpus, min(data.seq_len, loaded.model.config.max_seq_len))
    full = {
        "checkpoint": str(source), "routing": routing,
        "checkpoint_bytes": weight_bytes(source), "param_bytes": model_bytes(loaded.model),
        **measure_rss(source, args.rss),
    }  # fmt: skip
    tasks = args.tasks if args.tasks is not None else list(range(corpus.num_tasks))
    rows = []
    for task in tasks:
        full_bpb = task_val_bpb(loaded.model, dataset, task, args.eval_windows)
        for coverage in [1.0] if routing == "task" else coverages:
            target = out / f"{routing}_task{task}_coverage{coverage}"
            result = write_subset(
                source, task, target, coverage=coverage, data=corpus,
                max_windows=args.max_windows, seed=args.seed,
            )  # fmt: skip
            subset = load_model(result.directory).model
            rss = measure_rss(result.directory, args.rss)
            row: dict[str, Any] = {
                "task": task, "task_name": corpus.task_names[task], "routing": routing,
                "coverage": result.coverage,
                "experts_per_layer": {b: len(ids) for b, ids in result.experts.items()},
                "num_experts_per_layer": result.num_experts,
                "expert_ids": result.experts,
                "checkpoint_bytes": result.checkpoint_bytes,
                "full_checkpoint_bytes": full["checkpoint_bytes"],
                "param_bytes": model_bytes(subset), "full_param_bytes": full["param_bytes"],
                "rss_bytes": rss["rss_bytes"], "full_rss_bytes": full["rss_bytes"],
                "rss_model_bytes": rss["rss_model_bytes"],
                "full_rss_model_bytes": full["rss_model_bytes"],
                "val_bpb": task_val_bpb(subset, dataset, task, args.eval_windows),
                "full_val_bpb": full_bpb,
            }  # fmt: skip
            row["val_bpb_delta"] = row["val_bpb"] - full_bpb
            rows.append(row)
            print(f"[subset_report] {markdown_row(row)}", file=sys.stderr, flush=True)
            if args.out_dir is None:
                shutil.rmtree(target, ignore_errors=True)
    return full, rows


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def markdown_row(row: dict[str, Any]) -> str:
    kept = " ".join(
        f"{n}/{row['num_experts_per_layer'][b]}" for b, n in row["experts_per_layer"].items()
    )
    variant = "task" if row["routing"] == "task" else f"token @{row['coverage']}"
    return (
        f"| {row['task']} {row['task_name']} | {variant} | {kept} | "
        f"{_mib(row['checkpoint_bytes'])} / {_mib(row['full_checkpoint_bytes'])} | "
        f"{_mib(row['param_bytes'])} / {_mib(row['full_param_bytes'])} | "
        f"{_mib(row['rss_model_bytes'])} / {_mib(row['full_rss_model_bytes'])} | "
        f"{row['val_bpb']:.4f} / {row['full_val_bpb']:.4f} ({row['val_bpb_delta']:+.4f}) |"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "| task | variant | experts kept per layer | checkpoint MiB (subset / full) | "
        "params+buffers MiB | RSS added by loading MiB | val bpb (subset / full, change) |\n"
        "|---|---|---|---|---|---|---|"
    )
    return "\n".join([header, *(markdown_row(row) for row in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-task", help="a checkpoint with routing=task")
    parser.add_argument("--checkpoint-token", help="a checkpoint with token-level routing")
    parser.add_argument("--coverages", type=float, nargs="+", default=[1.0, 0.99, 0.9])
    parser.add_argument("--tasks", type=int, nargs="+", help="task ids (default: every task)")
    parser.add_argument("--max-windows", type=int, default=256, help="windows measured per task")
    parser.add_argument("--eval-windows", type=int, default=64, help="validation windows per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, help="keep the subsets here (default: discard)")
    parser.add_argument("--no-rss", dest="rss", action="store_false", help="skip the RSS runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write {'full': [...], 'rows': [...]} here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--measure-rss", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_rss:
        print(json.dumps(measure_rss_here(args.measure_rss)))
        return
    if not args.checkpoint_task and not args.checkpoint_token:
        parser.error("give --checkpoint-task, --checkpoint-token or both")
    for coverage in args.coverages:
        if not 0.0 < coverage <= 1.0:
            parser.error(f"--coverages {coverage} is invalid; accepted: numbers in (0, 1]")
    fulls, rows = [], []
    with tempfile.TemporaryDirectory(prefix="subset_report_") as temp:
        out = args.out_dir or Path(temp)
        for routing, checkpoint in (
            ("task", args.checkpoint_task),
            ("token", args.checkpoint_token),
        ):
            if checkpoint:
                full, part = report_checkpoint(checkpoint, routing, args.coverages, args, out)
                fulls.append(full)
                rows.extend(part)
    rows.sort(key=lambda row: (row["task"], row["routing"] != "task", -row["coverage"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"full": fulls, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
