"""The sweep of `scripts/distill_experiment.py`: its variants, the settings every run
shares, each run's command line, the launch of the runs and the calibration of a time
budget.

- `VARIANTS`: variant -> (entry module, its own Hydra overrides): `scratch` trains the
  student's model (`moe.distill.student.student_config` of the teacher) from scratch
  with `launch.train`; the `kd_*` variants distil with `launch.distill`;
- `sweep_settings`: the teacher's data and training settings (`SHARED_TRAIN_KEYS`), the
  steps, the evaluation and checkpoint cadence and the student's model config, as every
  run gets them (and as `out_dir/sweep.json` keeps them);
- `run_command`: one run's subprocess command line (Hydra overrides, `hydra_value`);
- `launch`: the `(variant, seed, run_dir)` jobs, `--parallel` at a time
  (`_runs.launch_runs`);
- `calibrate`: the steps that fit `--budget-s` per run, from `--parallel` concurrent
  `kd_top` runs of `--calibration-steps`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from _runs import launch_runs, read_metrics

from launch.training.distillation import Teacher
from moe.data import DataConfig
from moe.distill.student import student_config

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
    """Run the `(variant, seed, run_dir)` jobs, `--parallel` at a time (`_runs.launch_runs`).
    Returns each job's wall seconds; raises after all of them ended when one failed (its
    log is named)."""

    def command(variant: str, seed: int, run_dir: Path) -> list[str]:
        return run_command(variant, seed, settings, run_dir)

    walls, failed = launch_runs(
        jobs, command, args.out_dir / "logs", args.parallel, args.threads, desc
    )
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
