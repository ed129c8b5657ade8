"""Distil an MoE teacher into dense students and compare with a dense student from scratch.

    OMP_NUM_THREADS=1 python scripts/distill_experiment.py --teacher runs/demo_token \\
        --out-dir runs/distill_exp --seeds 0 1 --parallel 2 --threads 1 \\
        --json runs/distill_exp/result.json --plot runs/distill_exp/bpb.png --markdown

Variants, one subprocess run each per seed, in `out_dir/<variant>_s<seed>`:
- `scratch`: `python -m launch.train` with the student's model (`moe.distill.student.student_config`
  of the teacher: every FFN one `ExpertFFN` of width top_k * expert_hidden) on the language
  modelling loss alone. It starts from the weights `kd_random` starts from (the same
  model config and seed), so the two differ only in the loss;
- `kd_random`, `kd_top`, `kd_merge`: `python -m launch.distill` with `distill.init=...`
  (temperature and alpha: `conf/distill/default.yaml`);
- `kd_top_alpha0`: pure KD, `distill.init=top distill.alpha=0`.

Equal budgets: every run has the teacher's data, batch size, LR, warmup (capped at the
steps) and cosine schedule, the same `train.steps` and the same seed (initialisation and
data order), evaluates every `--eval-every` steps and checkpoints at each evaluation.
Steps: `--steps`; else, with `--budget-s`, as many as fit that many seconds per run,
from a calibration of `--parallel` concurrent `kd_top` runs of `--calibration-steps`
(the slowest variant: the teacher's forward is extra); else the teacher's own
`train.steps` (600 for the demo). The sweep's settings are kept in `out_dir/sweep.json`;
running the command again skips finished runs and resumes the others from their
checkpoints.

Reported per run: the final validation bpb (the trainer's `val_bpb`: the first
`eval_batches` fixed validation batches), bpb per task on the first `--eval-windows`
validation windows of each task (the KJV book groups; dropless routing), training
tokens/s (under `--parallel` concurrent runs of `--threads` threads), forward tokens/s of
that evaluation, and the share of the teacher's gain kept, `(bpb_scratch - bpb_student) /
(bpb_scratch - bpb_teacher)` against the scratch run of the same seed. The teacher is
evaluated on the same batches (dropless, as it runs during distillation; its figure with
its trained capacity policy, which its own training run reported, is given beside it).

Here: the arguments, the choice of steps, the evaluation of the runs and the teacher, and
the output. The sweep (variants, shared settings, command lines, launch, calibration) is
`scripts/_distill_sweep.py`; the summary, verdict, table and plot `scripts/_distill_report.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _distill_report import LITERATURE, markdown, plot, summarise, verdict
from _distill_sweep import VARIANTS, calibrate, launch, sweep_settings
from _runs import cached_json, is_finished, read_metrics
from _task_eval import task_cross_entropy

from launch.training.distillation import Teacher, read_teacher
from launch.training.evaluation import evaluate
from moe.data import DataConfig, TokenDataset, build_dataset
from moe.inference import load_model
from moe.transformer import MoETransformer, bits_per_byte
from routing import CapacityOverride


def task_bpb(model: MoETransformer, dataset: TokenDataset, windows: int) -> dict[str, Any]:
    """Bits per byte per task on the first `windows` validation windows of each task
    (`_task_eval`: dropless routing, eval mode), and the forward tokens/s of the whole
    evaluation."""
    per_task, tokens, start = {}, 0, time.perf_counter()
    for task, name in enumerate(dataset.task_names):
        total, count = task_cross_entropy(model, dataset, task, windows, batch_size=32)
        per_task[name] = bits_per_byte(total / max(count, 1))
        tokens += count
    return {
        "val_bpb_per_task": per_task,
        "eval_tokens_per_s": tokens / (time.perf_counter() - start),
    }


def evaluate_teacher(
    teacher: Teacher, dataset: TokenDataset, settings: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The teacher's row: the trainer's validation batches (dropless and with its trained
    capacity), per-task bpb, and the training tokens/s of its own run when known."""
    model = load_model(teacher.checkpoint).model
    batch_size, batches = settings["train"]["batch_size"], settings["train"]["eval_batches"]
    trained = evaluate(model, dataset, batch_size, batches, 0, 1, torch.device("cpu"))
    with model.capacity_override(CapacityOverride.DROPLESS):
        dropless = evaluate(model, dataset, batch_size, batches, 0, 1, torch.device("cpu"))
    own = read_metrics(teacher.checkpoint.parent.parent)
    return {
        "variant": "teacher", "checkpoint": str(teacher.checkpoint), "val_bpb": dropless.val_bpb,
        "val_bpb_trained_routing": trained.val_bpb,
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in own) if own else None,
        **task_bpb(model, dataset, args.eval_windows),
    }  # fmt: skip


def evaluate_run(
    variant: str, seed: int, run_dir: Path, dataset: TokenDataset, args: argparse.Namespace
) -> dict[str, Any]:
    """One run's row: its curve and final figures, and the per-task evaluation of its
    latest checkpoint (cached in `run_dir/task_eval.json`)."""
    records = read_metrics(run_dir)
    key = {"step": records[-1]["step"], "eval_windows": args.eval_windows}
    cached = cached_json(
        run_dir / "task_eval.json", key,
        lambda: task_bpb(load_model(run_dir).model, dataset, args.eval_windows),
    )  # fmt: skip
    return {
        "variant": variant, "seed": seed, "run_dir": str(run_dir), "steps": records[-1]["step"],
        "val_bpb": records[-1]["val_bpb"],
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in records),
        "val_bpb_per_task": cached["val_bpb_per_task"],
        "eval_tokens_per_s": cached["eval_tokens_per_s"],
        "curve": [[r["step"], r["val_bpb"]] for r in records],
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Teacher]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="checkpoint step or run directory")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, help="train.steps of every run")
    parser.add_argument("--budget-s", type=float, help="seconds per run (calibrated)")
    parser.add_argument("--calibration-steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-windows", type=int, default=200, help="per task")
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    for key in ("steps", "calibration_steps", "eval_every", "eval_windows", "threads", "parallel"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} {value} is invalid; accepted: >= 1")
    if args.budget_s is not None and not args.budget_s > 0:
        parser.error(f"--budget-s {args.budget_s} is invalid; accepted: > 0")
    if args.steps is not None and args.budget_s is not None:
        parser.error("give --steps or --budget-s, not both")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds} repeats a seed")
    try:
        teacher = read_teacher(args.teacher)
    except ValueError as error:
        parser.error(str(error))
    args.out_dir = args.out_dir.resolve()
    return args, teacher


def choose_steps(
    args: argparse.Namespace, teacher: Teacher, saved: dict[str, Any] | None
) -> tuple[int, str, dict[str, Any] | None]:
    """(steps, where they come from, the calibration or None): see the module docstring."""
    if args.steps is not None:
        return args.steps, "--steps", None
    if saved is not None:  # a sweep under way keeps its steps (a recalibration would differ)
        return saved["steps"], saved["steps_source"], saved["calibration"]
    if args.budget_s is not None:
        calibration = calibrate(teacher, args)
        return calibration["steps"], f"--budget-s {args.budget_s} (calibrated)", calibration
    return teacher.meta["config"]["train"]["steps"], "the teacher's train.steps", None


def main(argv: list[str] | None = None) -> None:
    args, teacher = parse_args(argv)
    torch.set_num_threads(args.threads)
    saved_path = args.out_dir / "sweep.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else None
    try:
        steps, source, calibration = choose_steps(args, teacher, saved)
        settings = sweep_settings(teacher, steps, args.eval_every)
        if saved is not None and (changed := [k for k in settings if saved.get(k) != settings[k]]):
            raise ValueError(
                f"{saved_path} holds a sweep with other {', '.join(changed)} (steps="
                f"{saved['steps']}); rerun it with its settings or choose another --out-dir"
            )
        record = {**settings, "steps": steps, "steps_source": source, "calibration": calibration}
        args.out_dir.mkdir(parents=True, exist_ok=True)
        saved_path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"[distill_experiment] {steps} steps per run ({source})", file=sys.stderr)
        jobs = [
            (v, seed, args.out_dir / f"{v}_s{seed}") for v in args.variants for seed in args.seeds
        ]
        pending = [job for job in jobs if not is_finished(job[2], steps)]
        if len(pending) < len(jobs):
            finished = len(jobs) - len(pending)
            print(f"[distill_experiment] {finished} runs already finished", file=sys.stderr)
        if pending:
            launch(pending, settings, args, "runs")
    except (RuntimeError, ValueError) as error:
        sys.exit(f"distill_experiment: {error}")
    dataset = build_dataset(DataConfig(**settings["data"]))
    teacher_row = evaluate_teacher(teacher, dataset, settings, args)
    rows = [evaluate_run(variant, seed, run_dir, dataset, args) for variant, seed, run_dir in jobs]
    summary = summarise(rows, teacher_row)
    footer = verdict(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "settings": record, "teacher": teacher_row, "rows": rows, "summary": summary,
            "verdict": footer, "literature": LITERATURE,
            "conditions": {"parallel": args.parallel, "threads": args.threads},
        }  # fmt: skip
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(rows, teacher_row, settings["tokens_per_step"], args.plot)
    print(markdown(summary, teacher_row, footer) if args.markdown else footer)


if __name__ == "__main__":
    main()
