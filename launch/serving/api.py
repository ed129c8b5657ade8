"""The HTTP front: an OpenAI-compatible API as a Ray Serve FastAPI ingress.

    POST /v1/completions       OpenAI's completions (prompt: text, texts, ids or lists of
                               ids; n, best_of, logprobs, echo, penalties, logit_bias, ...)
    POST /v1/chat/completions  OpenAI's chat completions (messages through the chat template)
    GET  /v1/models            each model id, its deployment, experts per layer, bytes
    POST /tokenize             vLLM's: {"prompt"} or {"messages"} -> {"count", "tokens", ...}
    POST /detokenize           vLLM's: {"tokens"} -> {"prompt"}
    GET  /tokenizer_info       the tokenizer: eos token, vocabulary size, context length
    GET  /healthz, /health     200 when every deployment answers its health check, else 503
    GET  /metrics              Prometheus text format (`launch.serving.metrics`)
    GET  /v1/stats             responses given, by status (to count lost or doubled requests)

The gateway holds the model's tokenizer: it tokenizes prompts, renders chat messages
(`launch.serving.chat`) and checks every request (`launch.serving.validation`; the body
is read with a size bound before it is parsed) before forwarding it through a
`DeploymentHandle` to the model's deployment, whose queue Ray Serve bounds
(`max_ongoing_requests` per replica, `max_queued_requests` waiting): a full queue answers
503 with `Retry-After`, as does a replica that died while holding the request.
Streaming answers are server-sent events, then `data: [DONE]` (`launch.serving.events`).
The answers' shapes: `launch.serving.responses`.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at runtime
# (a string `Request` on a Serve ingress method would become a query parameter).
import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from launch.serving.chat import ChatTemplate, parse_chat_request, render_prompt
from launch.serving.events import CLIENT_CLOSED, error_response, sse_events, translate_error
from launch.serving.fields import boolean
from launch.serving.metrics import ServiceMetrics
from launch.serving.protocol import (
    ChatRequest,
    ChoiceChunk,
    CompletionRequest,
    GenerationResult,
    Limits,
    ModelEntry,
    RequestError,
    StreamEnd,
)
from launch.serving.responses import ChatAnswer, CompletionAnswer, TokenNames
from launch.serving.validation import (
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
)
from moe.interop.tokenizer import tokenizer_from_files

__all__ = ["CLIENT_CLOSED", "Gateway", "app", "sse_events", "translate_error"]

app = FastAPI(title="moe-system completions")
GENERATION_ENDPOINTS = ("completions", "chat")

Answer = CompletionAnswer | ChatAnswer
Parsed = CompletionRequest | ChatRequest


@serve.ingress(app)
class Gateway:
    """Routes each model id to its deployment's handle (`catalog`: id -> `ModelEntry`).
    `tokenizer_files`: the model's tokenizer (`Tokenizer.files()`; {} for bytes);
    `chat_template`: a Jinja2 template that replaces the tokenizer's (None: the
    tokenizer's, else the plain one)."""

    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        catalog: dict[str, ModelEntry],
        limits: Limits,
        retry_after_s: int,
        health_timeout_s: float,
        tokenizer_files: dict[str, bytes] | None = None,
        chat_template: str | None = None,
        metrics_stale_s: float = 30.0,
    ) -> None:
        self.handles = handles
        self.catalog = catalog
        self.limits = limits
        self.retry_after_s = retry_after_s
        self.health_timeout_s = health_timeout_s
        self.tokenizer = tokenizer_from_files(tokenizer_files or {}, "the served checkpoint")
        self.names = TokenNames(self.tokenizer)
        self.template = ChatTemplate(
            chat_template if chat_template is not None else self.tokenizer.chat_template,
            self.tokenizer.bos_token, self.tokenizer.eos_token,
        )  # fmt: skip
        self.context = max(entry.context_bytes for entry in catalog.values())
        self.responses: Counter[int] = Counter()
        self.prometheus = ServiceMetrics(metrics_stale_s)

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

    def _record(self, model: str, endpoint: str, status: int) -> None:
        self.prometheus.requests.labels(model, endpoint, str(status)).inc()
        if endpoint in GENERATION_ENDPOINTS:
            self.responses[status] += 1

    def _error(self, error: BaseException, model: str, endpoint: str) -> Response:
        failure = translate_error(error, self.retry_after_s)
        self._record(model, endpoint, failure.status)
        return error_response(failure)

    def _model_label(self, model: str, body: bytes) -> str:
        """The model a refused request named, when it is one of ours (labels stay few)."""
        if model != "unknown":
            return model
        try:
            named = json.loads(body).get("model")
        except Exception:  # not JSON, not an object: no model to name
            return model
        return named if isinstance(named, str) and named in self.catalog else model

    def _observe(self, model: str, result: GenerationResult) -> None:
        self.prometheus.replicas.update(result.report)
        self.prometheus.observe_tokens(model, sum(result.prompt_tokens), result.completion_tokens)
        for choice in result.choices:
            self.prometheus.observe_choice(model, choice)

    async def _generate(
        self, request: Request, endpoint: str, parse: Callable[[bytes], Parsed],
        answer_of: Callable[[Any], Answer],
    ) -> Response:  # fmt: skip
        model, body = "unknown", b""
        try:
            body = await self._read_body(request)
            parsed = parse(body)
            model = parsed.model
            handle = self.handles[parsed.deployment]
            answer = answer_of(parsed)
            in_flight = self.prometheus.in_flight.labels(model)
            in_flight.inc()
            if parsed.stream:
                return await self._stream(handle, parsed, answer, endpoint)
            try:
                result = await handle.complete.remote(parsed.generation)
            finally:
                in_flight.dec()
        except Exception as error:  # every failure becomes an HTTP error
            return self._error(error, self._model_label(model, body), endpoint)
        self._observe(model, result)
        self._record(model, endpoint, 200)
        return JSONResponse(answer.body(result))

    async def _stream(
        self, handle: DeploymentHandle, parsed: Parsed, answer: Answer, endpoint: str
    ) -> Response:
        model = parsed.model
        in_flight = self.prometheus.in_flight.labels(model)
        try:
            chunks = handle.options(stream=True).stream.remote(parsed.generation)
            assert isinstance(chunks, DeploymentResponseGenerator)  # what stream=True returns
            first = await chunks.__anext__()  # errors before the first chunk get a status
        except BaseException:
            in_flight.dec()
            raise
        seen: set[int] = set()

        def event(item: ChoiceChunk | StreamEnd) -> dict[str, Any] | None:
            if isinstance(item, StreamEnd):
                self.prometheus.replicas.update(item.report)
                prompt = sum(item.prompt_tokens)
                self.prometheus.observe_tokens(model, prompt, item.completion_tokens)
                return answer.end(item)
            first_piece = item.index not in seen
            seen.add(item.index)
            if item.finished is not None:
                self.prometheus.observe_choice(model, item.finished)
            return answer.chunk(item, first_piece)

        def record(status: int) -> None:
            in_flight.dec()
            self._record(model, endpoint, status)

        events = sse_events(first, chunks, event, self.retry_after_s, record)
        return StreamingResponse(events, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        def parse(body: bytes) -> CompletionRequest:
            return parse_completion_request(body, self.catalog, self.limits, self.tokenizer)

        return await self._generate(
            request, "completions", parse, lambda parsed: CompletionAnswer(parsed, self.names)
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        def parse(body: bytes) -> ChatRequest:
            return parse_chat_request(
                body, self.catalog, self.limits, self.tokenizer, self.template
            )

        return await self._generate(
            request, "chat", parse, lambda parsed: ChatAnswer(parsed, self.names)
        )

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        try:
            data, parsed = parse_tokenize_request(
                await self._read_body(request), self.catalog, self.limits
            )
            if parsed is None:  # chat messages: rendered as for a chat completion
                generation_prompt = boolean(data, "add_generation_prompt", True)
                _, ids = render_prompt(data, self.template, self.tokenizer, generation_prompt)
            else:
                ids = self.tokenizer.encode(parsed.text, parsed.add_special_tokens)
        except Exception as error:
            return self._error(error, "unknown", "tokenize")
        self._record(str(data.get("model") or "unknown"), "tokenize", 200)
        return JSONResponse({"count": len(ids), "max_model_len": self.context, "tokens": ids,
                             "token_strs": None})  # fmt: skip

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        try:
            parsed = parse_detokenize_request(
                await self._read_body(request), self.catalog, self.limits,
                self.tokenizer.vocab_size,
            )  # fmt: skip
        except Exception as error:
            return self._error(error, "unknown", "detokenize")
        self._record(parsed.model or "unknown", "detokenize", 200)
        return JSONResponse({"prompt": self.tokenizer.decode(list(parsed.tokens))})

    @app.get("/tokenizer_info")
    async def tokenizer_info(self) -> Response:
        tokenizer = self.tokenizer
        return JSONResponse({
            "tokenizer_class": type(tokenizer).__name__,
            "vocab_size": tokenizer.vocab_size,
            "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
            "bos_token": self.template.bos_token or None,
            "model_max_length": self.context, "max_model_len": self.context,
            "chat_template": self.template.source,
            "chat_template_is_plain": self.template.is_plain,
        })  # fmt: skip

    @app.get("/v1/models")
    async def models(self) -> Response:
        described = {}
        try:
            for name, handle in self.handles.items():
                described[name] = await handle.describe.remote()
        except Exception as error:
            return error_response(translate_error(error, self.retry_after_s))
        data = []
        for model_id, entry in sorted(self.catalog.items()):
            info = described[entry.deployment]
            data.append({
                "id": model_id, "object": "model", "created": info["created"],
                "owned_by": "moe-system", "max_model_len": entry.context_bytes,
                "deployment": entry.deployment, "task": entry.task,
                "experts": info["experts"], "weight_bytes": info["weight_bytes"],
                "expert_bytes": info["expert_bytes"], "dense_bytes": info["dense_bytes"],
                "resident_bytes": info["resident_bytes"], "ep_size": info["ep_size"],
                "pids": info["pids"], "completed": info["completed"],
                "compile": info.get("compile"),  # the compiled decode step's report, or None
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

    @app.get("/health")
    async def health(self) -> Response:
        """`/healthz` under the name vLLM and most load balancers probe."""
        return await self.healthz()

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Prometheus text format; every deployment is asked for a fresh report first."""

        async def report(name: str, handle: DeploymentHandle) -> None:
            try:
                fresh = await asyncio.wait_for(handle.telemetry.remote(), self.health_timeout_s)
                self.prometheus.replicas.update(fresh)
            except Exception:  # counted; the replicas' last reports stand
                self.prometheus.report_errors.labels(name).inc()

        await asyncio.gather(*(report(name, handle) for name, handle in self.handles.items()))
        return Response(self.prometheus.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/stats")
    async def stats(self) -> Response:
        return JSONResponse({"responses": {str(k): v for k, v in sorted(self.responses.items())}})
