"""The HTTP front: an OpenAI-style API as a Ray Serve FastAPI ingress.

    POST /v1/completions   {"model", "prompt", "max_tokens", "temperature", "top_p",
                            "stop", "seed", "stream", "task"}
    GET  /v1/models        each model id, its deployment, experts per layer, bytes
    GET  /healthz          200 when every deployment answers its health check, else 503
    GET  /v1/stats         responses given, by status (to count lost or doubled requests)

The gateway checks every request (`launch.serving.validation`; the body is read with a
size bound before it is parsed) and forwards it through a `DeploymentHandle` to the
model's deployment, whose queue Ray Serve bounds (`max_ongoing_requests` per replica,
`max_queued_requests` waiting): a full queue answers 503 with `Retry-After`, as does a
replica that died while holding the request. Streaming answers are server-sent events,
one per chunk of new text, then `data: [DONE]`.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at runtime
# (a string `Request` on a Serve ingress method would become a query parameter).
import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from launch.serving.batching import ReplicaUnavailable
from launch.serving.validation import (
    CompletionRequest,
    Limits,
    ModelEntry,
    RequestError,
    parse_completion_request,
)

app = FastAPI(title="moe-system completions")
CLIENT_CLOSED = 499  # a stream whose client went away before its end (nginx's code)


def _unavailable(message: str, retry_after_s: int, code: str) -> RequestError:
    return RequestError(
        503, message, type="server_error", code=code,
        headers={"Retry-After": str(retry_after_s)},
    )  # fmt: skip


def _error_response(error: RequestError) -> JSONResponse:
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


# Above the class: `serve.ingress` captures the class (and what it calls) as defined.
def _new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, completion = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _completion_body(parsed: CompletionRequest, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _new_id(), "object": "text_completion", "created": int(time.time()),
        "model": parsed.model,
        "choices": [{"index": 0, "text": result["text"],
                     "finish_reason": result["finish_reason"]}],
        "usage": _usage(result),
        "timings": {"time_to_first_token_s": result["time_to_first_token_s"],
                    "total_time_s": result["total_time_s"]},
    }  # fmt: skip


async def sse_events(
    first: dict[str, Any],
    chunks: AsyncIterator[dict[str, Any]],
    event: Callable[[dict[str, Any]], dict[str, Any]],
    retry_after_s: int,
    responses: Counter[int],
) -> AsyncIterator[str]:
    """A streamed completion as server-sent events: `event(chunk)` per chunk, then
    `data: [DONE]`, counted in `responses` as 200 just before [DONE] is sent. A failure
    after the first chunk cannot change the status line (200, already sent): the stream
    ends with an error event instead and is counted under the error's status (503 for a
    dead replica), so `/v1/stats` never counts a broken stream as a success. A client
    that goes away mid-stream is counted as 499 (nginx's "client closed request")."""
    outcome: int | None = None
    try:
        yield f"data: {json.dumps(event(first))}\n\n"
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(event(chunk))}\n\n"
        except Exception as error:  # the stream ends with the error
            failure = translate_error(error, retry_after_s)
            outcome = failure.status
            responses[outcome] += 1
            yield f"data: {json.dumps(failure.body())}\n\n"
            return
        outcome = 200
        responses[outcome] += 1
        yield "data: [DONE]\n\n"
    finally:
        if outcome is None:  # cancelled or closed before the end: the client went away
            responses[CLIENT_CLOSED] += 1


@serve.ingress(app)
class Gateway:
    """Routes each model id to its deployment's handle (`catalog`: id -> `ModelEntry`)."""

    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        catalog: dict[str, ModelEntry],
        limits: Limits,
        retry_after_s: int,
        health_timeout_s: float,
    ) -> None:
        self.handles = handles
        self.catalog = catalog
        self.limits = limits
        self.retry_after_s = retry_after_s
        self.health_timeout_s = health_timeout_s
        self.responses: Counter[int] = Counter()

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > self.limits.max_body_bytes
        ):
            raise RequestError(
                413, f"the request body has {declared} bytes; accepted: at most "
                f"{self.limits.max_body_bytes}", code="body_too_large",
            )  # fmt: skip
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_body_bytes:
                raise RequestError(
                    413, f"the request body exceeds {self.limits.max_body_bytes} bytes",
                    code="body_too_large",
                )  # fmt: skip
        return bytes(body)

    def _answer(self, response: Response) -> Response:
        if not isinstance(response, StreamingResponse):  # a stream counts itself at its end
            self.responses[response.status_code] += 1
        return response

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        try:
            parsed = parse_completion_request(
                await self._read_body(request), self.catalog, self.limits
            )
            handle = self.handles[parsed.deployment]
            if parsed.stream:
                return self._answer(await self._stream(handle, parsed))
            result = await handle.complete.remote(parsed.engine_fields())
        except Exception as error:  # every failure becomes an HTTP error
            return self._answer(_error_response(translate_error(error, self.retry_after_s)))
        return self._answer(JSONResponse(_completion_body(parsed, result)))

    async def _stream(self, handle: DeploymentHandle, parsed: CompletionRequest) -> Response:
        chunks = handle.options(stream=True).stream.remote(parsed.engine_fields())
        assert isinstance(chunks, DeploymentResponseGenerator)  # what stream=True returns
        first = await chunks.__anext__()  # errors before the first chunk get a status
        completion_id, created = _new_id(), int(time.time())

        def event(chunk: dict[str, Any]) -> dict[str, Any]:
            body = {
                "id": completion_id, "object": "text_completion", "created": created,
                "model": parsed.model,
                "choices": [{"index": 0, "text": chunk["text"],
                             "finish_reason": chunk.get("finish_reason")}],
            }  # fmt: skip
            if "completion_tokens" in chunk:
                body["usage"] = _usage(chunk)
            return body

        events = sse_events(first, chunks, event, self.retry_after_s, self.responses)
        return StreamingResponse(events, media_type="text/event-stream")

    @app.get("/v1/models")
    async def models(self) -> Response:
        described = {}
        try:
            for name, handle in self.handles.items():
                described[name] = await handle.describe.remote()
        except Exception as error:
            return _error_response(translate_error(error, self.retry_after_s))
        data = []
        for model_id, entry in sorted(self.catalog.items()):
            info = described[entry.deployment]
            data.append({
                "id": model_id, "object": "model", "owned_by": "moe-system",
                "deployment": entry.deployment, "task": entry.task,
                "experts": info["experts"], "weight_bytes": info["weight_bytes"],
                "expert_bytes": info["expert_bytes"], "dense_bytes": info["dense_bytes"],
                "resident_bytes": info["resident_bytes"], "ep_size": info["ep_size"],
                "pids": info["pids"], "completed": info["completed"],
            })  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    @app.get("/healthz")
    async def healthz(self) -> Response:
        states: dict[str, str] = {}
        for name, handle in self.handles.items():
            try:
                await asyncio.wait_for(handle.health.remote(), self.health_timeout_s)
                states[name] = "ok"
            except Exception as error:  # reported, not raised
                states[name] = f"unhealthy: {type(error).__name__}"
        healthy = all(state == "ok" for state in states.values())
        headers = {} if healthy else {"Retry-After": str(self.retry_after_s)}
        return JSONResponse(
            {"status": "ok" if healthy else "unhealthy", "deployments": states},
            status_code=200 if healthy else 503, headers=headers,
        )  # fmt: skip

    @app.get("/v1/stats")
    async def stats(self) -> Response:
        return JSONResponse({"responses": {str(k): v for k, v in sorted(self.responses.items())}})
