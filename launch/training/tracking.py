"""What a run records: wandb (offline by default), `metrics.jsonl`, the expert-load heatmap.

Only rank 0 tracks; the other ranks get a `Tracker` that does nothing. Everything lands
under `run_dir`: `metrics.jsonl` (one JSON object per evaluation), `wandb/` (the wandb
run; `WANDB_MODE=online` in the environment syncs it, otherwise `wandb.mode` decides),
`plots/expert_load.png`. The wandb run id is kept in `run_dir/wandb_run_id`, so a resumed
run continues the same wandb run.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from launch.config import WandbConfig, WandbMode

METRICS_FILE = "metrics.jsonl"
HEATMAP_FILE = "plots/expert_load.png"
# The wandb modes a run may take (from `WANDB_MODE` or `wandb.mode`).
WANDB_RUN_MODES: tuple[Literal["online", "offline", "disabled"], ...] = (
    "online",
    "offline",
    "disabled",
)


class Tracker:
    """Logs scalars to wandb and evaluation records to `metrics.jsonl` (rank 0 only)."""

    def __init__(
        self,
        run_dir: str | Path,
        config: WandbConfig,
        run_config: Mapping[str, Any],
        enabled: bool,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._wandb_run: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = os.environ if environ is None else environ
        if config.mode == WandbMode.DISABLED:
            return
        requested = env.get("WANDB_MODE") or config.mode.value  # the environment decides sync
        mode = next((m for m in WANDB_RUN_MODES if m == requested), None)
        if mode is None:
            raise ValueError(
                f"WANDB_MODE={requested!r} is not one of: {', '.join(WANDB_RUN_MODES)}"
            )
        import wandb  # slow to import; only the tracking rank pays for it

        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self._wandb_run = wandb.init(
            project=config.project,
            name=config.name or None,
            tags=list(config.tags),
            dir=str(self.run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
            config=dict(run_config),
            settings=wandb.Settings(silent=True, console="off"),
        )

    @property
    def wandb_dir(self) -> Path | None:
        """The wandb run's directory (None when wandb is off)."""
        if self._wandb_run is None:
            return None
        return Path(self._wandb_run.dir).parent

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.log(dict(scalars), step=step)

    def log_evaluation(self, record: Mapping[str, float | int]) -> None:
        """Append `record` (step, train_loss, val_loss, val_bpb, tokens_per_s, ...) to
        metrics.jsonl and to wandb."""
        if not self.enabled:
            return
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(dict(record)) + "\n")
        self.log(int(record["step"]), {k: v for k, v in record.items() if k != "step"})

    def save_heatmap(
        self, load_per_layer: Sequence[np.ndarray], layer_names: Sequence[str]
    ) -> Path | None:
        """Write the layers x experts heatmap of the fraction of token-slots each expert
        received; returns its path (None on ranks that do not track)."""
        if not self.enabled or not load_per_layer:
            return None
        path = self.run_dir / HEATMAP_FILE
        save_expert_load_heatmap(load_per_layer, layer_names, path)
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({"expert_load": wandb.Image(str(path))})
        return path

    def finish(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def save_expert_load_heatmap(
    load_per_layer: Sequence[np.ndarray], layer_names: Sequence[str], path: Path
) -> None:
    """Heatmap of load fractions; layers with fewer experts (PR-MoE pyramid) are padded
    with blanks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    max_experts = max(len(load) for load in load_per_layer)
    grid_LE = np.full((len(load_per_layer), max_experts), np.nan)
    for layer, load_E in enumerate(load_per_layer):
        total = float(np.sum(load_E))
        grid_LE[layer, : len(load_E)] = load_E / total if total > 0 else 0.0
    width = max(4.5, 1.6 + 0.45 * max_experts)
    figure = Figure(figsize=(width, max(2.5, 1.2 + 0.45 * len(load_per_layer))))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(grid_LE, cmap="viridis", aspect="auto", vmin=0.0)
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_xticks(range(max_experts))
    axes.set_yticks(range(len(layer_names)), labels=list(layer_names))
    axes.set_title("fraction of token-slots per expert")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
