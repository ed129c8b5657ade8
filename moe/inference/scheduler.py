"""Which tokens go into the engine's next step (iteration-level scheduling, Orca / vLLM).

`Scheduler` holds the requests of an `moe.inference.engine.InferenceEngine`: the waiting
queue, the running sequences (each in its own KV-cache slot) and the free slots.
`schedule()` picks the next step's tokens: every decoding sequence its one token, then
prefills in arrival order within the rest of `max_step_tokens`. With `chunked_prefill`
a prompt that does not fit takes what is left (a chunk) and goes on in the next steps;
without it a running sequence's prefill goes whole and a waiting request is admitted only
when its whole prompt fits. Waiting requests are admitted into free slots as the budget
allows; a finished or cancelled sequence gives its slot back at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from moe.inference.cache import SlotKVCache
from moe.inference.outputs import GeneratedToken
from moe.inference.sampling import SamplingParams, TokenLogprob
from moe.inference.text import TextStream


@dataclass
class SequenceState:
    """One request as the engine tracks it: its prompt and sampling, its slot and what
    the slot must still take (`context`, `pending`), what it generated (ids, their
    `outputs`, and `text`: the stream that decodes them, finds stop strings and eos),
    and its times and prompt scores."""

    request_id: int
    prompt: list[int]
    params: SamplingParams
    task_id: int | None
    generator: torch.Generator
    submitted: float
    text: TextStream
    context: list[int] = field(default_factory=list)  # what the slot must hold
    generated: list[int] = field(default_factory=list)
    slot: int = -1
    pending: int = 0  # how many tokens of `context` the slot does not hold yet
    first_token_at: float = 0.0
    outputs: list[GeneratedToken] = field(default_factory=list)
    prompt_scores: list[TokenLogprob] = field(default_factory=list)


class Scheduler:
    """The engine's requests and slots (see the module docstring)."""

    def __init__(
        self, cache: SlotKVCache, max_batch: int, max_step_tokens: int, chunked_prefill: bool
    ) -> None:
        self.cache = cache
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self.free_slots = list(range(max_batch - 1, -1, -1))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[SequenceState, int]]:
        """(sequence, tokens it adds) of the next step, in running order."""
        budget = self.max_step_tokens - sum(1 for s in self.running if s.pending == 1)
        counts: dict[int, int] = {}
        for sequence in self.running:
            take = sequence.pending
            if take > 1 and self.chunked_prefill:
                take = min(take, max(budget, 0))
            counts[id(sequence)] = take
            budget -= take if take > 1 else 0
        while self.waiting and self.free_slots:
            pending = self.waiting[0].pending
            take = min(pending, budget) if self.chunked_prefill else pending
            if take < 1 or take > budget:
                break
            sequence = self.waiting.popleft()
            sequence.slot = self.free_slots.pop()
            self.cache.reset(sequence.slot)
            counts[id(sequence)] = take
            budget -= take
            self.running.append(sequence)
        return [(s, counts[id(s)]) for s in self.running if counts[id(s)] > 0]

    def release(self, sequence: SequenceState) -> None:
        """A running sequence is done: its slot is free (it stays in `running` until
        `retire`)."""
        self.free_slots.append(sequence.slot)
        self.cache.reset(sequence.slot)

    def retire(self, finished: set[int]) -> None:
        """Drop the sequences whose `id()` is in `finished` from `running`."""
        self.running = [s for s in self.running if id(s) not in finished]

    def cancel(self, request_id: int) -> bool:
        """Drop a waiting or running request and free its slot; whether it was there."""
        for sequence in self.waiting:
            if sequence.request_id == request_id:
                self.waiting.remove(sequence)
                return True
        for sequence in self.running:
            if sequence.request_id == request_id:
                self.running.remove(sequence)
                self.release(sequence)
                return True
        return False
