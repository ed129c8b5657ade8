"""The summary, literature comparison, table and plot of `scripts/compare_routing.py`.

Every figure comes from the runs' rows; nothing here is measured or hard-coded.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from _routing_sweep import read_at
from _runs import spread


def summarise(
    rows: list[dict[str, Any]], costs: dict[str, dict[str, int]], rates: dict[str, float]
) -> dict[str, Any]:
    """Per variant: bpb at equal tokens (the final one) and at equal seconds, per group,
    tokens/s, dropped fraction, cost. Equal seconds: a variant's training time at `tokens`
    is tokens / its interleaved tokens/s (`rates`); every curve is read at the common time
    T* = the shortest time any run needs for its whole budget (the fastest variant's)."""
    common = min(row["curve"][-1]["tokens"] / rates[row["variant"]] for row in rows)
    variants: dict[str, Any] = {}
    for name in dict.fromkeys(row["variant"] for row in rows):
        mine = [row for row in rows if row["variant"] == name]
        at_common = [
            read_at(
                [point["tokens"] for point in row["curve"]],
                [point["val_bpb"] for point in row["curve"]],
                rates[name] * common,
            )
            for row in mine
        ]
        read = [value for value in at_common if value is not None]
        groups = mine[0]["val_bpb_per_group"]
        variants[name] = {
            "seeds": [row["seed"] for row in mine],
            "val_bpb": spread([row["val_bpb"] for row in mine]),
            "val_bpb_at_common_seconds": spread(read) if len(read) == len(mine) else None,
            "tokens_at_common_seconds": rates[name] * common,
            "val_bpb_per_group": {
                group: statistics.mean(row["val_bpb_per_group"][group] for row in mine)
                for group in groups
            },
            "tokens_per_s_interleaved": rates[name],
            "tokens_per_s": statistics.mean(row["tokens_per_s"] for row in mine),
            "train_seconds": statistics.mean(row["train_seconds"] for row in mine),
            "dropped_fraction": statistics.mean(row["dropped_fraction"] for row in mine),
            **costs[name],
        }
    return {"common_seconds": common, "variants": variants}


def _difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """a - b of the mean val bpb, and the noise scale: the larger seed spread (max - min)."""
    noise = max(
        a["val_bpb"]["max"] - a["val_bpb"]["min"], b["val_bpb"]["max"] - b["val_bpb"]["min"]
    )
    return {"difference": a["val_bpb"]["mean"] - b["val_bpb"]["mean"], "seed_spread": noise}


def literature(variants: dict[str, Any]) -> list[dict[str, Any]]:
    """Each literature claim the sweep touches, with what we measured and a verdict; a
    claim whose variants were not run is left out."""
    claims = []
    if {"sigma_moe", "dense_total"} <= set(variants):
        sigma, dense = variants["sigma_moe"], variants["dense_total"]
        diff = _difference(sigma, dense)
        share = sigma["ffn_flops_per_token"] / dense["ffn_flops_per_token"]
        reproduced = diff["difference"] <= diff["seed_spread"]
        claims.append({
            "claim": "sigma-MoE matches the parameter-equal dense model with a fraction of its "
            "FFN compute (Csordas et al. 2023)",
            "measured": f"sigma_moe {sigma['val_bpb']['mean']:.4f} vs dense_total "
            f"{dense['val_bpb']['mean']:.4f} bpb (difference {diff['difference']:+.4f}, seed "
            f"spread {diff['seed_spread']:.4f}) with {share:.0%} of its FFN FLOPs per token",
            "reproduced": reproduced, **diff, "ffn_flops_share": share,
        })  # fmt: skip
    for capacity in ("0.5", "1.0"):
        bpr, vanilla = f"bpr_c{capacity}", f"vanilla_c{capacity}"
        if {bpr, vanilla} <= set(variants):
            diff = _difference(variants[bpr], variants[vanilla])
            better = -diff["difference"] > diff["seed_spread"]
            claims.append({
                "claim": f"BPR beats vanilla order at C={capacity} (Riquelme et al. 2021: much "
                "better when C <= 0.5)",
                "measured": f"bpr {variants[bpr]['val_bpb']['mean']:.4f} vs vanilla "
                f"{variants[vanilla]['val_bpb']['mean']:.4f} bpb (difference "
                f"{diff['difference']:+.4f}, seed spread {diff['seed_spread']:.4f}); dropped "
                f"{variants[bpr]['dropped_fraction']:.1%} vs "
                f"{variants[vanilla]['dropped_fraction']:.1%} of the slots",
                "reproduced": better if capacity == "0.5" else None, **diff,
            })  # fmt: skip
    if {"task", "top2", "dense_active"} <= set(variants):
        dense = variants["dense_active"]["val_bpb"]["mean"]
        token, task = variants["top2"]["val_bpb"]["mean"], variants["task"]["val_bpb"]["mean"]
        kept = (dense - task) / (dense - token) if dense > token else None
        claims.append({
            "claim": "task-level routing keeps most of the quality of token-level routing while "
            "a task needs only K experts per layer (Kudugunta et al. 2021)",
            "measured": f"task {task:.4f}, token-level top2 {token:.4f}, dense at equal active "
            f"parameters {dense:.4f} bpb: task routing keeps "
            + (f"{kept:.0%}" if kept is not None else "- (top2 does not beat the dense model)")
            + " of token routing's gain over the dense model, using 2 of 8 experts per layer "
            "per task",
            "reproduced": kept is not None and kept >= 0.5, "gain_kept": kept,
        })  # fmt: skip
    return claims


def markdown(summary: dict[str, Any], claims: list[dict[str, Any]]) -> str:
    """The table (means over seeds, ± the sample standard deviation) and the claims."""
    variants = summary["variants"]
    groups = list(next(iter(variants.values()))["val_bpb_per_group"])
    lines = [
        f"| variant | seeds | val bpb, equal tokens | val bpb at {summary['common_seconds']:.0f} s "
        "| " + " | ".join(groups) + " | FFN MFLOP/token | params total | params active | "
        "tok/s interleaved | tok/s in sweep | dropped |",
        "|---|---|---|---|" + "---|" * len(groups) + "---|---|---|---|---|---|",
    ]
    for name, s in variants.items():
        common = s["val_bpb_at_common_seconds"]
        common_text = "-" if common is None else f"{common['mean']:.4f} ± {common['std']:.4f}"
        lines.append(
            f"| {name} | {len(s['seeds'])} | "
            f"{s['val_bpb']['mean']:.4f} ± {s['val_bpb']['std']:.4f} | {common_text} | "
            + " | ".join(f"{s['val_bpb_per_group'][g]:.4f}" for g in groups)
            + f" | {s['ffn_flops_per_token'] / 1e6:.3f} | {s['params_total']:,} | "
            f"{s['params_active']:,} | {s['tokens_per_s_interleaved']:.0f} | "
            f"{s['tokens_per_s']:.0f} | {s['dropped_fraction']:.1%} |"
        )
    lines.append("")
    for claim in claims:
        verdict = {True: "reproduced", False: "not reproduced", None: "(reference point)"}
        lines.append(f"- {claim['claim']}: {claim['measured']}. {verdict[claim['reproduced']]}.")
    return "\n".join(lines)


def plot(
    rows: list[dict[str, Any]], rates: dict[str, float], common_seconds: float, path: Path
) -> None:
    """Validation bpb against training tokens (mean over seeds) and against training
    seconds at the interleaved tokens/s (every seed; the dotted line is the common time)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5))
    FigureCanvasAgg(figure)
    by_tokens, by_seconds = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    names = list(dict.fromkeys(row["variant"] for row in rows))
    palette = [f"C{i}" for i in range(10)] + ["black", "gray"]
    for index, name in enumerate(names):
        color = palette[index % len(palette)]
        style = "-" if index < 10 else "--"
        mine = [row for row in rows if row["variant"] == name]
        curves = [{p["tokens"]: p["val_bpb"] for p in row["curve"]} for row in mine]
        tokens = sorted(set.intersection(*(set(curve) for curve in curves)))
        means = [statistics.mean(curve[t] for curve in curves) for t in tokens]
        by_tokens.plot(tokens, means, style, color=color, marker="o", markersize=3, label=name)
        for seed_index, row in enumerate(mine):
            by_seconds.plot(
                [p["tokens"] / rates[name] for p in row["curve"]],
                [p["val_bpb"] for p in row["curve"]],
                style, color=color, alpha=1.0 if seed_index == 0 else 0.5,
                label=name if seed_index == 0 else None,
            )  # fmt: skip
    by_seconds.axvline(common_seconds, color="black", linestyle=":", label="T* (common time)")
    by_tokens.set_xlabel("training tokens")
    by_seconds.set_xlabel("training seconds at the interleaved tokens/s (1 thread)")
    for axes in (by_tokens, by_seconds):
        axes.set_ylabel("validation bits per byte")
        axes.grid(alpha=0.3)
    by_tokens.set_title("equal tokens (mean over seeds)")
    by_seconds.set_title("equal seconds (each seed)")
    by_seconds.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
