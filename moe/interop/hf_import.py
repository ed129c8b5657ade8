"""Import a HuggingFace MoE model directory as a checkpoint of this project.

    result = import_hf("path/to/Mixtral-8x7B", "checkpoints/mixtral")
    loaded = moe.inference.load_model(result.directory)   # tokenizer included

Reads `config.json` (`moe.interop.hf_config`), the weights (`model.safetensors`, or the
shards a `model.safetensors.index.json` lists) and the tokenizer files (`tokenizer.json`
and `tokenizer_config.json`, which become checkpoint attachments). Everything is checked
before anything is written: the config is refused by field when the model cannot compute
it exactly; every tensor a recipe needs (`moe.interop.hf_weights`) must exist with the
expected shape (a missing key is named; a mismatch names the key and both shapes); no
tensor may be left unused (it would hold something the model ignores).

Streaming: the output files are written tensor by tensor
(`moe.checkpoint.stream.StreamingSafetensorsWriter`), each made of slices read through
safetensors' `safe_open` (one expert's rows of a fused stack, not the stack), and each
shard is opened only while a tensor is read from it, so neither the model nor a file of
it is ever held whole: peak memory is about one tensor above the interpreter's.
Tensors keep their stored dtype unless `dtype` says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moe.checkpoint import ShardManifest, begin_checkpoint, expert_file, finalize_checkpoint
from moe.checkpoint.stream import StreamingSafetensorsWriter
from moe.config import ModelConfig
from moe.experts import expert_modules
from moe.interop.hf_config import configs_from_hf
from moe.interop.hf_weights import (
    ExpertLayout,
    Recipe,
    dense_recipe,
    expert_layout,
    expert_recipes,
    ignorable,
)
from moe.interop.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from moe.transformer import MoETransformer
from routing import RoutingConfig

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORED = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16}  # fmt: skip


@dataclass(frozen=True)
class ImportResult:
    """What `import_hf` wrote: the step directory, the family, the configs, the tensors
    and bytes written."""

    directory: Path
    model_type: str
    model: ModelConfig
    routing: RoutingConfig | None
    tensors: int
    checkpoint_bytes: int
    tokenizer: Tokenizer


def plain(value: Any) -> Any:
    """A config dataclass as JSON data (enums as their values)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value.value if isinstance(value, Enum) else value


def read_config(source: Path) -> dict[str, Any]:
    path = source / CONFIG_FILE
    if not path.is_file():
        raise ValueError(
            f"path={str(source)!r} has no {CONFIG_FILE}; accepted: a HF model directory"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; accepted: an object")
    return data


class HFWeights:
    """The tensors of a HF directory: name -> (file, shape, stored dtype), from the
    safetensors headers only. `get_slice(key)` opens the key's file on demand; `release()`
    closes every open file (its memory map goes with it)."""

    def __init__(self, source: Path) -> None:
        if (source / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((source / INDEX_FILE).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{source / INDEX_FILE} has no weight_map: {error}") from None
            files = sorted({source / name for name in weight_map.values()})
        elif (source / SINGLE_FILE).is_file():
            files = [source / SINGLE_FILE]
        else:
            raise ValueError(
                f"path={str(source)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}; accepted: "
                "safetensors weights (pickled .bin files are never read)"
            )
        self.location: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file in files:
            if not file.is_file():
                raise ValueError(f"{file} is listed in {INDEX_FILE} but missing")
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    view = handle.get_slice(key)
                    self.location[key] = file
                    self.shapes[key] = tuple(view.get_shape())
                    self.dtypes[key] = view.get_dtype()
        self._open: dict[Path, Any] = {}

    def get_slice(self, key: str) -> Any:
        file = self.location[key]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file].get_slice(key)

    def release(self) -> None:
        self._open.clear()


def _check_recipes(recipes: list[Recipe], weights: HFWeights, tied: bool) -> None:
    """Every source present with its shape, every HF tensor used (module docstring)."""
    used: set[str] = set()
    for recipe in recipes:
        for source in recipe.sources:
            if source.key not in weights.shapes:
                raise ValueError(f"missing tensor {source.key} (for {recipe.name})")
            if weights.shapes[source.key] != source.shape:
                raise ValueError(
                    f"tensor {source.key} has shape {list(weights.shapes[source.key])}; the "
                    f"config needs {list(source.shape)}"
                )
            if weights.dtypes[source.key] not in _STORED:
                raise ValueError(
                    f"tensor {source.key} is stored as {weights.dtypes[source.key]}; accepted: "
                    f"{', '.join(_STORED)}"
                )
            used.add(source.key)
    unused = sorted(
        key for key in weights.shapes
        if key not in used and not ignorable(key) and not (tied and key == "lm_head.weight")
    )  # fmt: skip
    if unused:
        raise ValueError(
            f"{len(unused)} tensors would be left out, so the model would not be this one: "
            f"{unused[:5]}"
        )


def _plan(
    model: MoETransformer, weights: HFWeights
) -> tuple[list[Recipe], list[tuple[str, int, int, list[Recipe]]]]:
    """The dense file's recipes, and per (module, layer index, global expert) the
    expert file's."""
    config = model.config
    layouts: dict[int, ExpertLayout] = {
        block: expert_layout(weights.shapes, block) for block, _ in model.moe_layers()
    }
    modules = expert_modules(model)
    expert_keys = {f"{name}.{key}" for name, module in modules for key in module.state_dict()}
    dense = [
        dense_recipe(name, tuple(tensor.shape), config, layouts)
        for name, tensor in model.state_dict().items()
        if name not in expert_keys
    ]
    experts = []
    for layer, (name, module) in enumerate(modules):
        block = int(name.split(".")[1])
        for expert in module.expert_ids:
            recipes = expert_recipes(
                layouts[block], expert, module.num_experts, module.d_model, module.d_hidden
            )
            order = list(module.state_dict())
            recipes.sort(key=lambda recipe: order.index(recipe.name))
            experts.append((name, layer, expert, recipes))
    return dense, experts


def _write(path: Path, recipes: list[Recipe], weights: HFWeights, dtype: torch.dtype | None) -> str:
    """One output file, tensor by tensor; returns its sha256."""

    def stored(recipe: Recipe) -> torch.dtype:
        return dtype or _STORED[weights.dtypes[recipe.sources[0].key]]

    specs = [(recipe.name, stored(recipe), recipe.shape) for recipe in recipes]
    with StreamingSafetensorsWriter(path, specs) as writer:
        for recipe in recipes:
            writer.write(recipe.name, recipe.build(weights.get_slice).to(stored(recipe)))
            weights.release()
        return writer.close()


def _tokenizer(source: Path, vocab_size: int) -> Tokenizer:
    if not (source / TOKENIZER_FILE).is_file() and vocab_size != 256:
        raise ValueError(
            f"path={str(source)!r} has no {TOKENIZER_FILE} but the model has a vocabulary of "
            f"{vocab_size}; accepted: a directory with {TOKENIZER_FILE} (a fast tokenizer), "
            "or a byte-level model (vocab_size 256)"
        )
    tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{source / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {vocab_size}"
        )
    return tokenizer


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out={str(out)!r} exists and is not empty; accepted: a new directory")


def import_hf(
    path: str | Path, out: str | Path, *, dtype: str | None = None, progress: bool = False
) -> ImportResult:
    """Import the HF model directory `path` as the checkpoint directory `out` (step 0,
    `out/latest`). `dtype`: float32, bfloat16 or float16 for every tensor (None keeps
    the stored dtypes). Refusals and streaming: see the module docstring."""
    source, out = Path(path), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; accepted: {', '.join(DTYPES)} or none")
    data = read_config(source)
    model_config, routing, family = configs_from_hf(data)
    tokenizer = _tokenizer(source, model_config.vocab_size)
    weights = HFWeights(source)
    with torch.device("meta"):
        skeleton = MoETransformer(model_config, routing)
    dense, experts = _plan(skeleton, weights)
    _check_recipes(dense + [r for _, _, _, recipes in experts for r in recipes], weights,
                   model_config.tie_embeddings)  # fmt: skip
    _check_out(out)
    target_dtype = DTYPES[dtype] if dtype is not None else None
    temp = begin_checkpoint(out, 0)
    files: dict[str, str] = {}
    try:
        files["dense.safetensors"] = _write(
            temp / "dense.safetensors", dense, weights, target_dtype
        )
        for _, layer, expert, recipes in _progress(experts, progress):
            relative = expert_file(layer, expert)
            files[relative] = _write(temp / relative, recipes, weights, target_dtype)
        held = {name: list(range(module.num_experts)) for name, module in expert_modules(skeleton)}
        manifest = ShardManifest(
            rank=0, experts=held, files=files, has_optimizer=False,
            quantization={name: "none" for name in held},
        )  # fmt: skip
        config = {
            "model": plain(model_config),
            "routing": plain(routing) if routing is not None else None,
            "import": {"source": str(source.resolve()), "model_type": family.model_type,
                       "architecture": family.architecture, "dtype": dtype or "stored"},
        }  # fmt: skip
        directory = finalize_checkpoint(
            temp, [manifest], step=0, config=config, attachments=tokenizer.files()
        )
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    tensors = len(dense) + sum(len(recipes) for _, _, _, recipes in experts)
    return ImportResult(directory, family.model_type, model_config, routing, tensors, total,
                        tokenizer)  # fmt: skip


def _progress(
    items: list[tuple[str, int, int, list[Recipe]]], show: bool
) -> Iterator[tuple[str, int, int, list[Recipe]]]:
    if not show:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc="[import_hf] experts", unit="expert")
