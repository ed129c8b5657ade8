"""The OpenAI-shaped answers: completions and chat, whole and streamed, with their
log-probabilities, from what a model deployment returned (`launch.serving.protocol`).

Tokens as text: a token is shown as its own decoded text, or as `token_id:<id>` where
that text alone is not valid (a byte of a multi-byte UTF-8 character, for a byte-level
model), so that every token, and every alternative, has a distinct name (vLLM's
spelling). `text_offset[i]` is where token i's text starts in the choice's `text` (the
prompt's text first when echoed), counted in characters; a token that completes a
character starts where the character starts. Chat log-probabilities carry each token's
UTF-8 `bytes` (the byte itself for a byte-level model; None where a token is not valid
text alone).

Usage counts tokens of the model's tokenizer: each prompt once, and every generated
token of every sequence (best_of's discarded ones included: they were computed).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from launch.serving.protocol import (
    ChatRequest,
    ChoiceChunk,
    ChoiceResult,
    CompletionRequest,
    GenerationResult,
    StreamEnd,
)
from moe.inference.engine import GeneratedToken
from moe.inference.sampling import TokenLogprob
from moe.interop.tokenizer import REPLACEMENT, IncrementalDetokenizer, Tokenizer


class TokenNames:
    """Each token's name and UTF-8 bytes (module docstring), decoded once per id: a
    gateway names the same few thousand tokens over and over."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = not tokenizer.files()  # a byte-level model: the token is the byte
        self._names: dict[int, str] = {}

    def name(self, token: int) -> str:
        name = self._names.get(token)
        if name is None:
            text = self.tokenizer.decode([token])
            name = f"token_id:{token}" if REPLACEMENT in text or not text else text
            self._names[token] = name
        return name

    def utf8(self, token: int) -> list[int] | None:
        if self.byte_level:
            return [token]
        name = self.name(token)
        return None if name.startswith("token_id:") else list(name.encode("utf-8"))


def usage(prompt_tokens: Sequence[int], completion_tokens: int) -> dict[str, int]:
    prompt = sum(prompt_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}  # fmt: skip


class CompletionLogprobs:
    """One choice's `logprobs` object, built token by token (streams add to it chunk by
    chunk; `take()` returns what was added since the last take)."""

    def __init__(self, names: TokenNames, top: int, context: Sequence[int] = ()) -> None:
        self.names = names
        self.top = top
        self.detokenizer = IncrementalDetokenizer(names.tokenizer, context)
        self.offset = 0
        self._reset()

    def _reset(self) -> None:
        self.body: dict[str, list[Any]] = {
            "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []
        }  # fmt: skip

    def _add(self, token: int, score: TokenLogprob | None) -> None:
        name = self.names.name
        self.body["tokens"].append(name(token))
        self.body["text_offset"].append(self.offset)
        self.offset += len(self.detokenizer.add([token]))
        if score is None:  # the first prompt token: nothing predicts it
            self.body["token_logprobs"].append(None)
            self.body["top_logprobs"].append(None)
            return
        top = {name(t): lp for t, lp in score.top[: self.top]}
        top.setdefault(name(token), score.logprob)
        self.body["token_logprobs"].append(score.logprob)
        self.body["top_logprobs"].append(top)

    def add_prompt(self, prompt: Sequence[int], scores: Sequence[TokenLogprob]) -> None:
        """The echoed prompt: its first token unscored, then `scores`."""
        for position, token in enumerate(prompt):
            self._add(token, scores[position - 1] if position else None)

    def add_tokens(self, tokens: Sequence[GeneratedToken]) -> None:
        for token in tokens:
            self._add(token.id, token.logprob)

    def take(self) -> dict[str, list[Any]]:
        body = self.body
        self._reset()
        return body


def chat_logprobs(names: TokenNames, tokens: Sequence[GeneratedToken], top: int) -> dict[str, Any]:
    """A chat choice's `logprobs`: `{"content": [...], "refusal": None}`."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": names.name(token), "logprob": logprob, "bytes": names.utf8(token)}

    content = []
    for token in tokens:
        assert token.logprob is not None, "the engine scores every token of such a request"
        item = entry(token.id, token.logprob.logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in token.logprob.top[:top]]
        content.append(item)
    return {"content": content, "refusal": None}


def routed_experts(tokens: Sequence[GeneratedToken]) -> list[list[list[int]]]:
    """Per generated token, per MoE layer, the experts chosen (global ids)."""
    return [[list(k) for k in token.experts or ()] for token in tokens]


class CompletionAnswer:
    """The answer to one `/v1/completions` request: `body(result)` whole, or `chunk(...)`
    per streamed piece and `end(...)` (see the module docstring)."""

    def __init__(self, request: CompletionRequest, names: TokenNames) -> None:
        self.request = request
        self.names = names
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._logprobs: dict[int, CompletionLogprobs] = {}

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.request.model}  # fmt: skip

    def _choice(
        self, index: int, prompt_index: int, text: str, tokens: Sequence[GeneratedToken],
        prompt_scores: Sequence[TokenLogprob] | None, first: bool, finish_reason: str | None,
    ) -> dict[str, Any]:  # fmt: skip
        generation = self.request.generation
        prompt = generation.prompts[prompt_index]
        echo = generation.echo and first
        if echo:
            text = self.request.prompt_texts[prompt_index] + text
        logprobs = None
        if generation.logprobs is not None:
            if index not in self._logprobs:
                context = () if generation.echo else prompt
                self._logprobs[index] = CompletionLogprobs(self.names, generation.logprobs, context)
            builder = self._logprobs[index]
            if echo:
                assert prompt_scores is not None, "echo asks the engine for the prompt's scores"
                builder.add_prompt(prompt, prompt_scores)
            builder.add_tokens(tokens)
            logprobs = builder.take()
        choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs,
                                  "finish_reason": finish_reason}  # fmt: skip
        if generation.routed_experts:
            choice["routed_experts"] = routed_experts(tokens)
        return choice

    def body(self, result: GenerationResult) -> dict[str, Any]:
        choices = [
            self._choice(
                c.index, c.prompt_index, c.text, c.tokens, c.prompt_logprobs, True, c.finish_reason
            )
            for c in result.choices
        ]
        return {**self._head(), "choices": choices,
                "usage": usage(result.prompt_tokens, result.completion_tokens),
                "timings": timings(result.choices)}  # fmt: skip

    def chunk(self, piece: ChoiceChunk, first: bool) -> dict[str, Any]:
        finished = piece.finished.finish_reason if piece.finished else None
        choice = self._choice(piece.index, piece.prompt_index, piece.text, piece.tokens,
                              piece.prompt_logprobs, first, finished)  # fmt: skip
        body = {**self._head(), "choices": [choice]}
        if self.request.include_usage:
            body["usage"] = None
        return body

    def end(self, end: StreamEnd) -> dict[str, Any] | None:
        if not self.request.include_usage:
            return None
        return {**self._head(), "choices": [],
                "usage": usage(end.prompt_tokens, end.completion_tokens)}  # fmt: skip


def timings(choices: Sequence[ChoiceResult]) -> dict[str, float]:
    """Our extension: the first token of any choice, and the last choice's end."""
    return {"time_to_first_token_s": min(c.time_to_first_token_s for c in choices),
            "total_time_s": max(c.total_time_s for c in choices)}  # fmt: skip


class ChatAnswer:
    """The answer to one `/v1/chat/completions` request, whole or streamed."""

    def __init__(self, request: ChatRequest, names: TokenNames) -> None:
        self.request = request
        self.names = names
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.request.model}  # fmt: skip

    def _logprobs(self, tokens: Sequence[GeneratedToken]) -> dict[str, Any] | None:
        if not self.request.logprobs:
            return None
        return chat_logprobs(self.names, tokens, self.request.top_logprobs)

    def body(self, result: GenerationResult) -> dict[str, Any]:
        choices = []
        for c in result.choices:
            choice: dict[str, Any] = {
                "index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c.tokens), "finish_reason": c.finish_reason,
            }  # fmt: skip
            if self.request.generation.routed_experts:
                choice["routed_experts"] = routed_experts(c.tokens)
            choices.append(choice)
        return {**self._head("chat.completion"), "choices": choices,
                "usage": usage(result.prompt_tokens, result.completion_tokens)}  # fmt: skip

    def chunk(self, piece: ChoiceChunk, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": piece.text}
        if first:
            delta = {"role": "assistant", **delta}
        choice: dict[str, Any] = {
            "index": piece.index, "delta": delta, "logprobs": self._logprobs(piece.tokens),
            "finish_reason": piece.finished.finish_reason if piece.finished else None,
        }  # fmt: skip
        if self.request.generation.routed_experts:
            choice["routed_experts"] = routed_experts(piece.tokens)
        body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if self.request.include_usage:
            body["usage"] = None
        return body

    def end(self, end: StreamEnd) -> dict[str, Any] | None:
        if not self.request.include_usage:
            return None
        return {**self._head("chat.completion.chunk"), "choices": [],
                "usage": usage(end.prompt_tokens, end.completion_tokens)}  # fmt: skip
