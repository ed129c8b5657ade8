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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_utils import is_finished, read_metrics

from launch.training.distillation import Teacher, read_teacher
from launch.training.evaluation import evaluate
from moe.data import DataConfig, TokenDataset, build_dataset
from moe.distill.student import student_config
from moe.inference import load_model
from moe.transformer import MoETransformer, bits_per_byte
from routing import CapacityOverride

ROOT = Path(__file__).resolve().parents[1]
# variant -> (entry module, its own overrides)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "scratch": ("launch.train", ()),
    "kd_random": ("launch.distill", ("distill.init=random",)),
    "kd_top": ("launch.distill", ("distill.init=top",)),
    "kd_merge": ("launch.distill", ("distill.init=merge",)),
    "kd_top_alpha0": ("launch.distill", ("distill.init=top", "distill.alpha=0")),
}
# Copied from the teacher's run into every run (steps, warmup and eval cadence are set here).
SHARED_TRAIN_KEYS = (
    "batch_size", "lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "grad_accum",
    "eval_batches",
)  # fmt: skip
LITERATURE = (
    "Kudugunta et al. 2021 kept 32% of the teacher's gain distilling a token-level MoE "
    "into a dense student; the target of issue 8 is >= 50%."
)


def hydra_value(value: Any) -> str:
    """`value` as a Hydra command-line override value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    text = str(value.value if hasattr(value, "value") else value)
    if isinstance(value, str) and not all(c.isalnum() or c in "_./-+" for c in text):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def sweep_settings(teacher: Teacher, steps: int, eval_every: int) -> dict[str, Any]:
    """What every run of the sweep shares (also written to `out_dir/sweep.json`)."""
    config = teacher.meta["config"]
    train = {key: config["train"][key] for key in SHARED_TRAIN_KEYS}
    every = min(eval_every, steps)
    train |= {
        "steps": steps, "warmup_steps": min(config["train"]["warmup_steps"], steps),
        "eval_every": every, "checkpoint_every": every, "log_every": every, "keep_last": 2,
        "sample_tokens": 0, "progress": False, "engine": "torch", "resume": "auto",
    }  # fmt: skip
    fields = dataclasses.fields(DataConfig)
    student = student_config(teacher.model, teacher.routing, 0)
    model = {field.name: getattr(student, field.name) for field in dataclasses.fields(student)}
    return {
        "teacher": str(teacher.checkpoint.resolve()),
        "train": train,
        "data": {f.name: config["data"][f.name] for f in fields if f.name in config["data"]},
        "student_model": {k: getattr(v, "value", v) for k, v in model.items()},
        "tokens_per_step": train["batch_size"] * train["grad_accum"] * config["data"]["seq_len"],
    }


def run_command(variant: str, seed: int, settings: dict[str, Any], run_dir: Path) -> list[str]:
    """The subprocess command line of one run."""
    module, extra = VARIANTS[variant]
    overrides = [f"run_dir={hydra_value(str(run_dir))}", "wandb.mode=disabled", *extra]
    overrides += [f"train.{k}={hydra_value(v)}" for k, v in settings["train"].items()]
    overrides += [f"train.seed={seed}"]
    overrides += [f"data.{k}={hydra_value(v)}" for k, v in settings["data"].items()]
    if module == "launch.train":
        model = settings["student_model"]
        overrides += [f"model.{k}={hydra_value(v)}" for k, v in model.items()]
    else:
        overrides += [f"teacher={hydra_value(settings['teacher'])}"]
    return [sys.executable, "-m", module, *overrides]


def launch(
    jobs: list[tuple[str, int, Path]], settings: dict[str, Any], args: argparse.Namespace, desc: str
) -> dict[str, float]:
    """Run the `(variant, seed, run_dir)` jobs, `--parallel` at a time. Returns each job's
    wall seconds; raises after all of them ended when one failed (its log is named)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    logs = args.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def one(job: tuple[str, int, Path]) -> tuple[int, float]:
        variant, seed, run_dir = job
        start = time.perf_counter()
        with open(logs / f"{run_dir.name}.log", "a") as log:
            done = subprocess.run(
                run_command(variant, seed, settings, run_dir),
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
        return done.returncode, time.perf_counter() - start

    walls: dict[str, float] = {}
    failed = []
    with ThreadPoolExecutor(args.parallel) as pool, tqdm(total=len(jobs), desc=desc) as bar:
        futures = {pool.submit(one, job): job for job in jobs}
        for future in as_completed(futures):
            run_dir = futures[future][2]
            code, walls[run_dir.name] = future.result()
            if code:
                failed.append(f"{run_dir.name} (exit {code}; log {logs / run_dir.name}.log)")
            bar.set_postfix_str(run_dir.name)
            bar.update(1)
    if failed:
        raise RuntimeError("runs failed: " + ", ".join(failed))
    return walls


def calibrate(teacher: Teacher, args: argparse.Namespace) -> dict[str, Any]:
    """Steps that fit `--budget-s` per run, from `--parallel` concurrent `kd_top` runs."""
    steps = args.calibration_steps
    settings = sweep_settings(teacher, steps, steps)
    directory = args.out_dir / "_calibration"
    shutil.rmtree(directory, ignore_errors=True)
    seeds = [args.seeds[i % len(args.seeds)] for i in range(args.parallel)]
    jobs = [("kd_top", seed, directory / f"calibration_{i}") for i, seed in enumerate(seeds)]
    walls = launch(jobs, settings, args, "calibration")
    rates = [read_metrics(run_dir)[-1]["tokens_per_s"] for _, _, run_dir in jobs]
    seconds_per_step = settings["tokens_per_step"] / statistics.mean(rates)
    overhead_s = max(statistics.mean(walls.values()) - steps * seconds_per_step, 0.0)
    # 5% margin for the evaluations and checkpoints, which the longer run does more of.
    fit = int((args.budget_s - overhead_s) / (1.05 * seconds_per_step)) // 10 * 10
    shutil.rmtree(directory, ignore_errors=True)
    if fit < 10:
        raise ValueError(
            f"--budget-s {args.budget_s} fits {fit} steps ({seconds_per_step:.2f} s/step + "
            f"{overhead_s:.0f} s start-up per run); accepted: a budget of at least "
            f"{overhead_s + 11 * seconds_per_step:.0f} s"
        )
    return {
        "steps": fit, "seconds_per_step": seconds_per_step, "overhead_s": overhead_s,
        "calibration_steps": steps, "budget_s": args.budget_s,
    }  # fmt: skip


@torch.no_grad()
def task_bpb(model: MoETransformer, dataset: TokenDataset, windows: int) -> dict[str, Any]:
    """Bits per byte per task on the first `windows` validation windows of each task
    (dropless routing, eval mode), and the forward tokens/s of the whole evaluation."""
    model.eval()
    per_task, tokens, start = {}, 0, time.perf_counter()
    with model.capacity_override(CapacityOverride.DROPLESS):
        for task, name in enumerate(dataset.task_names):
            windows_NT = dataset.task_validation_windows(task, windows)
            total, count = 0.0, 0
            for begin in range(0, len(windows_NT), 32):
                tokens_BT = windows_NT[begin : begin + 32]
                task_ids_B = torch.full((len(tokens_BT),), task, dtype=torch.int64)
                logits_BTV = model(tokens_BT[:, :-1], task_ids_B).logits_BTV
                total += float(
                    torch.nn.functional.cross_entropy(
                        logits_BTV.flatten(0, 1).float(),
                        tokens_BT[:, 1:].flatten(),
                        reduction="sum",
                    )
                )
                count += tokens_BT[:, 1:].numel()
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
    cache = run_dir / "task_eval.json"
    key = {"step": records[-1]["step"], "eval_windows": args.eval_windows}
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("key") != key:
        cached = {"key": key, **task_bpb(load_model(run_dir).model, dataset, args.eval_windows)}
        cache.write_text(json.dumps(cached, indent=1) + "\n")
    return {
        "variant": variant, "seed": seed, "run_dir": str(run_dir), "steps": records[-1]["step"],
        "val_bpb": records[-1]["val_bpb"],
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in records),
        "val_bpb_per_task": cached["val_bpb_per_task"],
        "eval_tokens_per_s": cached["eval_tokens_per_s"],
        "curve": [[r["step"], r["val_bpb"]] for r in records],
    }  # fmt: skip


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and the values."""
    return {
        "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values), "max": max(values), "values": values,
    }  # fmt: skip


def summarise(rows: list[dict[str, Any]], teacher: dict[str, Any]) -> dict[str, Any]:
    """Gains per row (in place) and per variant: mean and spread over seeds."""
    scratch = {row["seed"]: row["val_bpb"] for row in rows if row["variant"] == "scratch"}
    for row in rows:
        gain = scratch.get(row["seed"], float("nan")) - teacher["val_bpb"]
        kept = (
            (scratch.get(row["seed"], float("nan")) - row["val_bpb"]) / gain if gain > 0 else None
        )
        row["gain_kept"] = kept
    summary = {}
    for variant in dict.fromkeys(row["variant"] for row in rows):
        mine = [row for row in rows if row["variant"] == variant]
        kept = [row["gain_kept"] for row in mine if row["gain_kept"] is not None]
        tasks = mine[0]["val_bpb_per_task"]
        summary[variant] = {
            "seeds": [row["seed"] for row in mine], "val_bpb": spread([r["val_bpb"] for r in mine]),
            "gain_kept": spread(kept) if len(kept) == len(mine) else None,
            "val_bpb_per_task": {
                task: statistics.mean(r["val_bpb_per_task"][task] for r in mine) for task in tasks
            },
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in mine),
            "eval_tokens_per_s": statistics.mean(r["eval_tokens_per_s"] for r in mine),
        }  # fmt: skip
    return summary


def verdict(summary: dict[str, Any]) -> str:
    """The best distilled variant's share of the gain beside the literature and target."""
    kept = {v: s["gain_kept"] for v, s in summary.items() if v != "scratch" and s["gain_kept"]}
    if not kept:
        return f"No share of the gain measured (no scratch run, or no teacher gain). {LITERATURE}"
    best = max(kept, key=lambda v: kept[v]["mean"])
    share = kept[best]
    met = "met" if share["mean"] >= 0.5 else "not met"
    per_seed = ", ".join(f"{v:.0%}" for v in share["values"])
    return (
        f"Best distilled student: {best} keeps {share['mean']:.0%} ± {share['std']:.0%} of the "
        f"teacher's gain (seeds: {per_seed}); target >= 50%: {met}. {LITERATURE}"
    )


def markdown(summary: dict[str, Any], teacher: dict[str, Any], footer: str) -> str:
    """The table (means over seeds, ± the sample standard deviation) and the verdict."""
    tasks = list(teacher["val_bpb_per_task"])
    lines = [
        "| model | seeds | val bpb | gain kept | " + " | ".join(tasks) + " | train tok/s | "
        "eval tok/s |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|---|",
        f"| teacher (MoE) | - | {teacher['val_bpb']:.4f} | 100% | "
        + " | ".join(f"{teacher['val_bpb_per_task'][t]:.4f}" for t in tasks)
        + f" | {teacher['tokens_per_s'] or float('nan'):.0f} (own run) | "
        f"{teacher['eval_tokens_per_s']:.0f} |",
    ]
    for variant, s in summary.items():
        kept = s["gain_kept"]
        kept_text = "-" if kept is None else f"{kept['mean']:.0%} ± {kept['std']:.0%}"
        lines.append(
            f"| {variant} | {len(s['seeds'])} | {s['val_bpb']['mean']:.4f} ± "
            f"{s['val_bpb']['std']:.4f} | {kept_text} | "
            + " | ".join(f"{s['val_bpb_per_task'][t]:.4f}" for t in tasks)
            + f" | {s['tokens_per_s']:.0f} | {s['eval_tokens_per_s']:.0f} |"
        )
    teacher_note = (
        f"Teacher: val bpb {teacher['val_bpb']:.4f} dropless (the reference of the gain), "
        f"{teacher['val_bpb_trained_routing']:.4f} with its trained capacity policy."
    )
    return "\n".join([*lines, "", teacher_note, footer])


def plot(
    rows: list[dict[str, Any]], teacher: dict[str, Any], tokens_per_step: int, path: Path
) -> None:
    """Validation bpb against training tokens, mean over seeds; the teacher as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for variant in dict.fromkeys(row["variant"] for row in rows):
        curves = [dict(row["curve"]) for row in rows if row["variant"] == variant]
        steps = sorted(set.intersection(*(set(curve) for curve in curves)))
        means = [statistics.mean(curve[step] for curve in curves) for step in steps]
        axes.plot([s * tokens_per_step for s in steps], means, marker="o", label=variant)
    axes.axhline(teacher["val_bpb"], color="black", linestyle="--", label="teacher (MoE)")
    axes.set_xlabel("training tokens")
    axes.set_ylabel("validation bits per byte")
    axes.set_title("dense students: validation bpb (mean over seeds)")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


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
