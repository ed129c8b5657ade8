"""The compiled decode step: one `torch.compile` graph per batch-size bucket over static
buffers (vLLM's CUDA-graph ladder and persistent batch, SGLang's per-batch-size compile).

An eager decode step is a few hundred small torch ops whose host dispatch, not their
arithmetic, sets its time. `CompiledDecoder.run` replaces it: the B sequences that
decode one token each are padded to the next bucket of a ladder (1, 2, 4, 8, 16, 32,
..., `max_batch`), written into that bucket's preallocated token / position / slot /
task buffers, and the bucket's graph runs the whole model on them: nothing in it depends
on the data's shape, so each bucket compiles once (`dynamic=False`) and every later step
of that size reuses the graph.

- Padding rows change nothing: they decode token 0 at position 0 of the cache's spare
  slot (`pad_slot`, never given to a sequence), so their keys land there and they attend
  only there; every other op of the model is row-wise (dropless routing: no capacity for
  padding to take). Their logits are dropped.
- Attention reads a fixed maximum of positions per slot with a mask (keys at positions
  <= the row's own), not the longest live sequence: the cache's `max_len` by default,
  or the smallest of `kv_lengths` that holds every row (then a bucket is a pair (rows,
  positions) and compiles once per pair used): reading all of a long window for every
  row of every step costs memory traffic that short sequences do not need.
- The MoE layers use the padded layout (`moe.layer.ExpertLayout.PADDED`: batched
  products over all held experts, no host-side row counts, no custom op) by default, or
  the compact grouped matmul (`expert_layout="compact"`). Under expert parallelism
  the all-to-all runs eagerly between compiled segments, as in training
  (`moe.layer`), so a bucket is several graphs there.
- Buckets compile when the decoder is built (`warmup="start"`) or on first use
  (`"lazy"`); `report()` gives the compilations and seconds per bucket. Inductor keeps
  its compiled kernels on disk (the launchers point `TORCHINDUCTOR_CACHE_DIR` at a
  directory), so a restart recompiles from the cache.
- On CUDA (`cuda_graphs=True`) each bucket's compiled step is also captured as a CUDA
  graph over the same static buffers, and a step is one graph replay.

Legend: B bucket rows, n live rows, V vocabulary, S slots, G key/value heads, N query
heads, L max positions per slot, C head width.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

import torch
from torch import Tensor

from moe.layer import ExpertLayout
from moe.transformer import MoETransformer
from routing.config import parse_enum

DEFAULT_LADDER = (1, 2, 4, 8, 16, 32)


class CompileWarmup(str, Enum):
    """When the decoder compiles its buckets."""

    START = "start"  # all of them when it is built (the first requests pay nothing)
    LAZY = "lazy"  # each when a step first needs it


@dataclass(frozen=True)
class DecodeCompileOptions:
    """How `CompiledDecoder` compiles. `buckets`: batch sizes to pad to (sorted; empty:
    `DEFAULT_LADDER` below `max_batch`, then `max_batch`); `kv_lengths`: positions the
    attention reads (sorted; empty: the cache's whole window; the window is always the
    last); `backend`: a dynamo backend (inductor; tests use cheaper ones);
    `expert_layout`: the MoE layers' layout in the compiled step; `cuda_graphs`: capture
    each bucket as a CUDA graph on CUDA; `cpp_wrapper`: on CPU, inductor's C++ wrapper
    (the code that allocates the step's buffers and calls its kernels in C++ instead of
    Python: demo model, 2 threads, 0.53-0.61 against 0.70-1.0 ms a step at batch 1,
    2.0-2.4 against 2.2-2.7 at batch 32; compile time about the same)."""

    buckets: tuple[int, ...] = ()
    kv_lengths: tuple[int, ...] = ()
    warmup: CompileWarmup = CompileWarmup.START
    backend: str = "inductor"
    expert_layout: ExpertLayout = ExpertLayout.PADDED
    cuda_graphs: bool = True
    cpp_wrapper: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "warmup", parse_enum(CompileWarmup, self.warmup, "warmup"))
        object.__setattr__(
            self, "expert_layout", parse_enum(ExpertLayout, self.expert_layout, "expert_layout")
        )
        for key in ("buckets", "kv_lengths"):
            values = tuple(getattr(self, key))
            if any(not isinstance(b, int) or b < 1 for b in values):
                raise ValueError(f"{key}={list(values)} is invalid; accepted: integers >= 1")
            object.__setattr__(self, key, tuple(sorted(set(values))))


def bucket_ladder(max_batch: int, buckets: Sequence[int] = ()) -> tuple[int, ...]:
    """The buckets of a decoder serving up to `max_batch` rows: `buckets` (or the
    default ladder) below `max_batch`, then `max_batch` itself."""
    chosen = buckets or DEFAULT_LADDER
    return (*sorted({b for b in chosen if b < max_batch}), max_batch)


class StaticDecodeAttention:
    """One block's `moe.attention.AttentionCache` for a compiled decode step: the model
    sees the bucket's rows as one packed sequence of B tokens ([1, B]); row b is the
    next token of the sequence in slot `slots_B[b]` at position `positions_B[b]`."""

    def __init__(
        self, k_SGLC: Tensor, v_SGLC: Tensor, slots_B: Tensor, positions_B: Tensor, kv_len: int
    ) -> None:
        self.k_SGLC = k_SGLC
        self.v_SGLC = v_SGLC
        self.slots_B = slots_B
        self.positions_B = positions_B
        self.kv_len = kv_len

    def positions(self, num_new: int, device: torch.device) -> Tensor:
        return self.positions_B

    def attend(self, q_BNTC: Tensor, k_BGTC: Tensor, v_BGTC: Tensor) -> Tensor:
        """q [1, N, B, C], k/v [1, G, B, C] -> y [1, N, B, C]: store each row's key and
        value at its slot and position, then attend each row over the first `kv_len`
        positions of its slot, masked to positions <= its own.

        Not one SDPA call (it needs the slots' keys and values copied out first): the
        scores are a batched matrix product of the rows' queries with their slots' keys,
        and the output a sum over the slot's values that inductor fuses with their
        gather. Not a sum for the scores too: inductor then folds the queries' rotary
        embedding (angles, cos, sin) into the sum's loop and recomputes it for every key
        position (a compiled batch-32 step of the demo model: 5.9 ms that way, 3.2 ms
        this way). Scores and weights in float32; a masked position contributes exactly
        zero, whatever its stale value."""
        self.k_SGLC[self.slots_B, :, self.positions_B] = k_BGTC[0].transpose(0, 1)
        self.v_SGLC[self.slots_B, :, self.positions_B] = v_BGTC[0].transpose(0, 1)
        _, heads, rows, width = q_BNTC.shape
        groups = self.k_SGLC.shape[1]
        k_BGLC = self.k_SGLC[self.slots_B, :, : self.kv_len].float()
        v_BGLC = self.v_SGLC[self.slots_B, :, : self.kv_len].float()
        # Query head n reads key/value head n // (N / G) (SDPA's enable_gqa grouping).
        q_BGR1C = q_BNTC[0].transpose(0, 1).reshape(rows, groups, heads // groups, 1, width)
        q_BGR1C = q_BGR1C.float() * width**-0.5
        key_L = torch.arange(self.kv_len, device=q_BNTC.device)
        mask_B11L = (key_L[None, :] <= self.positions_B[:, None])[:, None, None, :]
        scores_BGRL = torch.matmul(q_BGR1C.squeeze(-2), k_BGLC.transpose(-1, -2))
        weights_BGRL = torch.softmax(scores_BGRL.masked_fill(~mask_B11L, float("-inf")), dim=-1)
        weighted_BGRLC = weights_BGRL.unsqueeze(-1) * v_BGLC.unsqueeze(2)
        y_BGRC = torch.where(mask_B11L.unsqueeze(-1), weighted_BGRLC, 0.0).sum(-2)
        y_BNC = y_BGRC.reshape(rows, heads, width).to(q_BNTC.dtype)
        return y_BNC.transpose(0, 1).unsqueeze(0)


def decode_logits(
    model: MoETransformer,
    k_caches: list[Tensor],
    v_caches: list[Tensor],
    inputs_4B: Tensor,
    kv_len: int,
    with_tasks: bool,
) -> tuple[Tensor, list[Tensor]]:
    """The model on one decode row per sequence -> (logits_BV, the experts each MoE layer
    chose for each row, [B, K] per layer). `inputs_4B` (int64): rows of token, position,
    slot and task id; attention reads `kv_len` positions."""
    tokens_B, positions_B, slots_B, tasks_B = inputs_4B.unbind(0)
    caches: list[Any] = [
        StaticDecodeAttention(k, v, slots_B, positions_B, kv_len)
        for k, v in zip(k_caches, v_caches)
    ]
    tasks_1B = tasks_B.unsqueeze(0) if with_tasks else None
    logits_BV = model(tokens_B.unsqueeze(0), tasks_1B, caches).logits_BTV[0]
    # Returned, not read from the layers afterwards: a CUDA graph replay runs no Python.
    experts = [layer.last_expert_ids_TK for _, layer in model.moe_layers()]
    return logits_BV, [ids for ids in experts if ids is not None]


@dataclass
class BucketReport:
    """One bucket's compilation: graphs handed to the backend (1 at EP=1; more where
    the all-to-all splits the step), their compile seconds, the wall time of the call
    that compiled (dynamo's tracing included); its calls and the live rows they held
    (the rest of calls x batch were padding)."""

    batch: int
    kv_len: int
    graphs: int = 0
    compile_s: float = 0.0
    first_call_s: float = 0.0
    calls: int = 0
    rows: int = 0
    direct_calls: int = 0  # calls of the graph without dynamo (`CompiledDecoder._direct`)
    cuda_graph: bool = False


@dataclass
class _Direct:
    """A bucket's compiled graph called without dynamo: the graph's inputs as dynamo
    passed them at its first call (the same tensors every call: parameters, the KV
    caches, the bucket's static buffer), and where the step's logits and experts sit
    among the graph's outputs."""

    graph: Any
    args: tuple[Any, ...]
    logits: int
    experts: list[int]

    def __call__(self) -> tuple[Tensor, list[Tensor]]:
        outputs = self.graph(*self.args)
        return outputs[self.logits], [outputs[i] for i in self.experts]


@dataclass
class _Bucket:
    inputs_4B: Tensor  # token, position, slot, task id of each row (shared by a batch)
    report: BucketReport
    compiled: bool = False
    graph: Any = None  # torch.cuda.CUDAGraph when captured
    graph_outputs: tuple[Tensor, list[Tensor]] | None = None
    direct: _Direct | None = None
    first_run: tuple[Any, tuple[Any, ...], Any] | None = None  # (graph, its args, outputs)


class CompiledDecoder:
    """The compiled decode step of `model` over the KV tensors `k_caches`/`v_caches`
    ([S, G, L, C] per block; slot `pad_slot` is reserved for padding rows). `pad_task`:
    the task id padding rows carry (one the router accepts). Task ids reach the model
    when its router reads them."""

    def __init__(
        self,
        model: MoETransformer,
        k_caches: list[Tensor],
        v_caches: list[Tensor],
        *,
        max_batch: int,
        pad_slot: int,
        pad_task: int = 0,
        options: DecodeCompileOptions | None = None,
    ) -> None:
        self.options = options or DecodeCompileOptions()
        self.model = model
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.pad_slot = pad_slot
        self.pad_task = pad_task
        self.with_tasks = model.routing is not None and model.routing.needs_task_ids
        self.device = k_caches[0].device
        self.buckets = bucket_ladder(max_batch, self.options.buckets)
        window = k_caches[0].shape[2]
        self.kv_lengths = (*[n for n in self.options.kv_lengths if n < window], window)
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        for batch in self.buckets:
            inputs_4B = torch.zeros((4, batch), dtype=torch.int64, device=self.device)
            for kv_len in self.kv_lengths:
                self._buckets[batch, kv_len] = _Bucket(inputs_4B, BucketReport(batch, kv_len))
        # At EP=1 the step is one graph and a graph break is an error; under EP the
        # all-to-all runs eagerly between graphs (and CUDA graphs cannot hold it).
        exchanges = any(layer.dispatcher.exchanges_rows for _, layer in model.moe_layers())
        self.fullgraph = not exchanges
        self.use_cuda_graphs = (
            self.options.cuda_graphs and self.device.type == "cuda" and not exchanges
        )
        self.use_cpp_wrapper = (
            self.options.cpp_wrapper
            and self.options.backend == "inductor"
            and self.device.type == "cpu"
        )
        self._compiling: _Bucket | None = None
        self._compiled = torch.compile(
            decode_logits, backend=self._backend, dynamic=False, fullgraph=self.fullgraph
        )
        # Dynamo keeps one cache entry per (model, bucket) for the one code object of
        # `decode_logits`; its default limit (8) would fall back to eager silently.
        self._recompile_limit = 8 * len(self._buckets) + 64

    # --- compilation -------------------------------------------------------------------

    def _backend(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._dynamo import lookup_backend
        from torch._inductor.compile_fx import compile_fx

        backend = self.options.backend
        started = time.perf_counter()
        if backend == "inductor":
            patches = {"cpp_wrapper": True} if self.use_cpp_wrapper else None
            compiled: Any = compile_fx(graph, example_inputs, config_patches=patches)
        else:
            compiled = lookup_backend(backend)(graph, example_inputs)
        entry = self._compiling
        if entry is None:
            return compiled
        entry.report.graphs += 1
        entry.report.compile_s += time.perf_counter() - started

        def first_run(*args: Any) -> Any:
            outputs = compiled(*args)
            if entry.first_run is None:
                entry.first_run = (compiled, args, outputs)
            return outputs

        return first_run

    def warm(self) -> None:
        """Compile (and on CUDA capture) every bucket now, with padding rows only."""
        for batch, kv_len in self._buckets:
            self.run([], [], [], None, bucket=batch, kv_len=kv_len)

    def report(self) -> dict[str, Any]:
        """Compilations per bucket and in all: `compiled_buckets` the batch sizes whose
        graphs exist (compiled here, or found in dynamo's cache: a decoder built before
        over the same model and shapes compiled them), `compilations` the buckets that
        compiled here, `graphs` what the backend compiled (one per bucket at EP=1)."""
        used = [b.report for b in self._buckets.values() if b.compiled]
        return {
            "buckets": list(self.buckets),
            "kv_lengths": list(self.kv_lengths),
            "compiled_buckets": [r.batch for r in used],  # kv_len: see per_bucket
            "compilations": sum(1 for r in used if r.graphs),
            "graphs": sum(r.graphs for r in used),
            "compile_s": sum(r.compile_s for r in used),
            "first_calls_s": sum(r.first_call_s for r in used),
            "per_bucket": [vars(r).copy() for r in used],
            "backend": self.options.backend,
            "expert_layout": self.options.expert_layout.value,
            "cuda_graphs": self.use_cuda_graphs,
            "cpp_wrapper": self.use_cpp_wrapper,
        }

    # --- the step ------------------------------------------------------------------------

    def bucket_for(self, rows: int, positions: int = 1) -> tuple[int, int]:
        """The smallest bucket holding `rows` rows that read `positions` positions."""
        index = bisect.bisect_left(self.buckets, rows)
        if index == len(self.buckets):
            raise ValueError(f"{rows} decode rows exceed the largest bucket {self.buckets[-1]}")
        kv_index = bisect.bisect_left(self.kv_lengths, positions)
        if kv_index == len(self.kv_lengths):
            raise ValueError(f"position {positions - 1} is outside the cache's window")
        return self.buckets[index], self.kv_lengths[kv_index]

    def padding(self, rows: int) -> list[list[int]]:
        """The token, position, slot and task columns of `rows` padding rows."""
        return [[0] * rows, [0] * rows, [self.pad_slot] * rows, [self.pad_task] * rows]

    def _fill(self, entry: _Bucket, columns: list[list[int]]) -> None:
        """Write the live rows, then padding rows, into the bucket's static buffers."""
        padding = self.padding(entry.report.batch - len(columns[0]))
        values = [column + pad for column, pad in zip(columns, padding, strict=True)]
        entry.inputs_4B.copy_(torch.tensor(values, dtype=torch.int64), non_blocking=True)

    @torch.no_grad()
    def run(
        self,
        tokens: list[int],
        positions: list[int],
        slots: list[int],
        tasks: list[int] | None,
        bucket: int | None = None,
        kv_len: int | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """(logits [n, V], per MoE layer the experts chosen [n, K]) of n rows: token
        `tokens[i]` at `positions[i]` of slot `slots[i]` (its key and value are stored
        there) for task `tasks[i]` (None or ignored when the model reads no task ids).
        `bucket`, `kv_len`: pad to these (default the smallest that hold the rows)."""
        rows = len(tokens)
        chosen = self.bucket_for(rows, max(positions, default=0) + 1)
        entry = self._buckets[bucket or chosen[0], kv_len or chosen[1]]
        if not self.with_tasks or tasks is None:
            tasks = [self.pad_task] * rows
        self._fill(entry, [list(tokens), list(positions), list(slots), list(tasks)])
        entry.report.calls += 1
        entry.report.rows += rows
        if entry.graph is not None:
            entry.graph.replay()
            assert entry.graph_outputs is not None
            logits_BV, experts = entry.graph_outputs
            return logits_BV[:rows].clone(), [ids[:rows].clone() for ids in experts]
        if entry.direct is not None:
            entry.report.direct_calls += 1
            logits_BV, experts = entry.direct()
            return logits_BV[:rows], [ids[:rows] for ids in experts]
        logits_BV, experts = self._call(entry)
        if self.use_cuda_graphs:
            self._capture(entry)
        return logits_BV[:rows], [ids[:rows] for ids in experts]

    @torch.no_grad()
    def _call(self, entry: _Bucket) -> tuple[Tensor, list[Tensor]]:
        first = not entry.compiled
        if first:
            self._compiling = entry
        started = time.perf_counter()
        limit = self._recompile_limit
        # The raised limit matters only when a bucket compiles (later calls find their
        # graph); the patch costs ~30 us, a tenth of a compiled demo step.
        patch = contextlib.nullcontext()
        if first:
            patch = torch._dynamo.config.patch(  # type: ignore[assignment]
                recompile_limit=limit, accumulated_recompile_limit=limit
            )
        try:
            with patch, self.model.expert_layout(self.options.expert_layout):
                outputs = self._compiled(
                    self.model, self.k_caches, self.v_caches, entry.inputs_4B,
                    entry.report.kv_len, self.with_tasks,
                )  # fmt: skip
        finally:
            self._compiling = None
        if first:
            entry.compiled = True
            entry.report.first_call_s = time.perf_counter() - started
            entry.direct = self._direct(entry, outputs)
        return outputs

    def _direct(self, entry: _Bucket, outputs: tuple[Tensor, list[Tensor]]) -> _Direct | None:
        """The bucket's graph as a direct call, once its first call showed where the
        step's outputs sit among the graph's; None where that cannot be relied on: not
        one graph (expert parallel), a CUDA graph to capture, the graph not compiled
        here (found in dynamo's cache), an output the graph did not return as is.

        Dynamo's guards are what a direct call skips (about 0.4 ms of a 3.7 ms compiled
        step at batch 32 on the demo model): they check that the model, its parameters
        and the buffers are the ones the graph was traced with. The decoder calls its
        graphs with nothing else: its static buffers, the model it was built over, in
        the layout it set. Python side effects of the traced code (the MoE layers'
        `last_stats`) do not run, as in a CUDA graph replay: the step's routed experts
        are outputs of the graph."""
        first_run, entry.first_run = entry.first_run, None
        if first_run is None or not self.fullgraph or self.use_cuda_graphs:
            return None
        graph, args, raw = first_run
        raw = list(raw) if isinstance(raw, (tuple, list)) else [raw]
        logits_BV, experts = outputs

        def index(tensor: Tensor) -> int | None:
            return next((i for i, t in enumerate(raw) if t is tensor), None)

        where = [index(logits_BV), *(index(ids) for ids in experts)]
        if any(i is None for i in where):
            return None
        return _Direct(graph, args, cast(int, where[0]), [cast(int, i) for i in where[1:]])

    def _capture(self, entry: _Bucket) -> None:
        """Capture the bucket's compiled step as a CUDA graph over its static buffers,
        after the warm-up calls capture needs (on a side stream). The calls rewrite the
        keys and values the step just stored, with the same values."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._call(entry)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            entry.graph_outputs = self._call(entry)
        entry.graph = graph
        entry.report.cuda_graph = True
