"""Reading the fields of a JSON request body, each with the HTTP error that names it:
plain code, no Ray (`launch.serving.validation` and `launch.serving.chat` use it).

An absent field and a JSON null both read as the default; a field of the wrong type or
out of range raises `RequestError` 422 with `param` the field's name.
"""

from __future__ import annotations

import json
import math
from typing import Any

from launch.serving.protocol import Limits, ModelEntry, RequestError


def invalid(param: str, message: str, code: str = "invalid_value") -> RequestError:
    return RequestError(422, f"{param}: {message}", param=param, code=code)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def decode_body(body: bytes, limits: Limits) -> dict[str, Any]:
    """The JSON object of a request body (413 / 400 otherwise)."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            413, f"the request body has {len(body)} bytes; accepted: at most "
            f"{limits.max_body_bytes}", code="body_too_large",
        )  # fmt: skip
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(
            400, f"the request body is not valid UTF-8 (byte {error.start})", code="invalid_utf8"
        ) from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError) as error:
        raise RequestError(
            400, f"the request body is not JSON: {error}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise RequestError(
            400, f"the request body is a JSON {type(data).__name__}; accepted: an object",
            code="invalid_json",
        )  # fmt: skip
    return data


def refuse_unknown(data: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise invalid(unknown[0], f"unknown field; accepted: {', '.join(known)}", "unknown_field")


def utf8(text: str, param: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON (\\ud800)
        raise RequestError(
            400,
            f"{param}: not valid Unicode (a lone surrogate)",
            param=param,
            code="invalid_utf8",
        ) from None


def integer(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(key, f"{value!r} is not an integer", "invalid_type")
    if not low <= value <= high:
        raise invalid(key, f"{value} is out of range; accepted: {low}..{high}")
    return value


def optional_integer(data: dict[str, Any], key: str, low: int, high: int) -> int | None:
    """An integer field that may be absent or null (None)."""
    if data.get(key) is None:
        return None
    return integer(data, key, low, low, high)


def number(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(key, f"{value!r} is not a number", "invalid_type")
    value = float(value)
    if not math.isfinite(value):
        raise invalid(key, f"{value!r} is not finite")
    if not low <= value <= high:
        raise invalid(key, f"{value} is out of range; accepted: {low}..{high}")
    return value


def boolean(data: dict[str, Any], key: str, default: bool = False) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(key, f"{value!r} is not a boolean", "invalid_type")
    return value


def model_entry(data: dict[str, Any], catalog: dict[str, ModelEntry]) -> tuple[str, ModelEntry]:
    model = data.get("model")
    if not isinstance(model, str):
        raise invalid("model", f"{model!r} is not a string (a model id)", "invalid_type")
    if model not in catalog:
        raise RequestError(
            404, f"model {model!r} does not exist; accepted: {', '.join(sorted(catalog))}",
            param="model", code="model_not_found",
        )  # fmt: skip
    return model, catalog[model]
