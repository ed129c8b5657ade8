"""The tables and the plot of scripts/bench_layer.py (one row per configuration: the
medians `<implementation>_ms`, peak memory `<implementation>_peak_mb`)."""

from __future__ import annotations


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'config':<10} {'D':>4} {'H':>5} {'E':>3} {'K':>2} {'T':>5} | {'moe ms':>8} "
        f"{'cap ms':>8} {'dense ms':>8} {'ds ms':>8} | {'moe/dense':>9} {'cap/dense':>9} "
        f"{'ds/moe':>7} | {'moe MB':>7} {'dense MB':>8} {'ds MB':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['name']:<10} {row['D']:>4} {row['H']:>5} {row['E']:>3} {row['K']:>2} "
            f"{row['T']:>5} | {row['moe_ms']:>8.1f} {row['moe_capacity_ms']:>8.1f} "
            f"{row['dense_ms']:>8.1f} {row['deepspeed_ms']:>8.1f} | "
            f"{row['moe_ms'] / row['dense_ms']:>9.2f} "
            f"{row['moe_capacity_ms'] / row['dense_ms']:>9.2f} "
            f"{row['deepspeed_ms'] / row['moe_ms']:>7.2f} | {row['moe_peak_mb']:>7.1f} "
            f"{row['dense_peak_mb']:>8.1f} {row['deepspeed_peak_mb']:>7.1f}"
        )
    if all("moe_bf16_params_ms" in row for row in rows):
        lines.append("bf16: autocast over fp32 parameters (moe) against bf16 parameters:")
        for row in rows:
            lines.append(
                f"  {row['name']}: moe_bf16_params {row['moe_bf16_params_ms']:.1f} ms, "
                f"moe (autocast) {row['moe_ms']:.1f} ms, ratio autocast / bf16 params "
                f"{row['moe_ms'] / row['moe_bf16_params_ms']:.2f}; moe_fp32 "
                f"{row['moe_fp32_ms']:.1f} ms: fp32 / bf16 autocast "
                f"{row['moe_fp32_ms'] / row['moe_ms']:.2f} (per round "
                f"{row['fp32_over_bf16_round_median']:.2f})"
            )
    return "\n".join(lines)


def format_fine_grained_table(rows: list[dict]) -> str:
    header = (
        f"{'config':<14} {'D':>4} {'H':>4} {'E':>4} {'K':>2} {'T':>5} | {'moe ms':>8} "
        f"{'unfold ms':>9} {'dense ms':>8} | {'moe/dense':>9} {'unfold/dense':>12} | "
        f"{'moe MB':>7} {'unfold MB':>9} {'dense MB':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['name']:<14} {row['D']:>4} {row['H']:>4} {row['E']:>4} {row['K']:>2} "
            f"{row['T']:>5} | {row['moe_ms']:>8.1f} {row['moe_unfolded_ms']:>9.1f} "
            f"{row['dense_ms']:>8.1f} | {row['moe_ms'] / row['dense_ms']:>9.2f} "
            f"{row['moe_unfolded_ms'] / row['dense_ms']:>12.2f} | {row['moe_peak_mb']:>7.1f} "
            f"{row['moe_unfolded_peak_mb']:>9.1f} {row['dense_peak_mb']:>8.1f}"
        )
    return "\n".join(lines)


def plot_ratios(rows: list[dict], path: str, dtype: str = "fp32") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "ours dropless / dense": [r["moe_ms"] / r["dense_ms"] for r in rows],
        "ours C=1.25 / dense": [r["moe_capacity_ms"] / r["dense_ms"] for r in rows],
        "DeepSpeed / ours dropless": [r["deepspeed_ms"] / r["moe_ms"] for r in rows],
        "peak MB ours / DeepSpeed": [r["moe_peak_mb"] / r["deepspeed_peak_mb"] for r in rows],
    }
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(2.5 + 2.2 * len(rows), 4.0))
    for index, (label, values) in enumerate(series.items()):
        xs = [i + (index - (len(series) - 1) / 2) * width for i in range(len(rows))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [f"{r['name']}\nE={r['E']} T={r['T']}" for r in rows])
    ax.set_ylabel("ratio (forward + backward time, or peak memory)")
    mode = "fp32" if dtype == "fp32" else "bf16 autocast, fp32 parameters"
    ax.set_title(f"MoE layer on CPU, {mode}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
