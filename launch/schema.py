"""Hydra schemas derived from the validated config dataclasses, and the way back.

The config dataclasses of every package (`RoutingConfig`, `ModelConfig`, ...) use `str`
Enums and validate in `__post_init__`. OmegaConf, however, converts a string to an enum
by member *name* (`TOPK`), so `routing.router=topk` would be refused with a confusing
message, and it never runs `__post_init__` while composing. So the ConfigStore holds a
*schema twin* of each dataclass: the same field names, defaults and scalar types (Hydra
still refuses unknown keys and ill-typed values), enum fields as plain strings. After
composition `build()` turns the plain container into the real dataclasses, whose
`__post_init__` then rejects a bad value with a `ValueError` naming the key and the
accepted values.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any, Optional, TypeVar, Union

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _schema_type(annotation: Any) -> Any:
    """The OmegaConf-friendly type of a field: enums become `str`, `X | None` Optional."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        assert len(args) == 1, f"unsupported union type {annotation}"
        return Optional[_schema_type(args[0])]  # noqa: UP045 (OmegaConf needs Optional)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return str
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return hydra_schema(annotation)
    return annotation


def _schema_default(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


@functools.cache
def hydra_schema(cls: type) -> type:
    """A dataclass with `cls`'s fields and defaults, enums as strings, no validation."""
    assert dataclasses.is_dataclass(cls), cls
    hints = _field_types(cls)
    specs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        annotation = _schema_type(hints[f.name])
        if dataclasses.is_dataclass(hints[f.name]):
            spec = dataclasses.field(default_factory=annotation)
        elif f.default is not dataclasses.MISSING:
            spec = dataclasses.field(default=_schema_default(f.default))
        elif f.default_factory is not dataclasses.MISSING:
            spec = dataclasses.field(default_factory=f.default_factory)
        else:
            spec = dataclasses.field()
        specs.append((f.name, annotation, spec))
    # Same class name, so that Hydra's messages read "Key 'x' not in 'RoutingConfig'".
    return dataclasses.make_dataclass(cls.__name__, specs, namespace={"__doc__": cls.__doc__})


def plain_container(
    cfg: DictConfig | Mapping[str, Any], throw_on_missing: bool = False
) -> dict[Any, Any]:
    """`cfg` as the plain dict that `build` takes, without Hydra's own `hydra` node. A
    composed config becomes plain containers with its interpolations resolved (with
    `throw_on_missing`, a missing value `???` raises)."""
    if isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=throw_on_missing)
        assert isinstance(data, dict)  # the container of a DictConfig is a dict
    else:
        data = dict(cfg)
    return {key: value for key, value in data.items() if key != "hydra"}


def build(cls: type[T], data: Any, key: str = "") -> T:
    """Instantiate dataclass `cls` from a plain dict (nested dataclasses included).

    Every `__post_init__` runs, so a bad value raises the owner's `ValueError`.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{key or cls.__name__} must be a mapping, got {data!r}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(f'{key}.{u}'.lstrip('.') for u in unknown)}; "
            f"accepted: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        annotation = _optional_inner(hints[name]) if value is not None else None
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            value = build(annotation, value, f"{key}.{name}".lstrip("."))
        kwargs[name] = value
    return cls(**kwargs)


def _optional_inner(annotation: Any) -> Any:
    """X of `X | None` (an optional config group), else `annotation` itself."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
