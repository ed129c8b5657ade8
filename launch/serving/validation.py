"""Checking an HTTP completion request before anything else sees it: plain code, no Ray.

`parse_completion_request(body, catalog, limits)` turns the raw bytes of a
`POST /v1/completions` body into a `CompletionRequest` or raises `RequestError` with the
HTTP status and the OpenAI-style error (`message`, `type`, `param`, `code`) naming the
offending field. The body is read as UTF-8 JSON with `json.loads` (never pickle or
eval); NaN and Infinity are refused. Statuses: 413 a body over `limits.max_body_bytes`;
400 a body that is not UTF-8, not JSON or not an object, or a prompt longer than the
context; 404 a model the service does not serve; 422 a field of the wrong type, out of
range, or unknown.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# The fields of an OpenAI-style completion request this service understands; `task` is
# ours: the task id a request to the full model of a task-routed checkpoint runs as.
KNOWN_FIELDS = (
    "model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "task",
)  # fmt: skip
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Bounds on every request. `max_tokens` caps a completion's length; `max_stop` the
    number of stop strings, `max_stop_bytes` each one's UTF-8 length."""

    max_body_bytes: int = 64 * 1024
    max_tokens: int = 512
    max_stop: int = 4
    max_stop_bytes: int = 64
    max_temperature: float = 100.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens", "max_stop", "max_stop_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"serve.{name}={value!r} is invalid; accepted: an integer >= 1")
        if not self.max_temperature > 0:
            raise ValueError(f"serve.max_temperature={self.max_temperature!r}; accepted: > 0")


@dataclass(frozen=True)
class ModelEntry:
    """What a model id means: the deployment that answers it, the task id its requests
    run as (None: the request may give one), the context length in tokens, whether a
    task id is required (task-routed checkpoints), and whether the model reads bytes
    (then the gateway can check a prompt's length; a tokenizer's prompt keeps its last
    `context_bytes` tokens in the engine)."""

    deployment: str
    task: int | None
    context_bytes: int
    needs_task: bool = False
    task_ids: tuple[int, ...] | None = None
    byte_level: bool = True


@dataclass(frozen=True)
class CompletionRequest:
    """A checked request; `prompt` as UTF-8 bytes, `stop` as byte strings."""

    model: str
    deployment: str
    prompt: bytes
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[bytes, ...]
    seed: int
    stream: bool
    task: int | None

    def engine_fields(self) -> dict[str, Any]:
        """What a model deployment needs, as plain data."""
        return {
            "prompt": self.prompt, "max_tokens": self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "stop": list(self.stop),
            "seed": self.seed, "task": self.task,
        }  # fmt: skip


@dataclass
class RequestError(Exception):
    """A request the service refuses: the HTTP status and the OpenAI-style error."""

    status: int
    message: str
    param: str | None = None
    type: str = "invalid_request_error"
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message, "type": self.type, "param": self.param,
                "code": self.code,
            }
        }  # fmt: skip


def _invalid(param: str, message: str, code: str = "invalid_value") -> RequestError:
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


def _utf8(text: str, param: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON (\\ud800)
        raise RequestError(
            400,
            f"{param}: not valid Unicode (a lone surrogate)",
            param=param,
            code="invalid_utf8",
        ) from None


def _integer(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(key, f"{value!r} is not an integer", "invalid_type")
    if not low <= value <= high:
        raise _invalid(key, f"{value} is out of range; accepted: {low}..{high}")
    return value


def _number(data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(key, f"{value!r} is not a number", "invalid_type")
    value = float(value)
    if not math.isfinite(value):
        raise _invalid(key, f"{value!r} is not finite")
    return value


def _stop(data: dict[str, Any], limits: Limits) -> tuple[bytes, ...]:
    value = data.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or any(not isinstance(s, str) for s in items):
        raise _invalid("stop", f"{value!r} is not a string or a list of strings", "invalid_type")
    if len(items) > limits.max_stop:
        raise _invalid("stop", f"{len(items)} strings; accepted: at most {limits.max_stop}")
    encoded = tuple(_utf8(s, "stop") for s in items)
    if any(not 0 < len(s) <= limits.max_stop_bytes for s in encoded):
        raise _invalid(
            "stop", f"each stop string must have 1..{limits.max_stop_bytes} bytes in UTF-8"
        )
    return encoded


def parse_completion_request(
    body: bytes, catalog: dict[str, ModelEntry], limits: Limits
) -> CompletionRequest:
    """Check a `POST /v1/completions` body against `catalog` (model id -> entry) and
    `limits`; raises `RequestError` (see the module docstring)."""
    data = decode_body(body, limits)
    unknown = sorted(set(data) - set(KNOWN_FIELDS))
    if unknown:
        raise _invalid(
            unknown[0], f"unknown field; accepted: {', '.join(KNOWN_FIELDS)}", "unknown_field"
        )
    model = data.get("model")
    if not isinstance(model, str):
        raise _invalid("model", f"{model!r} is not a string (a model id)", "invalid_type")
    if model not in catalog:
        raise RequestError(
            404, f"model {model!r} does not exist; accepted: {', '.join(sorted(catalog))}",
            param="model", code="model_not_found",
        )  # fmt: skip
    entry = catalog[model]
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise _invalid("prompt", f"{type(prompt).__name__} is not a string", "invalid_type")
    prompt_bytes = _utf8(prompt, "prompt")
    if not prompt_bytes:
        raise _invalid("prompt", "the prompt is empty; accepted: a non-empty string")
    if entry.byte_level and len(prompt_bytes) > entry.context_bytes:
        raise RequestError(
            400, f"prompt: {len(prompt_bytes)} bytes (the model reads bytes) is longer than "
            f"the context of {entry.context_bytes} bytes", param="prompt",
            code="context_length_exceeded",
        )  # fmt: skip
    max_tokens = _integer(data, "max_tokens", min(16, limits.max_tokens), 1, limits.max_tokens)
    temperature = _number(data, "temperature", 1.0)
    if not 0.0 <= temperature <= limits.max_temperature:
        raise _invalid(
            "temperature", f"{temperature} is out of range; accepted: 0..{limits.max_temperature}"
        )
    top_p = _number(data, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise _invalid("top_p", f"{top_p} is out of range; accepted: (0, 1]")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream", f"{stream!r} is not a boolean", "invalid_type")
    task = _task(data, entry)
    return CompletionRequest(
        model=model, deployment=entry.deployment, prompt=prompt_bytes, max_tokens=max_tokens,
        temperature=temperature, top_p=top_p, stop=_stop(data, limits),
        seed=_integer(data, "seed", 0, 0, MAX_SEED), stream=stream, task=task,
    )  # fmt: skip


def _task(data: dict[str, Any], entry: ModelEntry) -> int | None:
    given = data.get("task")
    if given is not None and (isinstance(given, bool) or not isinstance(given, int)):
        raise _invalid("task", f"{given!r} is not an integer task id", "invalid_type")
    if entry.task is not None:
        if given is not None and given != entry.task:
            raise _invalid("task", f"{given} differs from the model's task {entry.task}")
        return entry.task
    if given is None:
        if entry.needs_task:
            accepted = "" if entry.task_ids is None else f" in {list(entry.task_ids)}"
            raise _invalid("task", f"this model routes by task: give task (an integer{accepted})")
        return None
    if entry.task_ids is not None and given not in entry.task_ids:
        raise _invalid("task", f"{given} is not a task of this model; accepted: {entry.task_ids}")
    return given
