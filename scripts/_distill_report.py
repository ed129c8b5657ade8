"""The summary, verdict, table and plot of `scripts/distill_experiment.py`.

Every figure comes from the rows of the runs and of the teacher; nothing here is
measured. The share of the teacher's gain a student keeps is `(bpb_scratch -
bpb_student) / (bpb_scratch - bpb_teacher)`, against the scratch run of the same seed,
beside the literature (`LITERATURE`) and the target of issue 8 (>= 50%).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from _runs import spread

LITERATURE = (
    "Kudugunta et al. 2021 kept 32% of the teacher's gain distilling a token-level MoE "
    "into a dense student; the target of issue 8 is >= 50%."
)


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
