"""`python -m launch.plan [overrides]`: rank inference layouts for a model on a machine.

    python -m launch.plan model=small hardware=h100x8 plan.batch=8
    python -m launch.plan model=small hardware=local plan.precision=fp32
    python -m launch.plan plan.checkpoint=runs/demo_token hardware=h100x512 \\
        plan.objective=latency plan.latency_target_ms=5 plan.json=plan.json plan.plot=plan.png

The model shape is a `model=` preset (with `plan.top_k`), or the shape a checkpoint was
saved with (`plan.checkpoint`, whose routing gives K). The hardware is a
`conf/hardware/` preset (`local` is measured by `scripts/calibrate_hardware.py`). The
planner (`moe.planning.planner`, Pope et al. 2022) estimates prefill and decode per
layout and chip count; the table ranks them (fits first, then the latency target, then
chip-seconds per token or latency). `plan.json=PATH` writes the same rows as JSON;
`plan.plot=PATH` plots decode latency per token against batch size, for each layout
its best chip count. A bad value exits with status 2 and one line naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from launch.cli import exits_on_bad_input
from launch.config import register_configs
from launch.schema import build, hydra_schema, plain_container
from moe.checkpoint import read_meta
from moe.config import ModelConfig
from moe.inference.loading import configs_of, resolve_checkpoint
from moe.planning.hardware import Hardware, Precision, parse_precision
from moe.planning.model_costs import ModelShape, Workload, shape_from_config
from moe.planning.planner import OBJECTIVES, Estimate, Layout, plan

CONFIG_PATH = "../conf"
ACTIVATIONS = ("auto", "fp32", "bf16", "int8")


@dataclass
class PlanOptions:
    """What to plan. `precision`: weights; `activations` `auto` is fp32 with fp32
    weights and bf16 otherwise (int8 stays weight-only); `int8_scope`: `all` weights or
    only the `experts`; `latency_target_ms` 0 is none; `rows` 0 prints every row."""

    batch: int = 8
    prompt_len: int = 64
    gen_len: int = 64
    precision: Precision = Precision.BF16
    activations: str = "auto"
    int8_scope: str = "all"
    top_k: int = 2
    checkpoint: str = ""
    objective: str = "cost"
    latency_target_ms: float = 0.0
    rows: int = 0
    json: str = ""
    plot: str = ""
    plot_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])

    def __post_init__(self) -> None:
        self.precision = parse_precision(self.precision, "plan.precision")
        if self.activations not in ACTIVATIONS:
            raise ValueError(
                f"plan.activations={self.activations!r} is invalid; accepted: "
                f"{', '.join(ACTIVATIONS)}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"plan.objective={self.objective!r} is invalid; accepted: {', '.join(OBJECTIVES)}"
            )
        if isinstance(self.rows, bool) or self.rows < 0:
            raise ValueError(f"plan.rows={self.rows} is invalid; accepted: an integer >= 0")
        if not self.plot_batches or any(b < 1 for b in self.plot_batches):
            raise ValueError(
                f"plan.plot_batches={list(self.plot_batches)} is invalid; accepted: a non-empty "
                "list of batch sizes >= 1"
            )
        self.workload()  # validates batch, lengths, int8_scope

    def workload(self, batch: int | None = None) -> Workload:
        activations = self.activations
        if activations == "auto":
            activations = "fp32" if self.precision is Precision.FP32 else "bf16"
        return Workload(
            batch=self.batch if batch is None else batch, prompt_len=self.prompt_len,
            gen_len=self.gen_len, weights=self.precision,
            activations=parse_precision(activations, "plan.activations"),
            int8_scope=self.int8_scope,
        )  # fmt: skip


@dataclass
class PlanRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: Hardware = field(default_factory=Hardware)
    plan: PlanOptions = field(default_factory=PlanOptions)


def format_table(rows: list[Estimate], batch: int, limit: int = 0) -> str:
    """A markdown table of ranked estimates (all rows when `limit` is 0)."""
    lines = [
        "| rank | layout | chips | decode ms/tok | compute | memory | comm | host | a2a "
        "| prefill ms | MFU | GB/chip | fits | chip-ms/tok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(rows[: limit or None], 1):
        d = e.decode
        lines.append(
            f"| {i} | {e.layout} | {e.chips} | {1e3 * d.time_s:.3f} | {1e3 * d.compute_s:.3f} "
            f"| {1e3 * d.memory_s:.3f} | {1e3 * d.comm_s:.3f} | {1e3 * d.host_s:.3f} "
            f"| {d.all_to_all} | {1e3 * e.prefill.time_s:.2f} | {e.prefill_mfu:.2f} "
            f"| {e.memory_per_chip / 1e9:.3g} | {'yes' if e.fits else 'no'} "
            f"| {1e3 * e.chip_s_per_token(batch):.4f} |"
        )
    return "\n".join(lines)


def register_plan_configs() -> None:
    register_configs()  # the model group's base_model
    store = ConfigStore.instance()
    store.store(name="base_plan", node=hydra_schema(PlanRunConfig))
    store.store(group="hardware", name="base_hardware", node=hydra_schema(Hardware))


def to_plan_config(cfg: DictConfig | dict[str, Any]) -> PlanRunConfig:
    return build(PlanRunConfig, plain_container(cfg))


def model_shape(config: PlanRunConfig) -> ModelShape:
    """The `model=` preset's shape, or the checkpoint's (its routing's K) when given."""
    options = config.plan
    if not options.checkpoint:
        m = config.model
        name = f"model D={m.d_model} L={m.n_layers} E={m.num_experts} H={m.expert_hidden}"
        return shape_from_config(m, options.top_k, name=name)
    directory = resolve_checkpoint(options.checkpoint)
    model_config, routing = configs_of(read_meta(directory))
    top_k = routing.top_k if routing is not None else options.top_k
    return shape_from_config(model_config, top_k, name=str(directory))


def best_per_layout(
    shape: ModelShape, config: PlanRunConfig, batches: list[int]
) -> dict[str, list[Estimate | None]]:
    """For each layout and batch size, its best fitting chip count under the objective."""
    out: dict[str, list[Estimate | None]] = {layout.value: [] for layout in Layout}
    for batch in batches:
        rows = plan(shape, config.plan.workload(batch), config.hardware,
                    objective=config.plan.objective)  # fmt: skip
        for layout in out:
            fitting = [r for r in rows if r.layout == layout and r.fits]
            out[layout].append(fitting[0] if fitting else None)
    return out


def write_plot(path: str, shape: ModelShape, config: PlanRunConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(config.plan.plot_batches)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layout, best in best_per_layout(shape, config, batches).items():
        points = [(b, e.decode_ms_per_token, e.chips) for b, e in zip(batches, best) if e]
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=layout)
        for b, ms, chips in points:
            ax.annotate(str(chips), (b, ms), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("decode ms per token")
    ax.set_title(f"{shape.name} on {config.hardware.name}, {config.plan.precision.value} "
                 f"(labels: chips, best by {config.plan.objective})", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_plan(config: PlanRunConfig) -> tuple[ModelShape, list[Estimate]]:
    shape = model_shape(config)
    options = config.plan
    rows = plan(shape, options.workload(), config.hardware, objective=options.objective,
                latency_target_ms=options.latency_target_ms)  # fmt: skip
    return shape, rows


@hydra.main(config_path=CONFIG_PATH, config_name="plan", version_base=None)
@exits_on_bad_input("launch.plan")
def main(cfg: DictConfig) -> None:
    config = to_plan_config(cfg)
    shape, rows = run_plan(config)
    options, hw = config.plan, config.hardware
    print(
        f"# {shape.name} ({shape.n_layers} blocks, D={shape.d_model}, experts "
        f"{sorted(set(shape.experts_per_block))}, K={shape.top_k}) on {hw.name} ({hw.chips} "
        f"chips); B={options.batch}, prompt {options.prompt_len}, generate {options.gen_len}, "
        f"weights {options.precision.value}; ranked by {options.objective}"
        + (f", target {options.latency_target_ms:g} ms/token" if options.latency_target_ms else "")
    )
    print(format_table(rows, options.batch, options.rows))
    if options.json:
        record = {
            "model": shape.__dict__, "hardware": hw.to_dict(),
            "workload": {k: (v.value if hasattr(v, "value") else v)
                         for k, v in options.workload().__dict__.items()},
            "objective": options.objective, "latency_target_ms": options.latency_target_ms,
            "rows": [r.to_dict(options.batch) for r in rows],
        }  # fmt: skip
        Path(options.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"[plan] wrote {options.json}")
    if options.plot:
        write_plot(options.plot, shape, config)
        print(f"[plan] wrote {options.plot}")


register_plan_configs()

if __name__ == "__main__":
    main()
