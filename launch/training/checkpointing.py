"""A run's checkpoints: `moe.checkpoint` directories under `run_dir/checkpoints`.

A training checkpoint holds the model (dense file + one file per expert), every rank's
optimizer state, the sampler state (`extra["sampler"]`), the state of stateful routing
policies (`extra["routing_state"]`, `routing.PolicyState.state_dict`: DynaMoE's
controllers and, in a one-process run, its assignment caches; a multi-rank run's
caches are per rank and restart empty), the state of pruning (`extra["pruning"]`,
`moe.pruning.PruningState.state_dict`: masks by parameter and global expert id, SR-STE's
dense weights), the data's tokenizer files (none for bytes) and the run's config. Resuming
loads the weights at any EP size but the optimizer state only with the layout it was
saved with (same world size, same experts per rank): a resharded resume would change
Adam's moments, so it is refused with the reason rather than done approximately.

`InitialWeights` is the checkpoint a fresh run starts from (`train.init_from`:
fine-tuning, e.g. an imported HF model or a pruned one): the run takes its model config
and router, loads its weights at any EP size and keeps its pruning masks; not its
optimizer state or step. Its tokenizer files must be the data's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from launch.config import RunConfig
from launch.runtime import Runtime
from moe.checkpoint import load_checkpoint, read_meta, resolve_latest, save_checkpoint
from moe.checkpoint.files import sha256_hex
from moe.config import ModelConfig
from moe.inference.loading import configs_of, resolve_checkpoint, subset_ids
from moe.interop.tokenizer import TOKENIZER_FILES, ByteTokenizer, Tokenizer
from moe.pruning import PRUNING_KEY, PruneConfig
from moe.transformer import MoETransformer
from routing import RoutingConfig


@dataclass(frozen=True)
class Resumed:
    step: int
    sampler_state: dict[str, Any]
    directory: Path
    optimizer_state: dict[str, Any]
    routing_state: dict[str, Any] = field(default_factory=dict)  # routing.PolicyState
    pruning_state: dict[str, Any] = field(default_factory=dict)  # moe.pruning.PruningState


def plain(value: Any) -> Any:
    """A dataclass (or container of them) as plain JSON data (enums as their values)."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return getattr(value, "value", value)


def config_dict(config: RunConfig) -> dict[str, Any]:
    """The run config as plain JSON data (enums as their values)."""
    result: dict[str, Any] = plain(config)
    return result


_SCHEMAS: dict[str, type] = {"model": ModelConfig, "routing": RoutingConfig, "prune": PruneConfig}
# Sections added after checkpoints were written: absent means the schema's defaults.
_LATER_SECTIONS = ("prune",)


def _canonical(key: str, value: Any) -> Any:
    """A saved `model` / `routing` / `prune` section with the defaults of keys added since
    it was written (an older checkpoint lacks them), so that only real differences count."""
    schema = _SCHEMAS.get(key)
    if value is None and key in _LATER_SECTIONS:
        value = {}
    if schema is None or not isinstance(value, dict):
        return value
    try:
        return plain(schema(**value))
    except (TypeError, ValueError):
        return value


class CheckpointManager:
    """Save and resume the checkpoints of one run (every rank makes the same calls).
    `attachments`: files every checkpoint carries beside meta.json (the tokenizer's)."""

    def __init__(
        self,
        directory: Path,
        runtime: Runtime,
        keep_last: int,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.runtime = runtime
        self.keep_last = keep_last
        # The data's tokenizer: every checkpoint carries its files (none for bytes).
        self.tokenizer = tokenizer or ByteTokenizer()

    def latest(self) -> Path | None:
        """The newest complete checkpoint (ValueError if the `latest` pointer dangles)."""
        return resolve_latest(self.directory)

    def save(
        self,
        step: int,
        model: MoETransformer,
        optimizer_state: dict[str, Any],
        sampler_state: dict[str, Any],
        record: dict[str, Any],
        routing_state: dict[str, Any] | None = None,
        pruning_state: dict[str, Any] | None = None,
    ) -> Path:
        """Save step `step`; `record` is the run's config as plain data (meta.json);
        `routing_state`: the routing policies' state (rank 0's); `pruning_state`: the
        pruning state (gathered over the ranks)."""
        extra: dict[str, Any] = {"sampler": sampler_state}
        if routing_state:
            extra["routing_state"] = routing_state
        if pruning_state:
            extra[PRUNING_KEY] = pruning_state
        groups = self.runtime.groups
        return save_checkpoint(
            self.directory,
            model,
            optimizer_state,
            step,
            record,
            extra=extra,
            group=groups.world if groups is not None else None,
            keep_last=self.keep_last,
            attachments=self.tokenizer.files(),
        )

    def load(
        self,
        path: Path,
        model: MoETransformer,
        record: dict[str, Any],
        compared: Iterable[str] = ("model", "routing"),
    ) -> Resumed:
        """Load checkpoint `path` into `model` and read this rank's optimizer state.

        Refuses (ValueError) a checkpoint whose config differs from this run's `record`
        in a `compared` section (model, routing, and the objective's settings), one whose
        tokenizer files differ from this run's (the ids would mean other text), and a
        corrupt or missing file (named by `moe.checkpoint`)."""
        info = self.runtime.info
        check_same_tokenizer(path, read_meta(path), self.tokenizer)
        _check_sections(path, record, compared, "use another run_dir or the same")
        loaded = load_checkpoint(
            path, model, load_optimizer=True, rank=info.rank, world_size=info.world_size
        )
        assert loaded.optimizer_state is not None
        sampler_state = loaded.extra.get("sampler")
        if not isinstance(sampler_state, dict):
            raise ValueError(f"checkpoint {path} has no sampler state; it was not written by train")
        return Resumed(
            step=loaded.step,
            sampler_state=sampler_state,
            directory=path,
            optimizer_state=loaded.optimizer_state,
            routing_state=_routing_state(loaded.extra),
            pruning_state=dict(loaded.extra.get(PRUNING_KEY) or {}),
        )


def _check_sections(
    path: Path, record: dict[str, Any], compared: Iterable[str], advice: str
) -> None:
    """ValueError when checkpoint `path`'s config differs from `record` in a section."""
    saved = read_meta(path)["config"]
    for key in compared:
        if _canonical(key, saved.get(key)) != record[key]:
            raise ValueError(
                f"checkpoint {path} was written with {key}={saved.get(key)} but "
                f"this run has {key}={record[key]}; {advice} {key}"
            )


def check_same_tokenizer(
    path: Path, meta: dict[str, Any], tokenizer: Tokenizer, instead: str = "another run_dir"
) -> None:
    """ValueError unless checkpoint `path` (its `meta`) carries exactly `tokenizer`'s files
    (none: bytes): a model's ids mean text only through the tokenizer it was trained on.
    `instead`: the other way out the message offers."""
    mine = {name: sha256_hex(data) for name, data in tokenizer.files().items()}
    files = meta.get("files", {})
    saved = {name: files[name] for name in TOKENIZER_FILES if name in files}
    if mine != saved:
        theirs = "bytes" if not saved else f"the tokenizer files {sorted(saved)}"
        ours = "bytes" if not mine else repr(tokenizer)
        raise ValueError(
            f"checkpoint {path} was trained on {theirs}, but this run's data is tokenized by "
            f"{ours} (other files or contents); use the checkpoint's tokenizer (data.tokenizer="
            f"{path}) or {instead}"
        )


def _routing_state(extra: dict[str, Any]) -> dict[str, Any]:
    """The routing policies' state of a checkpoint (checkpoints written before the
    policy-state protocol kept DynaMoE's alone, under "dynamic")."""
    if "routing_state" in extra:
        return dict(extra["routing_state"])
    return {"dynamic": extra["dynamic"]} if extra.get("dynamic") else {}


# The fields of `RoutingConfig` that define the function a checkpoint's weights compute:
# a fine-tuning run takes them from the checkpoint (`train.init_from`).
ROUTER_FIELDS = ("router", "top_k", "normalize_weights", "normalize_top1", "num_tasks")


@dataclass(frozen=True)
class InitialWeights:
    """A checkpoint a fresh run starts from (`train.init_from`): its model and routing
    configs. `adopt(config)` gives the run its model and router; `check_data(tokenizer)`
    refuses data tokenized otherwise than the checkpoint's model reads; `load(model)` copies the weights into this rank's model (any EP size: each expert
    stack reads the experts it holds) and returns its pruning state (the masks a
    fine-tuned pruned model keeps; empty when it has none)."""

    directory: Path
    model: ModelConfig
    routing: RoutingConfig | None

    @classmethod
    def read(cls, checkpoint: str | Path) -> InitialWeights:
        try:
            directory = resolve_checkpoint(checkpoint)
        except ValueError as error:
            raise ValueError(f"train.init_from={str(checkpoint)!r}: {error}") from None
        meta = read_meta(directory)
        if subset_ids(meta) is not None:
            raise ValueError(
                f"train.init_from={str(checkpoint)!r} is a task subset (experts missing); "
                "accepted: a whole model"
            )
        stored = sorted({layer["quantization"] for layer in meta["moe_layers"]} - {"none"})
        if stored:
            raise ValueError(
                f"train.init_from={str(checkpoint)!r} stores {stored} experts; accepted: float "
                "experts (training needs them)"
            )
        model, routing = configs_of(meta)
        return cls(directory, model, routing)

    def adopt(self, config: RunConfig) -> RunConfig:
        routing = config.routing
        if self.routing is not None:
            routing = replace(routing, **{key: getattr(self.routing, key) for key in ROUTER_FIELDS})
        return replace(config, model=self.model, routing=routing)

    def check_data(self, tokenizer: Tokenizer) -> None:
        """The data's `tokenizer` must be the checkpoint's (`check_same_tokenizer`)."""
        check_same_tokenizer(
            self.directory, read_meta(self.directory), tokenizer, "another train.init_from"
        )

    def load(self, model: MoETransformer) -> dict[str, Any]:
        loaded = load_checkpoint(self.directory, model)
        return dict(loaded.extra.get(PRUNING_KEY) or {})
