"""Checking an HTTP request before anything else sees it: plain code, no Ray.

`parse_completion_request(body, catalog, limits, tokenizer)` turns the raw bytes of a
`POST /v1/completions` body into a `CompletionRequest` (`launch.serving.protocol`), its
prompts tokenized with the model's tokenizer, or raises `RequestError` with the HTTP
status and the OpenAI-style error (`message`, `type`, `param`, `code`) naming the
offending field. `parse_tokenize_request` and `parse_detokenize_request` do the same
for `/tokenize` and `/detokenize`; `launch.serving.chat` for chat, with the helpers here
and the field readers of `launch.serving.fields`.

The body is read as UTF-8 JSON with `json.loads` (never pickle or eval); NaN and
Infinity are refused. Statuses: 413 a body over `limits.max_body_bytes`; 400 a body that
is not UTF-8, not JSON or not an object, a prompt longer than the context, or a request
over `limits.max_request_tokens`; 404 a model the service does not serve; 422 a field of
the wrong type, out of range, unknown, or not supported (`suffix`).
"""

from __future__ import annotations

import secrets
from typing import Any

from launch.serving.fields import (
    boolean,
    decode_body,
    integer,
    invalid,
    model_entry,
    number,
    optional_integer,
    refuse_unknown,
    utf8,
)
from launch.serving.protocol import (
    MAX_SEED,
    CompletionRequest,
    DetokenizeRequest,
    GenerationRequest,
    Limits,
    ModelEntry,
    RequestError,
    TokenizeRequest,
)
from moe.interop.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "KNOWN_FIELDS",
    "Limits",
    "ModelEntry",
    "RequestError",
    "decode_body",
    "parse_completion_request",
    "parse_detokenize_request",
    "parse_tokenize_request",
]

# The fields of an OpenAI completion request this service understands; `task` and
# `return_routed_experts` are ours (the task id a request to the full model of a
# task-routed checkpoint runs as; the experts of each generated token).
KNOWN_FIELDS = (
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "best_of", "logprobs",
    "echo", "stop", "seed", "stream", "stream_options", "presence_penalty",
    "frequency_penalty", "logit_bias", "user", "suffix", "task", "return_routed_experts",
)  # fmt: skip
# Fields every generation endpoint shares (`sampling_fields`).
SAMPLING_FIELDS = (
    "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
    "logit_bias", "task", "return_routed_experts",
)  # fmt: skip


def _stop(data: dict[str, Any], limits: Limits) -> tuple[str, ...]:
    value = data.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or any(not isinstance(s, str) for s in items):
        raise invalid("stop", f"{value!r} is not a string or a list of strings", "invalid_type")
    if len(items) > limits.max_stop:
        raise invalid("stop", f"{len(items)} strings; accepted: at most {limits.max_stop}")
    if any(not 0 < len(utf8(s, "stop")) <= limits.max_stop_bytes for s in items):
        raise invalid(
            "stop", f"each stop string must have 1..{limits.max_stop_bytes} bytes in UTF-8"
        )
    return tuple(items)


def _logit_bias(data: dict[str, Any], vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: {"token id": bias in -100..100}."""
    value = data.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid("logit_bias", f"{value!r} is not an object", "invalid_type")
    pairs = []
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid("logit_bias", f"key {key!r} is not a token id", "invalid_type") from None
        if not 0 <= token < vocab_size:
            raise invalid("logit_bias", f"token id {token} is outside 0..{vocab_size - 1}")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise invalid("logit_bias", f"the bias of {key} is {bias!r}; accepted: -100..100")
        pairs.append((token, float(bias)))
    return tuple(sorted(pairs))


def _task(data: dict[str, Any], entry: ModelEntry) -> int | None:
    given = data.get("task")
    if given is not None and (isinstance(given, bool) or not isinstance(given, int)):
        raise invalid("task", f"{given!r} is not an integer task id", "invalid_type")
    if entry.task is not None:
        if given is not None and given != entry.task:
            raise invalid("task", f"{given} differs from the model's task {entry.task}")
        return entry.task
    if given is None:
        if entry.needs_task:
            accepted = "" if entry.task_ids is None else f" in {list(entry.task_ids)}"
            raise invalid("task", f"this model routes by task: give task (an integer{accepted})")
        return None
    if entry.task_ids is not None and given not in entry.task_ids:
        raise invalid("task", f"{given} is not a task of this model; accepted: {entry.task_ids}")
    return given


def sampling_fields(
    data: dict[str, Any], entry: ModelEntry, limits: Limits, vocab_size: int
) -> dict[str, Any]:
    """The `GenerationRequest` fields every generation endpoint shares (`SAMPLING_FIELDS`).
    An absent seed is a fresh random one: a request without a seed is not reproducible."""
    seed = data.get("seed")
    return {
        "temperature": number(data, "temperature", 1.0, 0.0, limits.max_temperature),
        "top_p": _top_p(data),
        "stop": _stop(data, limits),
        "seed": secrets.randbits(63) if seed is None else integer(data, "seed", 0, 0, MAX_SEED),
        "presence_penalty": number(data, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": number(data, "frequency_penalty", 0.0, -2.0, 2.0),
        "logit_bias": _logit_bias(data, vocab_size),
        "routed_experts": boolean(data, "return_routed_experts"),
        "task": _task(data, entry),
    }


def _top_p(data: dict[str, Any]) -> float:
    top_p = number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise invalid("top_p", f"{top_p} is out of range; accepted: (0, 1]")
    return top_p


def stream_fields(data: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage): `stream_options` only with `stream` (as OpenAI)."""
    stream = boolean(data, "stream")
    options = data.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise invalid("stream_options", "only with stream=true")
    if not isinstance(options, dict):
        raise invalid("stream_options", f"{options!r} is not an object", "invalid_type")
    refuse_unknown({f"stream_options.{k}": v for k, v in options.items()},
                   ("stream_options.include_usage",))  # fmt: skip
    return stream, boolean({"stream_options": options.get("include_usage")}, "stream_options")


def _user(data: dict[str, Any]) -> None:
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", f"{user!r} is not a string", "invalid_type")


def context_check(ids: list[int], entry: ModelEntry, param: str = "prompt") -> None:
    if len(ids) > entry.context_bytes:
        raise RequestError(
            400, f"{param}: {len(ids)} tokens is longer than the model's context of "
            f"{entry.context_bytes} tokens", param=param, code="context_length_exceeded",
        )  # fmt: skip


def request_tokens_check(
    prompts: list[list[int]], best_of: int, max_tokens: int, limits: Limits
) -> None:
    total = sum(best_of * (len(ids) + max_tokens) for ids in prompts)
    if total > limits.max_request_tokens:
        raise RequestError(
            400, f"the request needs {total} tokens (over its prompts, best_of x (prompt "
            f"tokens + max_tokens)); accepted: at most {limits.max_request_tokens}",
            param="prompt", code="too_many_tokens",
        )  # fmt: skip


def _prompts(
    data: dict[str, Any], limits: Limits, tokenizer: Tokenizer
) -> tuple[list[list[int]], list[str]]:
    """OpenAI's `prompt`: a string, a list of strings, a list of token ids, or a list of
    lists of token ids -> (token ids, text) of each prompt."""
    value = data.get("prompt")

    def is_ids(item: object) -> bool:
        return isinstance(item, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in item
        )

    if isinstance(value, str):
        items: list[Any] = [value]
    elif is_ids(value) and value:
        items = [value]
    elif (
        isinstance(value, list)
        and value
        and (all(isinstance(i, str) for i in value) or all(is_ids(i) for i in value))
    ):
        items = value
    else:
        raise invalid(
            "prompt", f"{type(value).__name__} is not a prompt; accepted: a string, a list of "
            "strings, a list of token ids or a list of lists of token ids", "invalid_type",
        )  # fmt: skip
    if len(items) > limits.max_prompts:
        raise invalid("prompt", f"{len(items)} prompts; accepted: at most {limits.max_prompts}")
    ids_list, texts = [], []
    for item in items:
        if isinstance(item, str):
            utf8(item, "prompt")
            ids = tokenizer.encode(item, add_special_tokens=True)
            text = item
        else:
            ids = list(item)
            bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
            if bad:
                raise invalid(
                    "prompt", f"token ids {bad[:5]} are outside 0..{tokenizer.vocab_size - 1}"
                )
            text = tokenizer.decode(ids)
        if not ids:
            raise invalid("prompt", "the prompt is empty; accepted: a non-empty string or ids")
        ids_list.append(ids)
        texts.append(text)
    return ids_list, texts


def parse_completion_request(
    body: bytes,
    catalog: dict[str, ModelEntry],
    limits: Limits,
    tokenizer: Tokenizer | None = None,
) -> CompletionRequest:
    """Check a `POST /v1/completions` body against `catalog` (model id -> entry),
    `limits` and the model's `tokenizer` (None: bytes); raises `RequestError` (see the
    module docstring)."""
    tokenizer = tokenizer or ByteTokenizer()
    data = decode_body(body, limits)
    refuse_unknown(data, KNOWN_FIELDS)
    model, entry = model_entry(data, catalog)
    if data.get("suffix") is not None:
        raise invalid(
            "suffix", "not supported: this service completes a prompt, it does not insert "
            "text before a suffix; leave suffix out", "unsupported_field",
        )  # fmt: skip
    _user(data)
    prompts, texts = _prompts(data, limits, tokenizer)
    for ids in prompts:
        context_check(ids, entry)
    max_tokens = integer(data, "max_tokens", min(16, limits.max_tokens), 0, limits.max_tokens)
    n = integer(data, "n", 1, 1, limits.max_n)
    best_of = integer(data, "best_of", n, 1, limits.max_best_of)
    if best_of < n:
        raise invalid("best_of", f"{best_of} is below n={n}; accepted: best_of >= n")
    stream, include_usage = stream_fields(data)
    if stream and best_of > n:
        raise invalid("best_of", f"best_of={best_of} > n={n} cannot be streamed")
    request_tokens_check(prompts, best_of, max_tokens, limits)
    generation = GenerationRequest(
        prompts=tuple(tuple(ids) for ids in prompts), n=n, best_of=best_of,
        max_tokens=max_tokens, logprobs=optional_integer(data, "logprobs", 0, limits.max_logprobs),
        echo=boolean(data, "echo"),
        **sampling_fields(data, entry, limits, tokenizer.vocab_size),
    )  # fmt: skip
    return CompletionRequest(
        model=model, deployment=entry.deployment, generation=generation,
        prompt_texts=tuple(texts), stream=stream, include_usage=include_usage,
    )  # fmt: skip


def parse_tokenize_request(
    body: bytes, catalog: dict[str, ModelEntry], limits: Limits
) -> tuple[dict[str, Any], TokenizeRequest | None]:
    """`POST /tokenize` (vLLM): {"model"?, "prompt", "add_special_tokens" (default true)}
    -> a `TokenizeRequest`; or {"model"?, "messages", "add_generation_prompt",
    "add_special_tokens" (default false)}: returns the body for the chat renderer and None."""
    data = decode_body(body, limits)
    if "messages" in data:
        refuse_unknown(data, ("model", "messages", "add_generation_prompt", "add_special_tokens"))
        _optional_model(data, catalog)
        return data, None
    refuse_unknown(data, ("model", "prompt", "add_special_tokens"))
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise invalid("prompt", f"{type(prompt).__name__} is not a string", "invalid_type")
    utf8(prompt, "prompt")
    return data, TokenizeRequest(
        _optional_model(data, catalog), prompt, boolean(data, "add_special_tokens", True)
    )


def parse_detokenize_request(
    body: bytes, catalog: dict[str, ModelEntry], limits: Limits, vocab_size: int
) -> DetokenizeRequest:
    """`POST /detokenize` (vLLM): {"model"?, "tokens": [ids]}."""
    data = decode_body(body, limits)
    refuse_unknown(data, ("model", "tokens"))
    tokens = data.get("tokens")
    if not isinstance(tokens, list) or any(
        isinstance(t, bool) or not isinstance(t, int) for t in tokens
    ):
        raise invalid("tokens", f"{tokens!r} is not a list of token ids", "invalid_type")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise invalid("tokens", f"token ids {bad[:5]} are outside 0..{vocab_size - 1}")
    return DetokenizeRequest(_optional_model(data, catalog), tuple(tokens))


def _optional_model(data: dict[str, Any], catalog: dict[str, ModelEntry]) -> str | None:
    if data.get("model") is None:
        return None
    return model_entry(data, catalog)[0]
