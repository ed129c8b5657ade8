"""How failures and streams look over HTTP: errors as OpenAI-style JSON with a status,
and server-sent event streams that count their own outcome."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError

from launch.serving.batching import ReplicaUnavailable
from launch.serving.protocol import RequestError

CLIENT_CLOSED = 499  # a stream whose client went away before its end (nginx's code)


def _unavailable(message: str, retry_after_s: int, code: str) -> RequestError:
    return RequestError(
        503, message, type="server_error", code=code,
        headers={"Retry-After": str(retry_after_s)},
    )  # fmt: skip


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def translate_error(error: BaseException, retry_after_s: int) -> RequestError:
    """A failure behind the gateway as the HTTP error the client sees."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, BackPressureError):
        return _unavailable("the model's queue is full; retry later", retry_after_s, "overloaded")
    if isinstance(error, ReplicaUnavailable | RayError) and not (
        isinstance(error, RayTaskError) and not isinstance(error, ReplicaUnavailable)
    ):
        return _unavailable(
            f"the replica holding the request failed ({type(error).__name__}); retry",
            retry_after_s, "replica_failed",
        )  # fmt: skip
    if isinstance(error, ValueError):
        return RequestError(422, str(error), code="invalid_value")
    return RequestError(500, f"{type(error).__name__}: {error}", type="server_error")


async def sse_events(
    first: Any,
    chunks: AsyncIterator[Any],
    event: Callable[[Any], dict[str, Any] | None],
    retry_after_s: int,
    record: Callable[[int], None],
) -> AsyncIterator[str]:
    """A streamed answer as server-sent events: `event(item)` per item (None: nothing to
    send), then `data: [DONE]`; `record(200)` just before [DONE] is sent. A failure after
    the first item cannot change the status line (200, already sent): the stream ends
    with an error event instead and records the error's status (503 for a dead replica),
    so a broken stream never counts as a success. A client that goes away mid-stream
    records 499 (nginx's "client closed request"). `record` is called exactly once."""
    outcome: int | None = None
    try:
        body = event(first)
        if body is not None:
            yield f"data: {json.dumps(body)}\n\n"
        try:
            async for item in chunks:
                body = event(item)
                if body is not None:
                    yield f"data: {json.dumps(body)}\n\n"
        except Exception as error:  # the stream ends with the error
            failure = translate_error(error, retry_after_s)
            outcome = failure.status
            record(outcome)
            yield f"data: {json.dumps(failure.body())}\n\n"
            return
        outcome = 200
        record(outcome)
        yield "data: [DONE]\n\n"
    finally:
        if outcome is None:  # cancelled or closed before the end: the client went away
            record(CLIENT_CLOSED)
