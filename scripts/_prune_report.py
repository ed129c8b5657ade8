"""The report of `scripts/prune_experiment.py`: the summary over seeds, the verdict on
the target (2:4 experts with the permutation, distilled, within 2% bits per byte of the
unpruned model), the markdown table and the plot of bpb against sparsity."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from _runs import spread

TARGET_PCT = 2.0
TARGET_VARIANT = "nm24_perm"


def _pct(value: float, reference: float) -> float:
    return 100.0 * (value - reference) / reference


def summarise(
    rows: list[dict[str, Any]],
    reports: dict[str, dict[str, Any]],
    prunings: dict[str, tuple[float, dict[str, Any]]],
) -> dict[str, Any]:
    """Per pruning variant: sparsity, magnitude kept, expert memory, bpb as pruned, and
    over the seeds after fine-tuning (`ft`), after distillation (`kd`) and distilled with
    int8 experts; the unpruned model and its fine-tuned control; the verdict."""
    unpruned = next(r for r in rows if r["kind"] == "unpruned")
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_name[row["name"]].append(row)
    reference = unpruned["val_bpb"]
    summary: dict[str, Any] = {
        "unpruned": {k: unpruned[k] for k in ("val_bpb", "val_bpb_int8") if k in unpruned},
        "variants": {},
    }
    if "unpruned_ft" in by_name:
        summary["unpruned_ft"] = spread([r["val_bpb"] for r in by_name["unpruned_ft"]])
    for variant, report in reports.items():
        pruned = by_name[variant][0]
        entry: dict[str, Any] = {
            "sparsity": prunings[variant][0],
            "pattern": prunings[variant][1].get("pattern", "unstructured"),
            "permuted": bool(prunings[variant][1].get("permute")),
            "magnitude_kept": report["magnitude_kept"],
            "magnitude_kept_without_permutation": report["magnitude_kept_without_permutation"],
            "expert_memory_bytes": report["expert_memory_bytes"],
            "pruned": pruned["val_bpb"],
            "pruned_vs_unpruned_pct": _pct(pruned["val_bpb"], reference),
        }
        for recovery in ("ft", "kd", "sr"):
            runs = by_name.get(f"{variant}_{recovery}", [])
            if runs:
                entry[recovery] = spread([r["val_bpb"] for r in runs])
                entry[f"{recovery}_vs_unpruned_pct"] = spread(
                    [_pct(r["val_bpb"], reference) for r in runs]
                )
            if recovery == "kd" and runs and "val_bpb_int8" in runs[0]:
                entry["kd_int8"] = spread([r["val_bpb_int8"] for r in runs])
                entry["kd_int8_vs_unpruned_pct"] = spread(
                    [_pct(r["val_bpb_int8"], reference) for r in runs]
                )
        summary["variants"][variant] = entry
    target = summary["variants"].get(TARGET_VARIANT, {})
    verdict: dict[str, Any] = {
        "target": f"{TARGET_VARIANT} (2:4 experts, permuted) distilled within {TARGET_PCT}% "
        "bits per byte of the unpruned model",
    }
    if "kd_vs_unpruned_pct" in target:
        worst = max(target["kd_vs_unpruned_pct"]["values"])
        verdict |= {"kd_vs_unpruned_pct": target["kd_vs_unpruned_pct"], "met": worst <= TARGET_PCT}
        if "unpruned_ft" in summary:
            verdict["kd_vs_unpruned_ft_pct"] = _pct(
                target["kd"]["mean"], summary["unpruned_ft"]["mean"]
            )
    summary["verdict"] = verdict
    return summary


def _cell(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "-"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}" if stat["std"] else f"{stat['mean']:.4f}"


def markdown(summary: dict[str, Any]) -> str:
    """The table of the experiment (EXPERIMENTS.md)."""
    unpruned = summary["unpruned"]
    lines = [
        "| variant | sparsity | magnitude kept | as pruned | fine-tuned | SR-STE | distilled | "
        "distilled, vs unpruned | distilled + int8 | expert memory (packed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| unpruned | 0 | 1 | {unpruned['val_bpb']:.4f} | "
        f"{_cell(summary.get('unpruned_ft'))} | - | - | - | "
        f"{unpruned.get('val_bpb_int8', float('nan')):.4f} | - |",
    ]
    for variant, entry in summary["variants"].items():
        kept = f"{entry['magnitude_kept']:.4f}"
        if entry["magnitude_kept_without_permutation"] is not None:
            kept += f" (unpermuted {entry['magnitude_kept_without_permutation']:.4f})"
        memory = entry["expert_memory_bytes"]
        dense = memory["dense"]
        packed = {k: v for k, v in memory.items() if k != "dense"}
        memory_text = ", ".join(f"{k} {v / dense:.0%}" for k, v in packed.items())
        pct = entry.get("kd_vs_unpruned_pct")
        pct_text = f"{pct['mean']:+.2f}%" if pct else "-"
        lines.append(
            f"| {variant} | {entry['sparsity']:g} ({entry['pattern']}) | {kept} | "
            f"{entry['pruned']:.4f} | {_cell(entry.get('ft'))} | {_cell(entry.get('sr'))} | "
            f"{_cell(entry.get('kd'))} | "
            f"{pct_text} | {_cell(entry.get('kd_int8'))} | {memory_text} |"
        )
    verdict = summary["verdict"]
    if "met" in verdict:
        lines.append("")
        values = ", ".join(f"{v:+.2f}%" for v in verdict["kd_vs_unpruned_pct"]["values"])
        control = verdict.get("kd_vs_unpruned_ft_pct")
        lines.append(
            f"Target ({verdict['target']}): {'met' if verdict['met'] else 'not met'} "
            f"(per seed {values})"
            + (
                f"; against the unpruned model fine-tuned as long: {control:+.2f}%."
                if control is not None
                else "."
            )
        )
    return "\n".join(lines)


def _draw(axis: Any, summary: dict[str, Any], legend: bool) -> list[float]:
    """One panel of the plot; returns the recovered values drawn (not "as pruned")."""
    reference = summary["unpruned"]["val_bpb"]
    axis.axhline(reference, color="black", linestyle="--", linewidth=1, label="unpruned")
    axis.axhline(reference * 1.02, color="grey", linestyle=":", linewidth=1, label="unpruned + 2%")
    recovered = [reference]
    if "unpruned_ft" in summary:
        recovered.append(summary["unpruned_ft"]["mean"])
        axis.axhline(
            recovered[-1], color="tab:green", linestyle="--", linewidth=1,
            label="unpruned, fine-tuned",
        )  # fmt: skip
    stages = (("pruned", "as pruned", "tab:red"), ("ft", "fine-tuned", "tab:blue"),
              ("sr", "SR-STE", "tab:orange"), ("kd", "distilled", "tab:purple"))  # fmt: skip
    variants = summary["variants"]
    unstructured = sorted(
        (e["sparsity"], e) for e in variants.values() if e["pattern"] == "unstructured"
    )
    # At sparsity 0: the unpruned model as is, and fine-tuned (nothing to distil there).
    zero = {"pruned": reference, "ft": summary.get("unpruned_ft", {}).get("mean")}
    for stage, label, color in stages:
        start = zero.get(stage)
        xs, ys = ([0.0], [start]) if start is not None else ([], [])
        for sparsity, entry in unstructured:
            value = entry.get(stage)
            if value is not None:
                xs.append(sparsity)
                ys.append(value if stage == "pruned" else value["mean"])
        if any(entry.get(stage) is not None for _, entry in unstructured):
            axis.plot(xs, ys, marker="o", color=color, label=f"unstructured, {label}")
            recovered += ys[1:] if stage != "pruned" else []
        for entry in variants.values():
            if entry["pattern"] == "unstructured" or entry.get(stage) is None:
                continue
            value = entry[stage] if stage == "pruned" else entry[stage]["mean"]
            recovered += [value] if stage != "pruned" else []
            permuted = " permuted" if entry["permuted"] else ""
            axis.scatter(
                [entry["sparsity"] + (0.01 if permuted else -0.01)], [value],
                marker="*" if permuted else "s", s=90, color=color, edgecolors="black",
                zorder=3, label=f"{entry['pattern']}{permuted}, {label}",
            )  # fmt: skip
    axis.set_xlabel("sparsity of the expert weights")
    axis.set_ylabel("validation bits per byte")
    if legend:
        axis.legend(fontsize=7, ncol=2)
    return recovered


def plot(summary: dict[str, Any], path: Path) -> None:
    """Validation bpb against sparsity: as pruned, fine-tuned, SR-STE and distilled
    (unstructured as lines, N:M as markers), the unpruned model and its fine-tuned
    control as levels; the right panel zooms on the recovered models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (whole, zoom) = plt.subplots(1, 2, figsize=(12, 4.8))
    _draw(whole, summary, legend=True)
    whole.set_title("Pruning the demo MoE's experts (KJV)")
    recovered = _draw(zoom, summary, legend=False)
    margin = 0.15 * (max(recovered) - min(recovered)) + 1e-3
    zoom.set_ylim(min(recovered) - margin, max(recovered) + margin)
    zoom.set_title("recovered models (zoom)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
