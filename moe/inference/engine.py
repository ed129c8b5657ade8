"""The inference engine: iteration-level batching over a slot KV cache (Orca, vLLM).

    engine = InferenceEngine(model, max_batch=32, tokenizer=loaded.tokenizer)
    rid = engine.submit("In the beginning", SamplingParams(max_tokens=50, temperature=0))
    for completion in engine.run():  # or: while engine.has_work(): engine.step()
        print(completion.request_id, completion.text, completion.token_ids)

Scheduling happens per step, not per request: at every `step()` each running
sequence decodes one token, waiting requests are admitted into free slots and prefilled
in the same step, and a sequence that finishes (max tokens, a stop string or eos) leaves and
frees its slot for the next waiting request. A request never waits for the longest
request of a batch. Each sequence samples with its own generator
(`moe.inference.sampling`), so its output does not depend on its neighbours.

A step carries at most `max_step_tokens` tokens: the decodes first (one each), then
prefills in arrival order. With `chunked_prefill` (the default) a prompt that does not
fit the rest of the budget is prefilled in chunks over several steps, beside the running
decodes, and samples its first token after its last chunk; so a long prompt no longer
stalls every running sequence for a whole step. Without it a prompt waits until it fits
whole.

`compile=True`: the decode rows of a step run through `moe.inference.decode`'s compiled
step (one graph per batch-size bucket over static buffers; CUDA graphs on CUDA), the
prefill chunks through one eager call (`moe.inference.runner`). Same engine, same API,
the same greedy text; `compile_report()` says what compiled and in how long.

Tokens and text: the engine speaks the model's tokenizer (`moe.interop.tokenizer`;
bytes, vocabulary 256, by default). A prompt is token ids, text, or UTF-8 bytes
(`moe.inference.text.encode_prompt`); a completion carries its token ids and its text.
Text streams never split a UTF-8 character, stop strings match on text, and the
tokenizer's eos id ends a sequence (finish reason "stop"; the id is counted, not
decoded). A model whose embedding has more rows than its tokenizer has tokens (padded
vocabularies) never samples a row without text: those logits are masked.

Routing at inference is dropless by default: capacity-limited routing makes the slots
a token keeps depend on the other tokens of the batch, so one request's output would
change with its neighbours. The engine overrides the model's capacity policy with
`CapacityOverride.DROPLESS` while it lives (`MoETransformer.capacity_override`; DynaMoE
included; `restore()` puts the trained one back); `routing="trained"` keeps the trained
policy for those who want it.

Precision: the engine computes in the model's parameter dtype (bf16 weights from
`load_model(precision="bf16")`): the KV cache is kept in it (`kv_dtype`), and the
sampler and the log-probabilities read the logits in fp32.

Log-probabilities and telemetry come from the step that samples: a request that asks
(`SamplingParams.logprobs`) gets each sampled token's log-probability and alternatives
from the logits the token was sampled from, and one that asks for `prompt_logprobs` gets
its prompt scored from the logits of its prefill (`moe.inference.sampling`); neither
costs a model call. `take_telemetry()` returns what the engine did since the last call
(tokens, tokens per expert per layer, dropped slots, all-to-all time) and what it holds
(`moe.inference.telemetry`).

Context longer than `max_len` (the model's `max_seq_len` unless given): a prompt keeps
its last `max_len` tokens; a sequence whose slot fills up is re-prefilled with the last half
window (positions restart at 0, as in training windows) and continues.

Expert parallelism: under `torchrun` with EP dispatchers (`moe.inference.loading`),
every EP rank runs its own engine over its own share of the requests, and the MoE
layers exchange tokens in every call. `run(group=ep_group)` keeps the ranks in
lockstep: a rank with no work still calls the model (with no tokens) until every rank
is done.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe.inference.cache import Segment
from moe.inference.decode import DecodeCompileOptions
from moe.inference.outputs import GeneratedToken, PromptSpan, generated_tokens, score_prompts
from moe.inference.runner import ModelRunner, StepLogits
from moe.inference.sampling import SamplingParams, TokenLogprob, sample_tokens
from moe.inference.scheduler import Scheduler, SequenceState
from moe.inference.telemetry import EngineTelemetry
from moe.inference.text import Prompt, TextStream, encode_prompt
from moe.inference.threads import SERIAL_STEP_TOKENS, step_threads
from moe.interop.tokenizer import ByteTokenizer, Tokenizer
from moe.transformer import MoETransformer
from routing import CapacityOverride
from routing.config import parse_enum


@dataclass(frozen=True)
class Completion:
    """A finished request. `token_ids`: every sampled id (an eos, and the tokens of a
    stop string, included; `completion_tokens` counts them); `tokens`: the same, each
    with what the request asked for (log-probability, experts); `text`: the
    completion's text, cut before a stop string. `prompt_logprobs`: when asked, the
    score of every prompt token after the first (`SamplingParams.prompt_logprobs`).
    Times are wall-clock seconds: `time_to_first_token_s` from submission to the first
    sampled token; `per_token_latency_s` the mean time between later tokens (0 with one
    token)."""

    request_id: int
    prompt_tokens: int
    completion_tokens: int
    text: str
    finish_reason: str  # "stop" (a stop string or eos) or "length" (max_tokens)
    time_to_first_token_s: float
    per_token_latency_s: float
    total_time_s: float
    tokens: tuple[GeneratedToken, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(token.id for token in self.tokens)


@dataclass(frozen=True)
class StepEvent:
    """What one step produced for one request: the text it may now show (held back
    while it could still be the start of a stop string or of a character), its
    completion if it finished, the token it sampled, and (in its first event, when
    asked) its prompt's scores."""

    request_id: int
    new_text: str
    completion: Completion | None
    new_tokens: tuple[GeneratedToken, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


class InferenceEngine:
    """Batched generation over `model` (see the module docstring).

    `max_batch`: KV-cache slots, i.e. sequences running at once. `max_step_tokens`:
    tokens one step may carry (decodes first, then prefills, in chunks with
    `chunked_prefill`; without it, at least `max_len`). `task_ids`: the
    task ids requests may name (None: any, or none; a model whose router reads the task
    requires one per request). `routing`: "dropless" (default) or "trained". `warmup`:
    run one token through the model at construction (the first call of the model's
    custom ops in a process imports `torch._dynamo`, seconds that would otherwise land
    in the first request's time to first token); under EP every rank must agree on it.
    `compile`: decode through the compiled step (`compile_options`: its buckets, when
    they compile, the backend; see `moe.inference.decode`); under EP every rank must
    agree on both. `tokenizer`: the model's (`LoadedModel.tokenizer`); None is bytes,
    for a model of vocabulary 256. `max_len`: the context of every slot (default the
    model's `max_seq_len`; a smaller one bounds the KV cache of a long-context model).
    `serial_step_tokens`: an eager CPU step of at most this many tokens runs on one
    intra-op thread (`moe.inference.threads`; 0: every step keeps the process's threads).
    """

    def __init__(
        self,
        model: MoETransformer,
        *,
        max_batch: int = 32,
        max_step_tokens: int = 4096,
        task_ids: Sequence[int] | None = None,
        routing: CapacityOverride | str = CapacityOverride.DROPLESS,
        warmup: bool = True,
        compile: bool = False,
        compile_options: DecodeCompileOptions | None = None,
        chunked_prefill: bool = True,
        tokenizer: Tokenizer | None = None,
        max_len: int | None = None,
        serial_step_tokens: int = SERIAL_STEP_TOKENS,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} is invalid; accepted: >= 1")
        if serial_step_tokens < 0:
            raise ValueError(
                f"serial_step_tokens={serial_step_tokens} is invalid; accepted: >= 0 (0: off)"
            )
        self.serial_step_tokens = serial_step_tokens
        override = parse_enum(CapacityOverride, routing, "routing")
        self.model = model
        self.max_len = max_len or model.config.max_seq_len
        if not 1 <= self.max_len <= model.config.max_seq_len:
            raise ValueError(
                f"max_len={max_len} is invalid; accepted: 1..{model.config.max_seq_len} "
                "(the model's max_seq_len)"
            )
        if max_step_tokens < (1 if chunked_prefill else self.max_len):
            raise ValueError(
                f"max_step_tokens={max_step_tokens} is too small; accepted: >= 1 with "
                f"chunked_prefill, else >= max_len={self.max_len} (a full-length prompt "
                "must fit one step)"
            )
        self.vocab_size = model.config.vocab_size
        if tokenizer is None and self.vocab_size != 256:
            raise ValueError(
                f"the model has a vocabulary of {self.vocab_size}, not bytes: pass its "
                "tokenizer (tokenizer=LoadedModel.tokenizer)"
            )
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        if self.tokenizer.vocab_size > self.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                f"{self.vocab_size}"
            )
        if compile and override != CapacityOverride.DROPLESS:
            raise ValueError(
                f"compile=True needs routing=dropless (got {override.value}): the padding rows "
                "of a compiled step would take capacity from the live ones"
            )
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.chunked_prefill = chunked_prefill
        self.task_ids = None if task_ids is None else sorted(set(task_ids))
        self.needs_task = model.routing is not None and model.routing.needs_task_ids
        self.device = model.embed.weight.device
        self.runner = ModelRunner(
            model, max_batch=max_batch, max_len=self.max_len, compile=compile,
            compile_options=compile_options, pad_task=self.task_ids[0] if self.task_ids else 0,
        )  # fmt: skip
        self.cache = self.runner.cache
        self.kv_dtype = self.cache.k_SGLC[0].dtype  # the model's dtype (bf16 weights: bf16)
        self.meter = self.runner.meter
        # Held for the engine's life; `restore()` leaves it.
        self._override = contextlib.ExitStack()
        self._override.enter_context(model.capacity_override(override))
        self._was_training = model.training
        model.eval()
        self.scheduler = Scheduler(self.cache, max_batch, max_step_tokens, chunked_prefill)
        self._next_id = 0
        self.runner.warm_up(eager=warmup)
        self.meter.take()  # the warm-up's calls are not the service's

    # --- requests ----------------------------------------------------------------------

    def submit(
        self, prompt: Prompt, params: SamplingParams | None = None, task_id: int | None = None
    ) -> int:
        """Queue a request; returns its id. `prompt`: token ids, text or UTF-8 bytes
        (`moe.inference.text.encode_prompt`); it keeps its last `max_len` tokens."""
        params = params or SamplingParams()
        ids = encode_prompt(prompt, self.tokenizer, self.vocab_size)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params={params!r} is invalid; accepted: a SamplingParams")
        bad_bias = [token for token, _ in params.logit_bias if token >= self.vocab_size]
        if bad_bias:
            raise ValueError(
                f"logit_bias names token ids {bad_bias}; accepted: [0, {self.vocab_size})"
            )
        if task_id is None and self.needs_task:
            accepted = "" if self.task_ids is None else f", one of {self.task_ids}"
            raise ValueError(f"this model routes by task: give task_id{accepted}")
        if task_id is not None and self.task_ids is not None and task_id not in self.task_ids:
            raise ValueError(
                f"task_id={task_id} is not a task of this model; accepted: {self.task_ids}"
            )
        request_id = self._next_id
        self._next_id += 1
        generator = torch.Generator(device=self.device).manual_seed(params.seed)
        tokens = ids[-self.max_len :]
        text = TextStream(self.tokenizer, tokens, params.stop, self.tokenizer.eos_token_id)
        self.scheduler.waiting.append(
            SequenceState(request_id, tokens, params, task_id, generator, time.perf_counter(),
                          text, context=list(tokens), pending=len(tokens))
        )  # fmt: skip
        return request_id

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def compile_report(self) -> dict | None:
        """The compiled decode step's buckets, compilations and seconds (None when the
        engine runs eagerly); see `CompiledDecoder.report`."""
        decoder = self.runner.decoder
        return None if decoder is None else decoder.report()

    def cancel(self, request_id: int) -> bool:
        """Drop a waiting or running request (a client that went away) and free its
        slot; returns whether it was still there. Call it between steps."""
        return self.scheduler.cancel(request_id)

    # --- the iteration -----------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        """One step: prefill (chunks of) the admitted, decode the running; returns what
        each request produced. With nothing to do the model is still called with no
        tokens (EP ranks must call their MoE layers together). An eager step of few
        tokens on CPU runs on one intra-op thread (`moe.inference.threads`)."""
        scheduled = self.scheduler.schedule()
        threads = (
            step_threads(
                sum(count for _, count in scheduled), self.runner.device, self.serial_step_tokens
            )
            if self.runner.decoder is None  # compiled kernels keep the threads they have
            else contextlib.nullcontext()
        )
        with threads:
            return self._step(scheduled)

    def _step(self, scheduled: list[tuple[SequenceState, int]]) -> list[StepEvent]:
        """`step` on the scheduler's choice."""
        segments, tokens, tasks = [], [], []
        for sequence, count in scheduled:
            start = len(sequence.context) - sequence.pending
            assert self.cache.lengths[sequence.slot] == start, "slot and context out of step"
            segments.append(Segment(sequence.slot, start, count))
            tokens.append(sequence.context[start : start + count])
            tasks.append(sequence.task_id)
        scoring = {  # segments of prompts that are scored, in their first prefill
            i for i, (s, _) in enumerate(scheduled)
            if s.params.prompt_logprobs is not None and not s.generated
        }  # fmt: skip
        ready = []  # scheduled sequences whose context is now all in their slot
        for index, (sequence, count) in enumerate(scheduled):
            if sequence.pending == count:
                ready.append(index)
        want_experts = any(scheduled[i][0].params.routed_experts for i in ready)
        logits = self.runner.run(segments, tokens, tasks, want_rows=scoring,
                                 want_experts=want_experts)  # fmt: skip
        if self.tokenizer.vocab_size < self.vocab_size:
            # Padded rows have no text: never sampled, scored or offered as alternatives.
            logits.mask_ids_from(self.tokenizer.vocab_size)
        self._score_prompts(logits, scheduled, segments, scoring)
        prompt_tokens = sum(count for s, count in scheduled if not s.generated)
        for sequence, count in scheduled:
            sequence.pending -= count
        sampled = [scheduled[i][0] for i in ready]
        generated = sum(1 for s in sampled if s.params.max_tokens > 0)
        self.meter.record_step(sum(len(t) for t in tokens), prompt_tokens, generated)
        if not ready:
            return []
        last_BV = logits.last_SV[ready]  # float32 (`StepLogits`)
        next_tokens = sample_tokens(
            last_BV, [s.params for s in sampled], [s.generator for s in sampled],
            [s.generated for s in sampled],
        )  # fmt: skip
        experts = None if logits.experts is None else [logits.experts[i] for i in ready]
        params = [s.params for s in sampled]
        return self._advance(sampled, generated_tokens(last_BV, next_tokens, params, experts))

    def _score_prompts(
        self,
        logits: StepLogits,
        scheduled: list[tuple[SequenceState, int]],
        segments: list[Segment],
        scoring: set[int],
    ) -> None:
        """Score what this step's prefill read of the prompts that ask (`outputs`)."""
        spans, owners, rows, offset = [], [], [], 0
        for index in sorted(scoring):
            sequence, segment = scheduled[index][0], segments[index]
            top = sequence.params.prompt_logprobs
            assert top is not None
            spans.append(PromptSpan(offset, segment.start, segment.count, sequence.prompt, top))
            owners.append(sequence)
            rows.append(logits.rows(index))
            offset += segment.count
        if not spans:
            return
        for sequence, scores in zip(owners, score_prompts(torch.cat(rows), spans)):
            sequence.prompt_scores.extend(scores)

    def _advance(
        self, sampled: list[SequenceState], outputs: list[GeneratedToken]
    ) -> list[StepEvent]:
        now = time.perf_counter()
        events, finished = [], set()
        for sequence, output in zip(sampled, outputs, strict=True):
            if sequence.params.max_tokens == 0:  # the prompt was only to be read
                events.append(self._finish(sequence, "length", now))
                finished.add(id(sequence))
                continue
            token = output.id
            first = not sequence.generated
            if first:
                sequence.first_token_at = now
            sequence.outputs.append(output)
            sequence.generated.append(token)
            sequence.context.append(token)
            sequence.pending = 1
            if sequence.text.push(token):
                events.append(self._finish(sequence, "stop", now))
                finished.add(id(sequence))
                continue
            if len(sequence.generated) >= sequence.params.max_tokens:
                events.append(self._finish(sequence, "length", now))
                finished.add(id(sequence))
                continue
            if self.cache.lengths[sequence.slot] + 1 > self.max_len:
                # The slot is full: re-prefill the last half window from position 0.
                sequence.context = sequence.context[-max(1, self.max_len // 2) :]
                sequence.pending = len(sequence.context)
                self.cache.reset(sequence.slot)
            new_text = sequence.text.visible()
            scores = self._prompt_scores(sequence) if first else None
            events.append(StepEvent(sequence.request_id, new_text, None, (output,), scores))
        self.scheduler.retire(finished)
        return events

    @staticmethod
    def _prompt_scores(sequence: SequenceState) -> tuple[TokenLogprob, ...] | None:
        if sequence.params.prompt_logprobs is None:
            return None
        return tuple(sequence.prompt_scores)

    def _finish(self, sequence: SequenceState, reason: str, now: float) -> StepEvent:
        text, unseen = sequence.text.finish()
        if not sequence.generated:  # max_tokens=0: the prompt's prefill was all
            sequence.first_token_at = now
        later = max(0, len(sequence.generated) - 1)
        completion = Completion(
            request_id=sequence.request_id,
            prompt_tokens=len(sequence.prompt),
            completion_tokens=len(sequence.generated),
            text=text,
            finish_reason=reason,
            time_to_first_token_s=sequence.first_token_at - sequence.submitted,
            per_token_latency_s=(now - sequence.first_token_at) / later if later else 0.0,
            total_time_s=now - sequence.submitted,
            tokens=tuple(sequence.outputs),
            prompt_logprobs=self._prompt_scores(sequence),
        )
        self.scheduler.release(sequence)
        last = sequence.outputs[-1:] if sequence.generated else []
        return StepEvent(
            sequence.request_id, unseen, completion, tuple(last),
            self._prompt_scores(sequence) if len(sequence.generated) <= 1 else None,
        )  # fmt: skip

    # --- driving -----------------------------------------------------------------------

    def run(self, group: dist.ProcessGroup | None = None) -> Iterator[Completion]:
        """Step until every request is done, yielding completions as they finish. With
        `group` (the EP group), step until every rank of it is done."""
        while True:
            if group is not None:
                flag = torch.tensor([1.0 if self.has_work() else 0.0], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
                if flag.item() == 0:
                    return
            elif not self.has_work():
                return
            for event in self.step():
                if event.completion is not None:
                    yield event.completion

    def take_telemetry(self) -> EngineTelemetry:
        """What the engine did since the last call, and what it holds now
        (`moe.inference.telemetry`)."""
        scheduler = self.scheduler
        return self.meter.take(
            running=len(scheduler.running), waiting=len(scheduler.waiting),
            slots_in_use=self.max_batch - len(scheduler.free_slots), slots_total=self.max_batch,
            kv_tokens=sum(self.cache.lengths), kv_capacity=self.max_batch * self.max_len,
        )  # fmt: skip

    def restore(self) -> None:
        """Give the model back as it came: its capacity policy, training mode."""
        self._override.close()
        self.model.train(self._was_training)


def generate(
    model: MoETransformer,
    prompt: Prompt,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    task_id: int | None = None,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> Completion:
    """Sample up to `max_new_tokens` tokens after `prompt` (one request; dropless routing;
    `tokenizer` None is bytes); returns the completion (new ids and text only). Leaves the
    model's mode and routing as they were."""
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed=seed)
    engine = InferenceEngine(model, max_batch=1, tokenizer=tokenizer)
    try:
        engine.submit(prompt, params, task_id)
        (completion,) = list(engine.run())
    finally:
        engine.restore()
    return completion
