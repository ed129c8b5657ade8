"""The compiled decode step (`moe.inference.decode`, `InferenceEngine(compile=True)`).

- The padded expert layout equals the per-token reference (`moe.reference`) for every
  router kind, a task subset and int8 experts.
- The decode step traces as one graph, no break (`torch._dynamo.explain`), for every
  router kind, PR-MoE, a subset and int8 experts, in both expert layouts.
- With inductor: the compiled step's logits are within 1e-5 of the eager packed call's,
  step after step with rows of every bucket in shuffled slots; padding rows whose inputs
  and cache slot hold extreme values (NaN keys, the last position, the largest token)
  change no live row's logits or keys; compiled greedy text equals eager greedy text with
  requests joining and leaving mid-run, each bucket used.
- Compilations equal the buckets used (lazy warm-up), and none happen again.
- A bf16 model: the compiled step is as close to the fp32 model as the eager bf16 step.
- The options of imported HF models (separate head_dim, biases, q/k norm, clip_qkv, a
  gated shared expert, a dense block, SwiGLU) trace as one graph and compile to the
  eager logits, with a KV window (`max_len`) below the model's.

The eager references here are the engine's own eager path, itself tested against a full
recomputation of every sequence (tests/test_inference_engine.py).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_inference_engine import DROPLESS, prompts, sharp_model

from launch.training.compile import use_cache_dir
from moe.inference import InferenceEngine, SamplingParams, Segment
from moe.inference.decode import CompiledDecoder, DecodeCompileOptions, decode_logits
from moe.inference.quant import quantize_experts
from moe.inference.runner import ModelRunner
from moe.inference.subset import build_subset_model
from moe.layer import ExpertLayout
from moe.reference import reference_layer_output
from moe.transformer import MoETransformer
from routing import RoutingConfig

torch.set_num_threads(1)

# One inductor cache for every run of these tests on the machine (as tests/test_compile.py).
CACHE_DIR = Path(tempfile.gettempdir()) / "moe-test-inductor-cache"

ROUTINGS = {
    "topk": RoutingConfig(capacity="dropless"),
    "topk_fixed": RoutingConfig(capacity="fixed", capacity_factor=1.0),  # overridden dropless
    "sigma": RoutingConfig(router="sigma", capacity="dropless", normalize_weights=False),
    "task": RoutingConfig(router="task", capacity="dropless", num_tasks=3),
    "dynamic": RoutingConfig(capacity="dynamic"),
}


def variant_model(kind: str) -> MoETransformer:
    """A small model of `kind`: a routing of ROUTINGS, `prmoe` (residual MLP), `subset`
    (experts 1 and 3 of each layer), `int8` (int8 experts)."""
    if kind in ROUTINGS:
        return sharp_model(7, ROUTINGS[kind])
    if kind == "prmoe":
        return sharp_model(7, residual_mlp=True)
    if kind == "subset":
        full = sharp_model(7, ROUTINGS["task"])
        return build_subset_model(full, {b: [1, 3] for b, _ in full.moe_layers()})
    assert kind == "int8"
    model = sharp_model(7)
    quantize_experts(model)
    return model


def decode_inputs(model: MoETransformer, rows: int) -> tuple[list, list, torch.Tensor]:
    config = model.config
    shape = (rows + 1, config.n_kv_heads, config.max_seq_len, config.head_dim)
    k = [torch.randn(shape) for _ in model.blocks]
    v = [torch.randn(shape) for _ in model.blocks]
    inputs_4B = torch.stack([
        torch.randint(0, 256, (rows,)), torch.randint(0, 10, (rows,)), torch.arange(rows),
        torch.randint(0, 3, (rows,)),
    ])  # fmt: skip
    return k, v, inputs_4B


@pytest.mark.parametrize("kind", [*ROUTINGS, "prmoe", "subset", "int8"])
def test_padded_layout_equals_the_per_token_reference(kind: str) -> None:
    model = variant_model(kind)
    torch.manual_seed(1)
    x_TD = torch.randn(6, model.config.d_model)
    tasks_T = torch.tensor([0, 1, 2, 0, 1, 2])
    with model.capacity_override("dropless"), torch.no_grad():
        for _, layer in model.moe_layers():
            plan = layer.route(x_TD, tasks_T)
            want = reference_layer_output(layer, x_TD, plan)
            compact = layer(x_TD, tasks_T).y
            with model.expert_layout(ExpertLayout.PADDED):
                padded = layer(x_TD, tasks_T).y
            torch.testing.assert_close(padded, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(compact, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(ExpertLayout))
@pytest.mark.parametrize("kind", [*ROUTINGS, "prmoe", "subset", "int8"])
def test_the_decode_step_traces_as_one_graph(kind: str, layout: ExpertLayout) -> None:
    model = variant_model(kind)
    k, v, inputs_4B = decode_inputs(model, 3)
    with_tasks = model.routing is not None and model.routing.needs_task_ids
    torch._dynamo.reset()
    with model.capacity_override("dropless"), model.expert_layout(layout), torch.no_grad():
        window = model.config.max_seq_len
        explanation = torch._dynamo.explain(decode_logits)(
            model, k, v, inputs_4B, window, with_tasks
        )
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [
        reason.reason for reason in explanation.break_reasons
    ]


# --- inductor ----------------------------------------------------------------------------

MAX_BATCH = 4
BUCKETS = (1, 2, 4)


@pytest.fixture(scope="module")
def inductor_model() -> Iterator[MoETransformer]:
    use_cache_dir(CACHE_DIR)
    model = sharp_model(11)
    with model.capacity_override("dropless"):
        yield model


def runner_pair(
    model: MoETransformer, warmup: str = "lazy"
) -> tuple[ModelRunner, ModelRunner, CompiledDecoder]:
    """An eager runner and a compiled one (inductor), each with its own cache."""
    options = DecodeCompileOptions(buckets=BUCKETS, warmup=warmup)
    eager = ModelRunner(model, max_batch=MAX_BATCH)
    compiled = ModelRunner(model, max_batch=MAX_BATCH, compile=True, compile_options=options)
    assert compiled.decoder is not None
    return eager, compiled, compiled.decoder


def decode_and_compare(
    model: MoETransformer, poison: bool, warmup: str = "lazy"
) -> CompiledDecoder:
    """Prefill 4 sequences in shuffled slots on both runners, then decode greedily with
    the live rows shrinking 4 -> 3 -> 2 -> 1 (every bucket); compare the logits of every
    step (and, with `poison`, keep the padding extreme)."""
    eager, compiled, decoder = runner_pair(model, warmup)
    compiled.warm_up(eager=False)
    if poison:
        pad = decoder.pad_slot
        for k, v in zip(compiled.cache.k_SGLC, compiled.cache.v_SGLC):
            k[pad].fill_(float("nan"))
            v[pad].fill_(1e30)
        last = model.config.max_seq_len - 1
        padding = decoder.padding

        def extreme(rows: int) -> list[list[int]]:
            _, _, pad_slots, pad_tasks = padding(rows)
            return [[255] * rows, [last] * rows, pad_slots, pad_tasks]

        decoder.padding = extreme  # type: ignore[method-assign]
    slots = [2, 0, 3, 1]
    texts = [list(p) for p in prompts(4, seed=4)]
    segments = [Segment(s, 0, len(t)) for s, t in zip(slots, texts)]
    logits_e = eager.run(segments, texts, [None] * 4).last_SV
    compiled.run(segments, texts, [None] * 4)  # prefill is eager in both
    next_tokens = logits_e.argmax(-1).tolist()
    lengths = [len(t) for t in texts]
    live = [0, 1, 2, 3]
    for step in range(8):
        if step in (2, 4, 6):
            live = live[1:]  # a sequence leaves
        segments = [Segment(slots[i], lengths[i], 1) for i in live]
        tokens = [[next_tokens[i]] for i in live]
        want = eager.run(segments, tokens, [None] * len(live)).last_SV
        got = compiled.run(segments, tokens, [None] * len(live)).last_SV
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for row, i in enumerate(live):
            lengths[i] += 1
            next_tokens[i] = int(want[row].argmax())
    # Every position of every live slot (both caches start at zero): nothing but the
    # sequences' own tokens was written there.
    for k_e, k_c in zip(eager.cache.k_SGLC, compiled.cache.k_SGLC):
        torch.testing.assert_close(k_c[slots], k_e[slots], atol=1e-5, rtol=0)
    return decoder


def test_compiled_logits_within_1e5_of_eager_at_every_bucket(
    inductor_model: MoETransformer,
) -> None:
    decoder = decode_and_compare(inductor_model, poison=False)
    report = decoder.report()
    assert report["compiled_buckets"] == list(BUCKETS)
    assert all(r["calls"] > 0 for r in report["per_bucket"])
    # Every decode step after the warm-up called its bucket's graph directly (no guards).
    assert all(r["direct_calls"] == r["calls"] - 1 for r in report["per_bucket"]), report


def test_padding_rows_never_leak(inductor_model: MoETransformer) -> None:
    """NaN keys and huge values in the padding slot, padding rows at the last position
    with the largest token: live logits and keys as eager's."""
    decode_and_compare(inductor_model, poison=True)


def test_compiled_greedy_text_equals_eager(inductor_model: MoETransformer) -> None:
    texts = prompts(7, seed=12)
    options = DecodeCompileOptions(buckets=BUCKETS, warmup="lazy")

    def run(compile: bool) -> tuple[dict[int, tuple[int, ...]], dict | None]:
        # A budget of 6 tokens a step: prompts are prefilled in chunks beside the decodes.
        engine = InferenceEngine(inductor_model, max_batch=MAX_BATCH, max_step_tokens=6,
                                 compile=compile, compile_options=options, warmup=False)  # fmt: skip
        for i, text in enumerate(texts[:5]):
            engine.submit(text, SamplingParams(max_tokens=3 + 2 * i, temperature=0))
        done: dict[int, tuple[int, ...]] = {}
        steps = 0
        while engine.has_work():
            if steps == 4:  # two more join mid-run
                for text in texts[5:]:
                    engine.submit(text, SamplingParams(max_tokens=6, temperature=0))
            for event in engine.step():
                if event.completion is not None:
                    done[event.request_id] = event.completion.token_ids
            steps += 1
        engine.restore()
        return done, engine.compile_report()

    eager, _ = run(False)
    compiled, report = run(True)
    assert compiled == eager
    assert len(set(eager.values())) > 1
    assert report is not None
    calls = {r["batch"]: (r["calls"], r["rows"]) for r in report["per_bucket"]}
    assert sorted(calls) == list(BUCKETS)
    assert calls[4][1] < 4 * calls[4][0]  # some steps of 3 rows padded to 4


def test_compilations_equal_the_buckets_used() -> None:
    """Lazy warm-up: only the buckets a run needs compile, once each (aot_eager: the
    counting is the backend's, whatever it is)."""
    config = dataclasses.replace(sharp_model(13).config, d_model=24, n_heads=2, n_kv_heads=1)
    model = MoETransformer(config, DROPLESS, seed=13).eval()  # a fresh shape: nothing cached
    options = DecodeCompileOptions(buckets=(1, 2, 4, 8), warmup="lazy", backend="aot_eager")
    engine = InferenceEngine(model, max_batch=8, compile=True, compile_options=options,
                             warmup=False)  # fmt: skip
    # Prompts of 2+ tokens are prefilled eagerly; then 3 rows decode together (bucket 4).
    for text in (b"abc", b"hello", b"xy"):
        engine.submit(text, SamplingParams(max_tokens=4, temperature=0))
    list(engine.run())
    report = engine.compile_report()
    assert report is not None
    assert report["compiled_buckets"] == [4]
    assert report["compilations"] == report["graphs"] == 1
    for length, text in zip((3, 5), (b"And", b"Blessed")):
        engine.submit(text, SamplingParams(max_tokens=length, temperature=0))
    list(engine.run())  # 2 rows, then 1: two more buckets
    report = engine.compile_report()
    assert report is not None
    assert report["compiled_buckets"] == [1, 2, 4]
    assert report["compilations"] == report["graphs"] == 3
    engine.restore()


def test_compile_needs_dropless_routing() -> None:
    with pytest.raises(ValueError, match="compile=True needs routing=dropless"):
        InferenceEngine(sharp_model(1), compile=True, routing="trained", warmup=False)


def test_a_kv_length_ladder_reads_the_smallest_window_that_holds_the_rows() -> None:
    """kv_lengths=(8, 16) in a 32-position window: each step reads the smallest of 8,
    16, 32 holding its rows' positions, and gives the eager logits (aot_eager: what is
    checked is which positions the step reads)."""
    model = sharp_model(14)
    options = DecodeCompileOptions(buckets=(1, 2), kv_lengths=(8, 16), backend="aot_eager",
                                   warmup="lazy")  # fmt: skip
    eager = ModelRunner(model, max_batch=2)
    compiled = ModelRunner(model, max_batch=2, compile=True, compile_options=options)
    assert compiled.decoder is not None
    texts = [list(b"abcd"), list(b"0123456789")]
    segments = [Segment(0, 0, 4), Segment(1, 0, 10)]
    for runner in (eager, compiled):
        runner.run(segments, texts, [None, None])
    lengths, token = [4, 10], [5, 6]
    for step in range(12):
        live = [0] if step < 3 else [0, 1]  # slot 0 alone up to position 6, then both
        segments = [Segment(i, lengths[i], 1) for i in live]
        tokens = [[token[i]] for i in live]
        want = eager.run(segments, tokens, [None] * len(live)).last_SV
        got = compiled.run(segments, tokens, [None] * len(live)).last_SV
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for i in live:
            lengths[i] += 1
    used = {(r["batch"], r["kv_len"]) for r in compiled.decoder.report()["per_bucket"]}
    assert used == {(1, 8), (2, 16), (2, 32)}


def test_bf16_compiled_decode_is_as_close_to_fp32_as_eager_bf16() -> None:
    """A bf16 model (parameters and KV cache in bf16): the compiled step's logits (inductor)
    are no further from the fp32 model's than the eager bf16 step's are (within 2x, plus
    one bf16 step of the logits' scale), and choose the same greedy tokens; one bucket
    (4 rows, then 3 and a padding row: one compile)."""
    use_cache_dir(CACHE_DIR)
    reference = sharp_model(11)
    model = sharp_model(11).to(torch.bfloat16)
    options = DecodeCompileOptions(buckets=(4,), warmup="lazy")
    with reference.capacity_override("dropless"), model.capacity_override("dropless"):
        fp32 = ModelRunner(reference, max_batch=4)
        eager = ModelRunner(model, max_batch=4)
        compiled = ModelRunner(model, max_batch=4, compile=True, compile_options=options)
        assert compiled.cache.k_SGLC[0].dtype == torch.bfloat16
        slots = [2, 0, 3, 1]
        texts = [list(p) for p in prompts(4, seed=4)]
        segments = [Segment(s, 0, len(t)) for s, t in zip(slots, texts)]
        for runner in (fp32, eager, compiled):
            runner.run(segments, texts, [None] * 4)
        next_tokens = [len(t) % 97 + 32 for t in texts]
        lengths = [len(t) for t in texts]
        live = [0, 1, 2, 3]
        for step in range(4):
            if step == 2:
                live = live[1:]
            segments = [Segment(slots[i], lengths[i], 1) for i in live]
            tokens = [[next_tokens[i]] for i in live]
            want = fp32.run(segments, tokens, [None] * len(live)).last_SV
            plain = eager.run(segments, tokens, [None] * len(live)).last_SV
            got = compiled.run(segments, tokens, [None] * len(live)).last_SV
            assert got.dtype == plain.dtype == torch.float32  # what the sampler reads
            assert torch.isfinite(got).all()
            allowed = 2 * (plain - want).abs().max() + want.abs().max() * 2**-8
            assert (got - want).abs().max() <= allowed
            assert got.argmax(-1).tolist() == plain.argmax(-1).tolist()
            for row, i in enumerate(live):
                lengths[i] += 1
                next_tokens[i] = int(want[row].argmax())
    assert compiled.decoder is not None
    assert compiled.decoder.report()["compiled_buckets"] == [4]


def imported_options_model() -> MoETransformer:
    """A model with the options HF imports bring (`moe.interop.hf_import`): head_dim apart
    from d_model / n_heads, q/k/v and output biases, per-head q/k RMSNorm, clip_qkv, a
    gated shared expert, a dense first block, SwiGLU; biases and norm gains drawn away
    from their 0 and 1 starts so that each of them matters."""
    model = sharp_model(
        17, n_layers=3, head_dim=12, qkv_bias=True, out_bias=True, qk_norm="head",
        clip_qkv=1.5, norm_eps=1e-5, shared_expert_hidden=24, dense_layers=[0],
        activation="swiglu",
    )  # fmt: skip
    generator = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or ("norm" in name and name != "final_norm.weight"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def test_imported_model_options_compile_to_the_eager_logits() -> None:
    """An imported family's options trace as one graph (both layouts) and the compiled
    step (inductor, one bucket: 4 rows, then 3 and a padding row; a KV window of
    `max_len` 24 below the model's 32) gives the eager logits within 1e-5."""
    use_cache_dir(CACHE_DIR)
    model = imported_options_model()
    assert [block for block, _ in model.moe_layers()] == [1, 2]  # block 0 is dense
    k, v, inputs_4B = decode_inputs(model, 3)
    with model.capacity_override("dropless"):
        for layout in ExpertLayout:
            torch._dynamo.reset()
            with model.expert_layout(layout), torch.no_grad():
                explanation = torch._dynamo.explain(decode_logits)(
                    model, k, v, inputs_4B, model.config.max_seq_len, False
                )
            assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [
                reason.reason for reason in explanation.break_reasons
            ]
        options = DecodeCompileOptions(buckets=(4,), warmup="lazy")
        eager = ModelRunner(model, max_batch=4, max_len=24)
        compiled = ModelRunner(model, max_batch=4, max_len=24, compile=True,
                               compile_options=options)  # fmt: skip
        assert compiled.cache.k_SGLC[0].shape[2] == 24
        slots = [2, 0, 3, 1]
        texts = [list(p) for p in prompts(4, seed=5)]
        segments = [Segment(s, 0, len(t)) for s, t in zip(slots, texts)]
        logits = eager.run(segments, texts, [None] * 4).last_SV
        compiled.run(segments, texts, [None] * 4)  # prefill is eager in both
        next_tokens = logits.argmax(-1).tolist()
        lengths = [len(t) for t in texts]
        live = [0, 1, 2, 3]
        for step in range(4):
            if step == 2:
                live = live[1:]
            segments = [Segment(slots[i], lengths[i], 1) for i in live]
            tokens = [[next_tokens[i]] for i in live]
            want = eager.run(segments, tokens, [None] * len(live)).last_SV
            got = compiled.run(segments, tokens, [None] * len(live)).last_SV
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            for row, i in enumerate(live):
                lengths[i] += 1
                next_tokens[i] = int(want[row].argmax())
    assert compiled.decoder is not None
    assert compiled.decoder.report()["compiled_buckets"] == [4]


@pytest.mark.gpu
def test_cuda_graphs_replay_the_compiled_step() -> None:
    """On CUDA every bucket is captured as a CUDA graph at start; the replays give the
    eager logits (the same comparison as on CPU)."""
    use_cache_dir(CACHE_DIR)
    model = sharp_model(11).cuda()
    with model.capacity_override("dropless"):
        decoder = decode_and_compare(model, poison=False, warmup="start")
    report = decoder.report()
    assert report["cuda_graphs"]
    assert [r["cuda_graph"] for r in report["per_bucket"]] == [True] * len(BUCKETS)
