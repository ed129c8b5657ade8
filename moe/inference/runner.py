"""The model calls of one engine step: segments in, their logits out.

`ModelRunner` owns the engine's KV cache (`SlotKVCache`, one slot per sequence, plus a
spare one for the compiled step's padding rows), its compiled decoder and its meter
(`moe.inference.telemetry.EngineMeter`). `ModelRunner.run(segments, tokens, tasks)`
takes what the scheduler chose for a step (a `moe.inference.cache.Segment` per sequence:
a decode token, a whole prompt, or a chunk of one) and returns a `StepLogits`: the
next-token logits after the last token of every segment, every token's logits where a
prompt is scored, and the experts each segment's last token was routed to when asked.

- Eager: one packed call over every segment (`SlotKVCache.step`).
- Compiled (`compile=True`, a `moe.inference.decode.CompiledDecoder`): the one-token
  segments go through the compiled decode step of their bucket, the others (prefill
  chunks) through one eager packed call. A long prompt thus shares its steps with the
  running decodes, which keep their compiled step.
- Under expert parallelism every EP rank must call its MoE layers the same number of
  times per step (`lockstep`): a compiled step always makes both calls, an empty one
  where a rank has nothing of that kind, so every rank makes them in the same order.
- After each call the meter counts the tokens each expert got: from the layers' routing
  stats after a packed call, from the live rows' chosen experts after a compiled one
  (its padding rows are routed too, and must not count).

Legend: S segments in the step, T packed tokens, V vocabulary, n live rows, K experts per
token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moe.inference.cache import Segment, SlotKVCache
from moe.inference.decode import CompiledDecoder, CompileWarmup, DecodeCompileOptions
from moe.inference.outputs import routed_experts
from moe.inference.telemetry import EngineMeter
from moe.transformer import MoETransformer


@dataclass
class StepLogits:
    """What one step's calls gave, per segment in the order given (logits in float32
    whatever the model's dtype: the sampler and the log-probabilities read them so);
    `last_SV` the logits after its last token; `experts` (when asked) the experts every MoE layer chose for
    that token ([S][layer][K]); `rows(i)` the logits after each of segment i's tokens."""

    last_SV: Tensor
    experts: list[list[list[int]]] | None = None
    _rows: dict[int, Tensor] = field(default_factory=dict)

    def rows(self, index: int) -> Tensor:
        """[count, V]: the logits after each token of segment `index`."""
        if index in self._rows:
            return self._rows[index]
        return self.last_SV[index : index + 1]  # a one-token segment

    def mask_ids_from(self, first: int) -> None:
        """Set the logits of ids >= `first` to -inf in every row it holds (a padded
        vocabulary's rows without a token: never sampled, scored or offered)."""
        self.last_SV[:, first:] = float("-inf")
        for rows in self._rows.values():
            rows[:, first:] = float("-inf")


class ModelRunner:
    """Runs steps of `model` for up to `max_batch` sequences of up to `max_len` positions
    (default the model's `max_seq_len`) each (see the module docstring). `pad_task`: the
    task id of a compiled step's padding rows (one the router accepts)."""

    def __init__(
        self,
        model: MoETransformer,
        *,
        max_batch: int,
        max_len: int | None = None,
        compile: bool = False,
        compile_options: DecodeCompileOptions | None = None,
        pad_task: int = 0,
    ) -> None:
        self.model = model
        self.needs_task = model.routing is not None and model.routing.needs_task_ids
        self.lockstep = any(layer.dispatcher.exchanges_rows for _, layer in model.moe_layers())
        param = model.embed.weight
        self.device = param.device
        config = model.config
        self.cache = SlotKVCache(
            len(model.blocks), max_batch + (1 if compile else 0), config.n_kv_heads,
            max_len or config.max_seq_len, config.head_dim, param.device, param.dtype,
        )  # fmt: skip
        self.meter = EngineMeter(model)
        self.decoder: CompiledDecoder | None = None
        if compile:
            self.decoder = CompiledDecoder(
                model, self.cache.k_SGLC, self.cache.v_SGLC, max_batch=max_batch,
                pad_slot=max_batch, pad_task=pad_task, options=compile_options,
            )  # fmt: skip

    @torch.no_grad()
    def warm_up(self, eager: bool = True) -> None:
        """Run one token through the model (`eager`: the first call of the model's custom
        ops in a process imports `torch._dynamo`, seconds that would otherwise land in
        the first request's time to first token), then compile the decoder's buckets
        when it warms up at start."""
        if eager:
            zeros_11 = torch.zeros((1, 1), dtype=torch.int64, device=self.device)
            segments = [Segment(0, 0, 1)]
            caches: list = self.cache.step(segments)  # type: ignore[type-arg]
            self.model(zeros_11, zeros_11 if self.needs_task else None, caches)
            self.cache.reset(0)  # nothing committed: slot 0 is as empty as before
        if self.decoder is not None and self.decoder.options.warmup == CompileWarmup.START:
            self.decoder.warm()

    @torch.no_grad()
    def run(
        self,
        segments: list[Segment],
        tokens: list[list[int]],
        tasks: list[int | None],
        *,
        want_rows: set[int] | None = None,
        want_experts: bool = False,
    ) -> StepLogits:
        """The logits of a step in which segment i adds `tokens[i]` (its `count`
        tokens) to its slot for task `tasks[i]`; commits the segments to the cache.
        `want_rows`: segments whose every token's logits `StepLogits.rows` must give;
        `want_experts`: fill `StepLogits.experts`. With no segments the model is still
        called (with no tokens): expert-parallel ranks call their MoE layers together."""
        wanted = want_rows or set()
        if self.decoder is None:
            out = self._packed(list(range(len(segments))), segments, tokens, tasks, wanted,
                               want_experts)  # fmt: skip
        else:
            out = self._split(segments, tokens, tasks, wanted, want_experts)
        self.cache.commit(segments)
        return out

    def _packed(
        self,
        chosen: list[int],
        segments: list[Segment],
        tokens: list[list[int]],
        tasks: list[int | None],
        wanted: set[int],
        want_experts: bool,
    ) -> StepLogits:
        """One eager call over the segments `chosen`, packed in one row: their
        `StepLogits` (indexed in `chosen`'s order)."""
        flat_tokens: list[int] = []
        flat_tasks: list[int] = []
        for i in chosen:
            flat_tokens.extend(tokens[i])
            task = tasks[i]
            flat_tasks.extend([task if task is not None else 0] * segments[i].count)
        tokens_1T = torch.tensor([flat_tokens], dtype=torch.int64, device=self.device)
        task_ids_1T = None
        if self.needs_task or any(tasks[i] is not None for i in chosen):
            task_ids_1T = torch.tensor([flat_tasks], dtype=torch.int64, device=self.device)
        caches: list = self.cache.step([segments[i] for i in chosen])  # type: ignore[type-arg]
        logits_TV = self.model(tokens_1T, task_ids_1T, caches).logits_BTV[0]
        self.meter.record_routing(len(flat_tokens))
        ends, starts, offset = [], [], 0
        for i in chosen:
            starts.append(offset)
            offset += segments[i].count
            ends.append(offset - 1)
        rows = {
            index: logits_TV[start : start + segments[i].count].float()
            for index, (i, start) in enumerate(zip(chosen, starts))
            if i in wanted
        }
        experts = routed_experts(self.model, ends) if want_experts else None
        return StepLogits(logits_TV[ends].float(), experts, rows)

    def _split(
        self,
        segments: list[Segment],
        tokens: list[list[int]],
        tasks: list[int | None],
        wanted: set[int],
        want_experts: bool,
    ) -> StepLogits:
        """Decode rows compiled, prefill chunks in one eager call."""
        assert self.decoder is not None
        decode = [i for i, segment in enumerate(segments) if segment.count == 1]
        prefill = [i for i, segment in enumerate(segments) if segment.count != 1]
        parts: list[tuple[list[int], StepLogits]] = []
        if prefill or self.lockstep:
            parts.append(
                (prefill, self._packed(prefill, segments, tokens, tasks, wanted, want_experts))
            )
        if decode:
            logits_nV, experts_LnK = self.decoder.run(
                [tokens[i][0] for i in decode],
                [segments[i].start for i in decode],
                [segments[i].slot for i in decode],
                [task if (task := tasks[i]) is not None else 0 for i in decode],
            )
            self.meter.record_routed(experts_LnK)
            experts = None
            if want_experts:
                experts = (
                    torch.stack(experts_LnK, dim=1).tolist()
                    if experts_LnK
                    else [[] for _ in decode]
                )
            parts.append((decode, StepLogits(logits_nV.float(), experts)))
        elif self.lockstep:
            self._packed([], [], [], [], set(), False)
        if not parts:  # nothing to run (and no peers to keep in step)
            vocab = self.model.config.vocab_size
            return StepLogits(torch.empty((0, vocab), device=self.device))  # float32
        if len(parts) == 1 and len(parts[0][0]) == len(segments):
            return parts[0][1]
        return _merged(parts, len(segments))


def _merged(parts: list[tuple[list[int], StepLogits]], count: int) -> StepLogits:
    """One `StepLogits` over `count` segments from parts over subsets of them."""
    first = next(part for _, part in parts)
    last_SV = first.last_SV.new_empty((count, first.last_SV.shape[1]))
    experts: list[list[list[int]]] | None = None
    if all(part.experts is not None for _, part in parts):
        experts = [[] for _ in range(count)]
    rows: dict[int, Tensor] = {}
    for indices, part in parts:
        if not indices:
            continue
        last_SV[indices] = part.last_SV
        for local, index in enumerate(indices):
            if experts is not None and part.experts is not None:
                experts[index] = part.experts[local]
            if local in part._rows:
                rows[index] = part._rows[local]
    return StepLogits(last_SV, experts, rows)
