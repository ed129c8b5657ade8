"""The model calls of one engine step: segments in, each segment's last-token logits out.

`ModelRunner` owns the engine's KV cache (`SlotKVCache`, one slot per sequence, plus a
spare one for the compiled step's padding rows) and its compiled decoder.
`ModelRunner.run(segments, tokens, tasks)` takes what the scheduler chose for a step (a
`moe.inference.cache.Segment` per sequence: a decode token, a whole prompt, or a chunk of
one) and returns the next-token logits after the last token of every segment.

- Eager: one packed call over every segment (`SlotKVCache.step`).
- Compiled (`compile=True`, a `moe.inference.decode.CompiledDecoder`): the one-token
  segments go through the compiled decode step of their bucket, the others (prefill
  chunks) through one eager packed call. A long prompt thus shares its steps with the
  running decodes, which keep their compiled step.
- Under expert parallelism every EP rank must call its MoE layers the same number of
  times per step (`lockstep`): a compiled step always makes both calls, an empty one
  where a rank has nothing of that kind, so every rank makes them in the same order.

Legend: S segments in the step, T packed tokens, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.inference.cache import Segment, SlotKVCache
from moe.inference.decode import CompiledDecoder, CompileWarmup, DecodeCompileOptions
from moe.transformer import MoETransformer


class ModelRunner:
    """Runs steps of `model` for up to `max_batch` sequences (see the module docstring).
    `pad_task`: the task id of a compiled step's padding rows (one the router accepts)."""

    def __init__(
        self,
        model: MoETransformer,
        *,
        max_batch: int,
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
            config.max_seq_len, config.head_dim, param.device, param.dtype,
        )  # fmt: skip
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
        self, segments: list[Segment], tokens: list[list[int]], tasks: list[int | None]
    ) -> Tensor:
        """logits_SV after the last token of each segment (segment i adds `tokens[i]`,
        `segments[i].count` of them, to its slot, for task `tasks[i]`); commits the
        segments to the cache. With no segments the model is still called (with no
        tokens): expert-parallel ranks call their MoE layers together."""
        if self.decoder is None:
            logits_SV = self._packed(segments, tokens, tasks)
        else:
            logits_SV = self._split(segments, tokens, tasks)
        self.cache.commit(segments)
        return logits_SV

    def _packed(
        self, segments: list[Segment], tokens: list[list[int]], tasks: list[int | None]
    ) -> Tensor:
        """One eager call over every segment packed in one row -> logits_SV."""
        flat_tokens: list[int] = []
        flat_tasks: list[int] = []
        for segment, own, task in zip(segments, tokens, tasks, strict=True):
            flat_tokens.extend(own)
            flat_tasks.extend([task if task is not None else 0] * segment.count)
        tokens_1T = torch.tensor([flat_tokens], dtype=torch.int64, device=self.device)
        task_ids_1T = None
        if self.needs_task or any(task is not None for task in tasks):
            task_ids_1T = torch.tensor([flat_tasks], dtype=torch.int64, device=self.device)
        caches: list = self.cache.step(segments)  # type: ignore[type-arg]
        logits_1TV = self.model(tokens_1T, task_ids_1T, caches).logits_BTV
        ends, offset = [], 0
        for segment in segments:
            offset += segment.count
            ends.append(offset - 1)
        return logits_1TV[0, ends]

    def _split(
        self, segments: list[Segment], tokens: list[list[int]], tasks: list[int | None]
    ) -> Tensor:
        """Decode rows compiled, prefill chunks in one eager call -> logits_SV."""
        assert self.decoder is not None
        decode = [i for i, segment in enumerate(segments) if segment.count == 1]
        prefill = [i for i, segment in enumerate(segments) if segment.count != 1]
        parts: list[tuple[list[int], Tensor]] = []
        if prefill or self.lockstep:
            logits = self._packed(
                [segments[i] for i in prefill], [tokens[i] for i in prefill],
                [tasks[i] for i in prefill],
            )  # fmt: skip
            parts.append((prefill, logits))
        if decode:
            logits = self.decoder.run(
                [tokens[i][0] for i in decode],
                [segments[i].start for i in decode],
                [segments[i].slot for i in decode],
                [task if (task := tasks[i]) is not None else 0 for i in decode],
            )
            parts.append((decode, logits))
        elif self.lockstep:
            self._packed([], [], [])
        if len(parts) == 1 and len(parts[0][0]) == len(segments):
            return parts[0][1]
        vocab = self.model.config.vocab_size
        logits_SV = torch.empty((len(segments), vocab), device=self.device, dtype=parts[0][1].dtype)
        for indices, logits in parts:
            if indices:
                logits_SV[indices] = logits
        return logits_SV
