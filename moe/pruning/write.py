"""A pruned checkpoint: `launch.prune`'s output, an ordinary checkpoint (generate,
subset, serve, distill, train load it) whose pruned weights are zeros.

Its meta.json keeps, under `extra.pruning`, the method, pattern and scope, every mask
by parameter name and global expert id (the tensors in extra.safetensors, beside
meta.json), and the report of `moe.pruning.oneshot` (sparsity, magnitude kept with and
without the permutation, expert memory in packed formats). A run that starts from it
(`train.init_from`) keeps those masks. With `quantize="int8"` the pruned experts are
then stored int8 (pruning keeps exact zeros through the quantization: round(0 / s) = 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe.checkpoint import decode_state, read_meta, resolve_latest, save_checkpoint
from moe.checkpoint.files import EXTRA_FILE, load_tensors, read_verified
from moe.inference.loading import QUANTIZATIONS, load_model, resolve_checkpoint
from moe.interop.tokenizer import TOKENIZER_FILES
from moe.pruning.config import PruneConfig, PruneScope
from moe.pruning.oneshot import PruneReport, prune_model, pruning_record
from moe.pruning.serialize import read_stacked
from moe.pruning.targets import prunable_weights
from moe.transformer import MoETransformer

PRUNING_KEY = "pruning"


@dataclass(frozen=True)
class PruneResult:
    """What `write_pruned` wrote: the step directory, the report, the bytes of the
    expert files on disk, and the evaluations before and after pruning (if asked)."""

    directory: Path
    source: Path
    report: PruneReport
    expert_file_bytes: int
    source_expert_file_bytes: int
    evaluation: dict[str, float]


def expert_file_bytes(step_dir: Path) -> int:
    """Bytes of a step directory's expert files."""
    return sum(path.stat().st_size for path in (step_dir / "experts").glob("*.safetensors"))


def _extra(checkpoint: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's `extra` (its tensors sha256-checked), without loading the model."""
    has_tensors = EXTRA_FILE in meta["files"]
    tensors = load_tensors(checkpoint, EXTRA_FILE, meta) if has_tensors else {}
    extra: dict[str, Any] = decode_state(meta["extra"], tensors)
    return extra


def _check_out(out: Path, source: Path) -> None:
    if out.resolve() in (source.resolve(), source.parent.resolve()):
        raise ValueError(
            f"out={str(out)!r} is the source checkpoint's own directory; accepted: another "
            "directory"
        )
    if (out / "latest").is_file() and resolve_latest(out) is not None:
        raise ValueError(
            f"out={str(out)!r} already holds a checkpoint; accepted: a new or empty directory"
        )


def write_pruned(
    checkpoint: str | Path,
    out: str | Path,
    config: PruneConfig,
    quantize: str = "none",
    evaluate: Callable[[MoETransformer], float] | None = None,
) -> PruneResult:
    """Prune `checkpoint` (a step, checkpoints or run directory; float experts) as
    `config` says (one shot) and write it to `out` (`out/step_N`, the source's step,
    run config and tokenizer). `evaluate(model)` -> bits per byte, called before and
    after pruning, when given. ValueError for bad input (module `oneshot`)."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is invalid; accepted: {', '.join(QUANTIZATIONS)}")
    source = resolve_checkpoint(checkpoint)
    out = Path(out)
    _check_out(out, source)
    meta = read_meta(source)
    loaded = load_model(source)
    model = loaded.model
    evaluation: dict[str, float] = {}
    if evaluate is not None:
        evaluation["val_bpb_before"] = evaluate(model)
    # A pruned checkpoint pruned further: its masks stay (and those outside the scope).
    every = {weight.name: weight for weight in prunable_weights(model, PruneScope.ALL)}
    saved = (_extra(source, meta).get(PRUNING_KEY) or {}).get("masks", {})
    if unknown := sorted(set(saved) - set(every)):
        raise ValueError(f"checkpoint {source} has pruning masks for {unknown}, not in its model")
    alive = {name: read_stacked(every[name], entry, name) for name, entry in saved.items()}
    masks, report = prune_model(model, config, alive)
    masks = alive | masks
    if evaluate is not None:
        evaluation["val_bpb_after"] = evaluate(model)
    record: dict[str, Any] = pruning_record(config, masks, list(every.values()))
    record["report"] = report.as_dict()
    record["quantization"] = quantize
    record["source"] = str(source.resolve())
    record["evaluation"] = evaluation
    if quantize == "int8":
        from moe.inference.quant import quantize_experts

        quantize_experts(model)
    extra: dict[str, Any] = {PRUNING_KEY: record}
    if loaded.subset is not None:
        extra["subset"] = loaded.subset
    attachments = {
        name: read_verified(source, name, meta)
        for name in TOKENIZER_FILES
        if name in meta.get("files", {})
    }
    step_dir = save_checkpoint(
        out, model, None, loaded.step, loaded.run_config, extra=extra,
        layer_num_experts={layer["module"]: layer["num_experts"] for layer in meta["moe_layers"]},
        attachments=attachments,
    )  # fmt: skip
    return PruneResult(
        directory=step_dir,
        source=source,
        report=report,
        expert_file_bytes=expert_file_bytes(step_dir),
        source_expert_file_bytes=expert_file_bytes(source),
        evaluation=evaluation,
    )
