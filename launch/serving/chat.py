"""Chat: checking `POST /v1/chat/completions` and rendering its messages into a prompt.

Messages are rendered with the checkpoint's chat template (the HF `chat_template` of its
`tokenizer_config.json`, Jinja2) or, when it carries none, with `PLAIN_TEMPLATE`:

    system: You are terse.
    user: Hello
    assistant:

one line `role: content` per message, then `assistant:` (the generation prompt). A
template (the checkpoint's, `serve.chat_template`'s or the plain one) runs in Jinja2's
`ImmutableSandboxedEnvironment`: it cannot reach Python internals or change what it is
given. It gets what HF templates expect: `messages` (role, content as a string),
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception(message)`, and
`strftime_now(format)`. A template that fails on a request (it raises, or reads what is
not there) answers 400 `chat_template_error` with its message; one that does not compile
fails at start-up.

The rendered prompt is tokenized without adding special tokens: the template writes
the ones it wants (a bos, say).
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from launch.serving.fields import (
    boolean,
    decode_body,
    integer,
    invalid,
    model_entry,
    optional_integer,
    refuse_unknown,
    utf8,
)
from launch.serving.protocol import ChatRequest, GenerationRequest, Limits, ModelEntry, RequestError
from launch.serving.validation import (
    SAMPLING_FIELDS,
    context_check,
    request_tokens_check,
    sampling_fields,
    stream_fields,
)
from moe.interop.tokenizer import Tokenizer

PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_FIELDS = ("role", "content", "name", "tool_call_id")
KNOWN_FIELDS = (
    "model", "messages", "max_tokens", "max_completion_tokens", "n", "logprobs",
    "top_logprobs", "stream", "stream_options", "user", *SAMPLING_FIELDS,
)  # fmt: skip


class TemplateRaised(Exception):
    """`raise_exception(message)` called by a template."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(value: Any, indent: int | None = None) -> str:
    # HF's `tojson`: plain JSON (Jinja's own escapes <, >, & and ' for HTML).
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplate:
    """A compiled chat template (see the module docstring). `source` None: the plain one."""

    def __init__(self, source: str | None, bos_token: str | None, eos_token: str | None) -> None:
        self.source = source if source is not None else PLAIN_TEMPLATE
        self.is_plain = source is None
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self.template = environment.from_string(self.source)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(f"the chat template does not compile: {error}") from None
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text; `RequestError` 400 when the template fails on these messages."""
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, tools=None,
            )  # fmt: skip
        except Exception as error:  # a template is code: any failure is its answer
            raise RequestError(
                400,
                f"messages: the chat template failed: {type(error).__name__}: {error}",
                param="messages",
                code="chat_template_error",
            ) from None


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        utf8(value, where)
        return value
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}):  # fmt: skip
                raise invalid(
                    where, f"part {index} is {part!r}; accepted: {{'type': 'text', 'text': str}} "
                    "(this model reads text only)", "invalid_type",
                )  # fmt: skip
            texts.append(part["text"])
        return _content("".join(texts), where)
    raise invalid(where, f"{value!r} is not a string or a list of text parts", "invalid_type")


def parse_messages(value: Any) -> list[dict[str, str]]:
    """Checked messages: each a role of `ROLES` and its content, as the template sees them."""
    if not isinstance(value, list) or not value:
        raise invalid("messages", f"{value!r} is not a non-empty list of messages", "invalid_type")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(where, f"{message!r} is not an object", "invalid_type")
        refuse_unknown({f"{where}.{k}": v for k, v in message.items()},
                       tuple(f"{where}.{k}" for k in MESSAGE_FIELDS))  # fmt: skip
        role = message.get("role")
        if role is None:
            raise invalid(f"{where}.role", f"missing; accepted: one of {', '.join(ROLES)}")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"{role!r} is not a role; accepted: {', '.join(ROLES)}")
        checked = {"role": role, "content": _content(message.get("content"), f"{where}.content")}
        for key in ("name", "tool_call_id"):
            if key in message:
                if not isinstance(message[key], str):
                    raise invalid(f"{where}.{key}", f"{message[key]!r} is not a string")
                checked[key] = message[key]
        messages.append(checked)
    return messages


def render_prompt(
    data: dict[str, Any], template: ChatTemplate, tokenizer: Tokenizer, add_generation_prompt: bool
) -> tuple[str, list[int]]:
    """The rendered prompt of `data["messages"]` and its token ids."""
    text = template.render(parse_messages(data.get("messages")), add_generation_prompt)
    special = boolean(data, "add_special_tokens", False)
    return text, tokenizer.encode(text, add_special_tokens=special)


def parse_chat_request(
    body: bytes,
    catalog: dict[str, ModelEntry],
    limits: Limits,
    tokenizer: Tokenizer,
    template: ChatTemplate,
) -> ChatRequest:
    """Check a `POST /v1/chat/completions` body and render its messages (statuses as in
    `launch.serving.validation`; 400 when the template fails)."""
    data = decode_body(body, limits)
    refuse_unknown(data, KNOWN_FIELDS)
    model, entry = model_entry(data, catalog)
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", f"{user!r} is not a string", "invalid_type")
    _, ids = render_prompt(data, template, tokenizer, add_generation_prompt=True)
    if not ids:
        raise invalid("messages", "the rendered prompt is empty")
    context_check(ids, entry, "messages")
    max_tokens = optional_integer(data, "max_completion_tokens", 1, limits.max_tokens)
    if max_tokens is None:  # the older name; the default: as long as the service allows
        max_tokens = integer(data, "max_tokens", limits.max_tokens, 1, limits.max_tokens)
    n = integer(data, "n", 1, 1, limits.max_n)
    logprobs = boolean(data, "logprobs")
    top_logprobs = integer(data, "top_logprobs", 0, 0, limits.max_logprobs)
    if data.get("top_logprobs") is not None and not logprobs:
        raise invalid("top_logprobs", "only with logprobs=true")
    stream, include_usage = stream_fields(data)
    request_tokens_check([ids], n, max_tokens, limits)
    generation = GenerationRequest(
        prompts=(tuple(ids),), n=n, best_of=n, max_tokens=max_tokens,
        logprobs=top_logprobs if logprobs else None,
        **sampling_fields(data, entry, limits, tokenizer.vocab_size),
    )  # fmt: skip
    return ChatRequest(
        model=model, deployment=entry.deployment, generation=generation, stream=stream,
        include_usage=include_usage, logprobs=logprobs, top_logprobs=top_logprobs,
    )  # fmt: skip
