"""Task expert subsets: a standalone checkpoint with the dense weights and only the
experts one task uses (Kudugunta et al. 2021, "Beyond Distillation").

Which experts a task keeps, per MoE layer:
- task-level routing (`routing.router=task`): exactly the task's K experts
  (`TaskRouter.experts_for_task`); every token of the task goes there, so the subset
  computes what the full model computes on that task.
- token-level routing (topk, sigma): the smallest set of experts that carries a share
  `coverage` of the task's routed token-slots (`experts_for_coverage`), measured with
  dropless routing on a bounded, seeded sample of the task's training windows
  (`measure_task_usage`). The subset's routers are restricted to that set: the other
  experts' logits are masked (`Router.restrict`), so a softmax router renormalises over
  the kept experts. At `coverage=1.0` every expert the measured tokens reached is kept,
  so on the measured sequences the subset computes what the full model computes (exactly
  when the top-k weights are renormalised, `routing.normalize_weights=true`, or with
  sigmoid gates).

The subset is an ordinary checkpoint (`moe.checkpoint`): meta.json lists per MoE layer
the global ids it holds, `extra["subset"]` says how it was made (task, routing,
coverage, source, experts per block), and `moe.inference.load_model` builds it without
the full checkpoint (a `LocalDispatcher` over the ids, routers restricted).

Shapes: B windows, T positions, E experts of a layer (global), K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe.checkpoint import read_meta, resolve_latest, save_checkpoint
from moe.data import DataConfig, TaskCorpus, build_corpus
from moe.dispatchers import Dispatcher, LocalDispatcher
from moe.experts import expert_modules
from moe.inference.loading import QUANTIZATIONS, load_model, resolve_checkpoint, subset_ids
from moe.inference.task_usage import (
    DEFAULT_MAX_WINDOWS,
    DEFAULT_SEED,
    experts_for_coverage,
    measure_task_usage,
    task_experts_task_routing,
    task_training_windows,
)
from moe.transformer import MoETransformer
from routing import RouterKind


@dataclass(frozen=True)
class SubsetResult:
    """What `write_subset` wrote. `directory`: the step directory; `experts`: block index
    -> kept global ids; `num_experts`: block index -> the layer's global E;
    `checkpoint_bytes`: bytes of every file of the step directory."""

    directory: Path
    source: Path
    task: int
    routing: str
    coverage: float
    experts: dict[int, list[int]]
    num_experts: dict[int, int]
    checkpoint_bytes: int
    measured_windows: int


def experts_module_name(block: int) -> str:
    """The qualified name of block `block`'s expert stack in `MoETransformer`."""
    return f"blocks.{block}.ffn.experts"


def resolve_task(task: int | str, task_names: tuple[str, ...] | None) -> int:
    """A task id from an id or (with `task_names`) a name; ids are checked by the caller."""
    if isinstance(task, bool):
        raise ValueError(f"task={task!r} is invalid; accepted: a task id or name")
    if isinstance(task, int):
        return task
    text = str(task).strip()
    if not _is_task_name(text):
        return int(text)
    if task_names is not None and text in task_names:
        return task_names.index(text)
    accepted = ", ".join(task_names) if task_names else "an integer task id"
    raise ValueError(f"task={task!r} is not a task of this model/data; accepted: {accepted}")


@torch.no_grad()
def build_subset_model(
    model: MoETransformer, experts: dict[int, list[int]], quantize: str = "none"
) -> MoETransformer:
    """A copy of `model` whose MoE layer at block b holds only the global experts
    `experts[b]` (a `LocalDispatcher` over them, the router restricted to them): dense
    weights copied whole, each expert stack indexed by its ids. `quantize="int8"` stores
    the kept experts int8. Eval mode, on `model`'s device."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is invalid; accepted: {', '.join(QUANTIZATIONS)}")
    blocks = [block for block, _ in model.moe_layers()]
    if sorted(experts) != blocks:
        raise ValueError(
            f"experts are given for blocks {sorted(experts)}; the model's MoE blocks are {blocks}"
        )

    def factory(block: int, num_experts: int) -> Dispatcher:
        return LocalDispatcher(num_experts, sorted(experts[block]))

    subset = MoETransformer(model.config, model.routing, factory)
    for block, layer in subset.moe_layers():
        layer.router.restrict(sorted(experts[block]))
    source_experts = dict(expert_modules(model))
    source_int8 = any(m.quantization == "int8" for m in source_experts.values())
    if source_int8:  # the source's experts are int8 buffers: build int8 ones to receive them
        _quantize(subset)
    full_state = model.state_dict()
    targets = dict(expert_modules(subset))
    state: dict[str, Tensor] = {}
    for key in subset.state_dict():
        module_name = key.rpartition(".")[0]
        source = full_state[key]
        if module_name in targets:
            held = list(source_experts[module_name].expert_ids)
            local = [held.index(g) for g in targets[module_name].expert_ids]
            source = source[local]
        state[key] = source
    subset.load_state_dict(state, strict=True)
    if quantize == "int8" and not source_int8:
        _quantize(subset)
    return subset.to(model.embed.weight.device).eval()


def _quantize(model: MoETransformer) -> None:
    from moe.inference.quant import quantize_experts

    quantize_experts(model)


def directory_bytes(directory: str | Path) -> int:
    """Bytes of every file under `directory`."""
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


def weight_bytes(step_dir: str | Path) -> int:
    """Bytes of a step directory without its optimizer state (what loading a model reads;
    a training checkpoint carries Adam's moments, a subset does not)."""
    return directory_bytes(step_dir) - directory_bytes(Path(step_dir) / "optimizer")


def _extra_keys(meta: dict[str, Any]) -> set[str]:
    # meta["extra"] is `encode_state`'s form: {"__dict__": [[key, value], ...]}.
    extra = meta.get("extra")
    pairs = extra.get("__dict__", []) if isinstance(extra, dict) else []
    return {str(pair[0]) for pair in pairs}


def is_subset_checkpoint(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's meta describes a task subset."""
    return subset_ids(meta) is not None or "subset" in _extra_keys(meta)


def _check_out(out: Path, source: Path) -> None:
    """Refuse to publish into the source's own directory or over a whole checkpoint."""
    if out.resolve() in (source.parent.resolve(), source.resolve()):
        raise ValueError(
            f"out={str(out)!r} is the full checkpoint's own directory; accepted: another directory"
        )
    latest = resolve_latest(out) if (out / "latest").is_file() else None
    if latest is not None and not is_subset_checkpoint(read_meta(latest)):
        raise ValueError(
            f"out={str(out)!r} already holds a whole checkpoint ({latest}); accepted: an empty "
            "directory or one holding a subset"
        )


def _is_task_name(task: int | str) -> bool:
    return isinstance(task, str) and not task.strip().lstrip("-").isdigit()


def _corpus_of(data: DataConfig | TaskCorpus | None, run_config: dict[str, Any]) -> TaskCorpus:
    """The corpus `data` names; None: the checkpoint's own data config."""
    if isinstance(data, TaskCorpus):
        return data
    if data is None:
        if not run_config.get("data"):
            raise ValueError(
                "the checkpoint's config has no data section (an imported model): give the "
                "corpus to measure on (launch.subset +data=PRESET; write_subset(data=...): a "
                "DataConfig, a TaskCorpus or the task's windows)"
            )
        data = DataConfig(**run_config["data"])
    return build_corpus(data)


def _measurement_windows(
    data: DataConfig | TaskCorpus | Tensor | None,
    run_config: dict[str, Any],
    task: int | str,
    seq_len: int,
    max_windows: int,
    seed: int,
    byte_level: bool = True,
) -> tuple[int, Tensor]:
    """(task id, the task's measurement windows [B, T]) from `data` (see write_subset).
    A model with a tokenizer of its own is measured on windows of its tokens only: a
    corpus here is bytes."""
    if isinstance(data, Tensor):
        return resolve_task(task, None), data
    if not byte_level:
        raise ValueError(
            "the model reads the tokens of its own tokenizer, not bytes: measure it on token "
            "windows of the task (write_subset(data=tensor [B, T] of its token ids))"
        )
    if isinstance(data, DataConfig):
        seq_len = min(seq_len, data.seq_len)
    elif run_config.get("data", {}).get("seq_len"):
        seq_len = min(seq_len, int(run_config["data"]["seq_len"]))
    corpus = _corpus_of(data, run_config)
    task_id = resolve_task(task, corpus.task_names)
    if not 0 <= task_id < corpus.num_tasks:
        raise ValueError(
            f"task={task_id} is not a task of the data ({corpus.name!r}); accepted: "
            f"0..{corpus.num_tasks - 1} ({', '.join(corpus.task_names)})"
        )
    return task_id, task_training_windows(corpus, task_id, seq_len, max_windows, seed)


def write_subset(
    checkpoint: str | Path,
    task: int | str,
    out: str | Path,
    coverage: float = 0.99,
    quantize: str = "none",
    data: DataConfig | TaskCorpus | Tensor | None = None,
    *,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    seed: int = DEFAULT_SEED,
) -> SubsetResult:
    """Write the task subset of a whole checkpoint to `out` (`out/step_N`, `out/latest`;
    the full checkpoint's step and run config).

    `checkpoint`: a step, checkpoints or run directory. `task`: an id, or a task name of
    the data. Task routing keeps each layer's K experts of the task (`coverage` is then
    recorded as 1.0: the subset is exact). Token routing keeps, per layer, the experts
    carrying `coverage` of the task's token-slots on `max_windows` training windows drawn
    with `seed`; `data` gives them: None (the checkpoint's own data config), a
    `DataConfig`, a `TaskCorpus`, or the task's input windows themselves (int [B, T]).
    `quantize="int8"` stores the kept experts int8. ValueError for a task the model or
    data lacks, coverage outside (0, 1], or a checkpoint that already is a subset.
    """
    number = isinstance(coverage, int | float) and not isinstance(coverage, bool)
    if not number or not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage={coverage!r} is invalid; accepted: a number in (0, 1]")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is invalid; accepted: {', '.join(QUANTIZATIONS)}")
    source = resolve_checkpoint(checkpoint)
    meta = read_meta(source)
    if is_subset_checkpoint(meta):
        raise ValueError(
            f"checkpoint={str(checkpoint)!r} ({source}) already is a task subset; accepted: a "
            "whole checkpoint (the subset's source)"
        )
    out = Path(out)
    _check_out(out, source)
    loaded = load_model(source)
    model = loaded.model
    if not model.moe_layers() or model.routing is None:
        raise ValueError(f"checkpoint {source} is a dense model; a task subset needs MoE layers")
    windows = 0
    if model.routing.router == RouterKind.TASK:
        names = None
        if _is_task_name(task) and not isinstance(data, Tensor):
            names = _corpus_of(data, loaded.run_config).task_names
        task_id = resolve_task(task, names)
        experts = task_experts_task_routing(model, task_id)
        routing, recorded_coverage = "task", 1.0
    else:
        task_id, tokens_BT = _measurement_windows(
            data, loaded.run_config, task, model.config.max_seq_len, max_windows, seed,
            byte_level=not loaded.tokenizer.files(),
        )  # fmt: skip
        num_tasks = model.routing.num_tasks
        if task_id < 0 or (num_tasks > 0 and task_id >= num_tasks):
            raise ValueError(
                f"task={task_id} is not a task of this model; accepted: 0..{num_tasks - 1} "
                f"(routing.num_tasks={num_tasks})"
            )
        usage = measure_task_usage(model, tokens_BT, task_id)
        top_k = model.routing.top_k
        experts = {block: experts_for_coverage(c, coverage, top_k) for block, c in usage.items()}
        routing, recorded_coverage, windows = "token", float(coverage), int(tokens_BT.shape[0])
    subset = build_subset_model(model, experts, quantize)
    num_experts = {block: layer.num_experts for block, layer in model.moe_layers()}
    extra = {
        "subset": {
            "task": task_id,
            "routing": routing,
            "coverage": recorded_coverage,
            "source": str(source.resolve()),
            "experts": {block: list(ids) for block, ids in experts.items()},
            "measured_windows": windows,
            "quantization": quantize,
        }
    }
    step_dir = save_checkpoint(
        out, subset, None, loaded.step, loaded.run_config, extra=extra,
        layer_num_experts={experts_module_name(b): n for b, n in num_experts.items()},
        attachments=loaded.tokenizer.files(),  # the subset reads what the full model reads
    )  # fmt: skip
    return SubsetResult(
        directory=step_dir,
        source=source,
        task=task_id,
        routing=routing,
        coverage=recorded_coverage,
        experts=experts,
        num_experts=num_experts,
        checkpoint_bytes=directory_bytes(step_dir),
        measured_windows=windows,
    )
