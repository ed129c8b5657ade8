"""The service's protocol in one place: its bounds, its errors, the checked requests of
every endpoint, and what travels between the gateway and a model deployment.

    HTTP body --validation / chat--> CompletionRequest | ChatRequest (model, stream, ...)
                                     .generation: GenerationRequest (token ids, sampling)
    gateway --handle--> ModelServer.complete -> GenerationResult (ChoiceResult per choice)
                        ModelServer.stream   -> ChoiceChunk ..., StreamEnd
    GenerationResult / ChoiceChunk --responses--> the OpenAI-shaped JSON answer

Plain data, no Ray: these cross process boundaries pickled by Ray Serve, and the tests
build them by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe.inference import SamplingParams
from moe.inference.engine import GeneratedToken
from moe.inference.sampling import TokenLogprob
from moe.inference.telemetry import EngineTelemetry

MAX_SEED = 2**63 - 1
# Choice j of a request with seed s samples with seed s + j * this (mod 2**63): choice 0
# is what a request of n=1 with seed s samples; the others are far apart in seed space.
CHOICE_SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class Limits:
    """Bounds on every request (configuration: `serve.*`, docs/SERVING.md).

    `max_tokens` caps a completion's length; `max_stop` the number of stop strings,
    `max_stop_bytes` each one's UTF-8 length; `max_n` choices per prompt, `max_best_of`
    sequences generated per prompt, `max_logprobs` alternatives per token (at most 20,
    OpenAI's bound); `max_prompts` prompts in one completions request;
    `max_request_tokens` the tokens one request may make the engine hold: over its
    prompts, best_of x (prompt tokens + max_tokens)."""

    max_body_bytes: int = 64 * 1024
    max_tokens: int = 512
    max_stop: int = 4
    max_stop_bytes: int = 64
    max_temperature: float = 100.0
    max_n: int = 8
    max_best_of: int = 8
    max_logprobs: int = 20
    max_prompts: int = 64
    max_request_tokens: int = 262144

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens", "max_stop", "max_stop_bytes", "max_n",
                     "max_best_of", "max_prompts", "max_request_tokens"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"serve.{name}={value!r} is invalid; accepted: an integer >= 1")
        if not isinstance(self.max_logprobs, int) or not 0 <= self.max_logprobs <= 20:
            raise ValueError(
                f"serve.max_logprobs={self.max_logprobs!r} is invalid; accepted: 0..20"
            )
        if self.max_best_of < self.max_n:
            raise ValueError(
                f"serve.max_best_of={self.max_best_of} is below serve.max_n={self.max_n}; "
                "accepted: max_best_of >= max_n (best_of is at least n)"
            )
        if not self.max_temperature > 0:
            raise ValueError(f"serve.max_temperature={self.max_temperature!r}; accepted: > 0")


@dataclass(frozen=True)
class ModelEntry:
    """What a model id means: the deployment that answers it, the task id its requests
    run as (None: the request may give one), the context length in tokens, and whether a
    task id is required (task-routed checkpoints)."""

    deployment: str
    task: int | None
    context_bytes: int
    needs_task: bool = False
    task_ids: tuple[int, ...] | None = None


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


@dataclass(frozen=True)
class GenerationRequest:
    """What a model deployment runs: `best_of` sequences for each prompt (token ids),
    the best `n` of them returned (ranked by mean log-probability when best_of > n).
    `echo` with `logprobs`: score every prompt (its tokens' log-probabilities from the
    prefill, with `logprobs` alternatives). Choice j samples with `choice_seed(j)`."""

    prompts: tuple[tuple[int, ...], ...]
    n: int = 1
    best_of: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    echo: bool = False
    routed_experts: bool = False
    task: int | None = None

    def choice_seed(self, choice: int) -> int:
        return (self.seed + choice * CHOICE_SEED_STRIDE) % (MAX_SEED + 1)

    def params(self, choice: int, score_prompt: bool) -> SamplingParams:
        """The engine's parameters for sequence `choice` of a prompt; `score_prompt`:
        this sequence scores the prompt (one per prompt is enough when not streaming).
        Ranking best_of needs every sequence's log-probabilities."""
        logprobs = self.logprobs
        if logprobs is None and self.best_of > self.n:
            logprobs = 0
        echo_scores = self.echo and score_prompt and self.logprobs is not None
        prompt_logprobs = self.logprobs if echo_scores else None
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            stop=self.stop, seed=self.choice_seed(choice),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            routed_experts=self.routed_experts,
        )  # fmt: skip


@dataclass(frozen=True)
class ChoiceResult:
    """One finished choice. `index`: its place in the answer (prompt x n + rank);
    `tokens`: every sampled token (with log-probabilities and experts when asked; empty
    at the end of a stream, whose pieces carried them), `completion_tokens` how many;
    `prompt_logprobs`: the prompt's scores when echo asked for them."""

    index: int
    prompt_index: int
    text: str
    finish_reason: str
    completion_tokens: int
    tokens: tuple[GeneratedToken, ...]
    prompt_logprobs: tuple[TokenLogprob, ...] | None
    time_to_first_token_s: float
    per_token_latency_s: float
    total_time_s: float

    @property
    def mean_logprob(self) -> float:
        """The mean log-probability of the sampled tokens (best_of's ranking; 0 with none)."""
        scores = [t.logprob.logprob for t in self.tokens if t.logprob is not None]
        return sum(scores) / len(scores) if scores else 0.0


@dataclass(frozen=True)
class ReplicaReport:
    """A replica's telemetry (running totals since it started) and queue, for the
    gateway's `/metrics`; `sequence` orders one replica's reports (its steps so far)."""

    deployment: str
    replica: str
    ep_size: int
    sequence: int
    telemetry: EngineTelemetry
    queued: int  # requests in the replica not yet handed to the engine


@dataclass(frozen=True)
class GenerationResult:
    """A whole answer: every choice in order, the prompts' token counts, the tokens
    generated (every sequence, best_of's discarded ones included), the replica's report."""

    choices: tuple[ChoiceResult, ...]
    prompt_tokens: tuple[int, ...]
    completion_tokens: int
    report: ReplicaReport


@dataclass(frozen=True)
class ChoiceChunk:
    """A streamed piece of choice `index`: new text, the tokens sampled since its last
    chunk, its prompt's scores (first chunk, when echo asked), and its result when it
    finished."""

    index: int
    prompt_index: int
    text: str
    tokens: tuple[GeneratedToken, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    finished: ChoiceResult | None = None


@dataclass(frozen=True)
class StreamEnd:
    """The last item of a stream: token counts and the replica's report."""

    prompt_tokens: tuple[int, ...]
    completion_tokens: int
    report: ReplicaReport


@dataclass(frozen=True)
class CompletionRequest:
    """A checked `POST /v1/completions`. `prompt_texts`: each prompt's text as given
    (token-id prompts: their decoded text), what `echo` shows."""

    model: str
    deployment: str
    generation: GenerationRequest
    prompt_texts: tuple[str, ...]
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class ChatRequest:
    """A checked `POST /v1/chat/completions`: the messages rendered into one prompt.
    `logprobs`: whether each token's log-probability is returned, with `top_logprobs`
    alternatives."""

    model: str
    deployment: str
    generation: GenerationRequest
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class TokenizeRequest:
    """`POST /tokenize` (vLLM's shape): a prompt, or chat messages rendered first."""

    model: str | None
    text: str
    add_special_tokens: bool


@dataclass(frozen=True)
class DetokenizeRequest:
    """`POST /detokenize` (vLLM's shape)."""

    model: str | None
    tokens: tuple[int, ...]
