"""Prune the demo MoE's experts and recover: validation bits per byte against sparsity,
as pruned, after fine-tuning, and after distillation from the unpruned model.

    OMP_NUM_THREADS=1 python scripts/prune_experiment.py --teacher runs/demo_token \\
        --out-dir runs/prune_exp --steps 200 --seeds 0 1 --parallel 2 --threads 1 \\
        --json runs/prune_exp/result.json --plot runs/prune_exp/bpb.png --markdown

Pruning variants (`PRUNINGS`), each written once by `moe.pruning.write_pruned` (what
`launch.prune` runs) into `out_dir/pruned/<variant>`, experts only (`prune.scope=experts`,
magnitude per matrix): unstructured at 25%, 50% and 75%; 2:4 along the reduction
dimension; 2:4 after Pool & Yu's channel permutation of every expert's hidden units.

Recovery runs, per pruning variant and seed, in `out_dir/<variant>_<recovery>_s<seed>`,
all with the same budget (`--steps` optimizer steps of the teacher's batch, the same LR
schedule, the same data order per seed) and the pruned checkpoint as their start
(`train.init_from`, whose masks the runs keep):
- `ft`: `launch.train` on the language-modelling loss (fine-tuning);
- `kd`: `launch.distill` with the unpruned model as teacher and the pruned MoE as
  student (`distill.init=checkpoint`; T and alpha of `conf/distill/default.yaml`);
- `sr` (N:M variants, when asked: `--recoveries ft kd sr`): `launch.train` with SR-STE
  (`prune.method=sr_ste` with the variant's pattern): the masks may move, the pruned
  weights train through the straight-through estimator.
A control, `unpruned_ft_s<seed>`, fine-tunes the unpruned model the same way: more
steps help an unpruned model too.

Every figure is the validation bpb of a checkpoint on the same `--eval-batches` fixed
validation batches (`launch.training.evaluation.evaluate`, the trainer's evaluation: eval
mode, the trained capacity policy), the unpruned model and the pruned ones included;
`int8`: the same with the experts quantized int8 after pruning and recovery. Expert
memory is `moe.pruning.oneshot.expert_memory` of the pruned model (dense, int8 and
packed N:M sizes). Evaluations are cached per checkpoint; running the command again
skips what is done and resumes unfinished runs from their checkpoints.

Here: arguments, the pruned checkpoints, the runs and the evaluations; the summary, table
and plot are `scripts/_prune_report.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _distill_sweep import hydra_value
from _prune_report import markdown, plot, summarise
from _runs import cached_json, is_finished, launch_runs, read_metrics

from launch.training.distillation import Teacher, read_teacher
from launch.training.evaluation import evaluate
from moe.checkpoint import resolve_latest
from moe.data import DataConfig, TokenDataset, build_dataset
from moe.inference import load_model
from moe.pruning import PruneConfig, write_pruned

# variant -> (sparsity for the plot, PruneConfig keywords)
PRUNINGS: dict[str, tuple[float, dict[str, Any]]] = {
    "u25": (0.25, {"sparsity": 0.25}),
    "u50": (0.50, {"sparsity": 0.50}),
    "u75": (0.75, {"sparsity": 0.75}),
    "nm24": (0.50, {"pattern": "2:4"}),
    "nm24_perm": (0.50, {"pattern": "2:4", "permute": True}),
}
RECOVERIES = ("ft", "kd", "sr")
DEFAULT_RECOVERIES = ("ft", "kd")
# Copied from the teacher's run into every run.
SHARED_TRAIN_KEYS = ("batch_size", "weight_decay", "beta1", "beta2", "grad_clip", "grad_accum")


def prune_all(teacher: Teacher, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every pruning variant's checkpoint (written unless there) and its report."""
    reports = {}
    for variant in tqdm(args.prunings, desc="prune"):
        _, keywords = PRUNINGS[variant]
        out = args.out_dir / "pruned" / variant
        report_path = out / "report.json"
        if not report_path.is_file():
            config = PruneConfig(
                method="magnitude", scope="experts", permute_seconds=args.permute_seconds,
                permute_escapes=args.permute_escapes, **keywords,
            )  # fmt: skip
            result = write_pruned(teacher.checkpoint, out / "checkpoints", config)
            report = result.report.as_dict() | {"checkpoint": str(result.directory)}
            report_path.write_text(json.dumps(report, indent=1) + "\n")
        reports[variant] = json.loads(report_path.read_text())
    return reports


def train_settings(teacher: Teacher, args: argparse.Namespace) -> dict[str, Any]:
    config = teacher.meta["config"]
    every = min(args.eval_every, args.steps)
    return {key: config["train"][key] for key in SHARED_TRAIN_KEYS} | {
        "steps": args.steps, "lr": args.lr, "min_lr": args.lr / 10,
        "warmup_steps": max(1, args.steps // 10), "eval_every": every,
        "checkpoint_every": every, "log_every": every, "keep_last": 1,
        "eval_batches": args.eval_batches, "sample_tokens": 0, "progress": False,
        "engine": "torch", "resume": "auto",
    }  # fmt: skip


def run_command(
    teacher: Teacher, settings: dict[str, Any], recovery: str, start: Path, seed: int, run_dir: Path
) -> list[str]:
    """A recovery run's command line: `ft`, `sr` (launch.train) or `kd` (launch.distill)."""
    config = teacher.meta["config"]
    overrides = [f"run_dir={hydra_value(str(run_dir))}", "wandb.mode=disabled"]
    overrides += [f"train.{k}={hydra_value(v)}" for k, v in settings.items()]
    overrides += [f"train.seed={seed}", f"train.init_from={hydra_value(str(start))}"]
    overrides += [f"data.{k}={hydra_value(v)}" for k, v in config["data"].items()]
    if recovery == "kd":
        overrides += [f"teacher={hydra_value(str(teacher.checkpoint))}", "distill.init=checkpoint"]
        return [sys.executable, "-m", "launch.distill", *overrides]
    for section in ("model", "routing"):
        overrides += [f"{section}.{k}={hydra_value(v)}" for k, v in config[section].items()]
    if recovery == "sr":
        pattern = PRUNINGS[start.parents[1].name][1]["pattern"]
        overrides += ["prune.method=sr_ste", f"prune.pattern={pattern}"]
    return [sys.executable, "-m", "launch.train", *overrides]


def jobs_of(args: argparse.Namespace, reports: dict[str, Any]) -> list[tuple[str, int, Path]]:
    """(variant, seed, run_dir) of every recovery run; variant `<pruning>_<recovery>`."""
    names = [
        f"{p}_{r}"
        for p in args.prunings
        for r in args.recoveries
        if r != "sr" or "pattern" in PRUNINGS[p][1]  # SR-STE trains N:M
    ]
    if "ft" in args.recoveries:
        names.append("unpruned_ft")
    return [(name, seed, args.out_dir / f"{name}_s{seed}") for name in names for seed in args.seeds]


def start_of(name: str, teacher: Teacher, reports: dict[str, Any]) -> Path:
    pruning = name.rsplit("_", 1)[0]
    return teacher.checkpoint if pruning == "unpruned" else Path(reports[pruning]["checkpoint"])


def evaluation(
    checkpoint: Path, dataset: TokenDataset, args: argparse.Namespace, cache: Path, int8: bool
) -> dict[str, Any]:
    """Validation bpb of `checkpoint` (float, and int8 experts when `int8`), cached."""
    key = {"checkpoint": str(checkpoint), "batches": args.eval_batches, "int8": int8}

    def compute() -> dict[str, Any]:
        out = {}
        for quantize in ("none", "int8") if int8 else ("none",):
            model = load_model(checkpoint, quantize=quantize).model
            result = evaluate(
                model, dataset, args.eval_batch_size, args.eval_batches, 0, 1, torch.device("cpu")
            )
            out["val_bpb" if quantize == "none" else "val_bpb_int8"] = result.val_bpb
        return out

    cache.parent.mkdir(parents=True, exist_ok=True)
    return cached_json(cache, key, compute)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Teacher]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the unpruned checkpoint or run")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200, help="train.steps of every run")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak LR (cosine to lr/10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--prunings", nargs="+", default=list(PRUNINGS), choices=list(PRUNINGS))
    parser.add_argument(
        "--recoveries", nargs="+", default=list(DEFAULT_RECOVERIES), choices=RECOVERIES
    )
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--permute-seconds", type=float, default=5.0, help="per expert FFN")
    parser.add_argument("--permute-escapes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    for key in ("steps", "eval_every", "eval_batches", "eval_batch_size", "threads", "parallel"):
        if getattr(args, key) < 1:
            parser.error(
                f"--{key.replace('_', '-')} {getattr(args, key)} is invalid; accepted: >= 1"
            )
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds} repeats a seed")
    try:
        teacher = read_teacher(args.teacher)
    except ValueError as error:
        parser.error(str(error))
    args.out_dir = args.out_dir.resolve()
    return args, teacher


def main(argv: list[str] | None = None) -> None:
    args, teacher = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    settings = train_settings(teacher, args)
    saved_path = args.out_dir / "sweep.json"
    record = {"teacher": str(teacher.checkpoint.resolve()), "train": settings}
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else record
    if saved != record:
        sys.exit(
            f"prune_experiment: {saved_path} holds a sweep with other settings; rerun it with "
            "them or choose another --out-dir"
        )
    saved_path.write_text(json.dumps(record, indent=1) + "\n")
    reports = prune_all(teacher, args)
    jobs = jobs_of(args, reports)
    pending = [job for job in jobs if not is_finished(job[2], args.steps)]
    print(
        f"[prune_experiment] {len(jobs) - len(pending)} of {len(jobs)} runs done", file=sys.stderr
    )
    if pending:

        def command(name: str, seed: int, run_dir: Path) -> list[str]:
            recovery = name.rsplit("_", 1)[1]
            start = start_of(name, teacher, reports)
            return run_command(teacher, settings, recovery, start, seed, run_dir)

        _, failed = launch_runs(
            pending, command, args.out_dir / "logs", args.parallel, args.threads, "runs"
        )
        if failed:
            sys.exit("prune_experiment: runs failed: " + ", ".join(failed))
    dataset = build_dataset(DataConfig(**teacher.meta["config"]["data"]))
    evals = args.out_dir / "evals"
    points = [("unpruned", None, teacher.checkpoint, "unpruned")]
    points += [(v, None, Path(reports[v]["checkpoint"]), "pruned") for v in args.prunings]
    for name, seed, run_dir in jobs:
        latest = resolve_latest(run_dir / "checkpoints")
        assert latest is not None, run_dir
        points.append((name, seed, latest, "run"))
    rows = []
    for name, seed, checkpoint, kind in tqdm(points, desc="evaluate"):
        tag = name if seed is None else f"{name}_s{seed}"
        int8 = kind == "unpruned" or name.endswith("_kd")
        row = {"name": name, "seed": seed, "kind": kind, "checkpoint": str(checkpoint)}
        row |= evaluation(checkpoint, dataset, args, evals / f"{tag}.json", int8)
        if kind == "run":
            row["curve"] = [
                [r["step"], r["val_bpb"]] for r in read_metrics(checkpoint.parent.parent)
            ]
        rows.append(row)
    summary = summarise(rows, reports, PRUNINGS)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        conditions = {"parallel": args.parallel, "threads": args.threads, "seeds": args.seeds}
        result = {
            "settings": record, "reports": reports, "rows": rows, "summary": summary,
            "conditions": conditions,
        }  # fmt: skip
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(summary, args.plot)
    print(markdown(summary) if args.markdown else json.dumps(summary["verdict"], indent=1))


if __name__ == "__main__":
    main()
