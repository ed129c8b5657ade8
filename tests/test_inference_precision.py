"""Inference in bf16 (`load_model(precision=...)`, `launch.generate precision=`,
`serve.precision`): bf16 weights at half the bytes, a bf16 KV cache, sampling from fp32
logits (log-probabilities and prompt scores too), int8 experts with fp32 scales and
bf16 activations, and the engine's cached, packed decoding equal to the same bf16
model's plain recomputation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_inference_engine import (
    DROPLESS,
    _save,
    greedy_by_recomputation,
    prompts,
    sharp_model,
    small_config,
)
from test_inference_logprobs import full_logprobs, model_of

from launch.generate import GenerateConfig, run_generate
from launch.runtime import ProcessInfo
from launch.serving.model_info import describe_model
from moe.inference import InferenceEngine, SamplingParams, generate, load_model
from moe.inference.loading import cast_parameters
from moe.inference.quant import Int8Experts
from moe.transformer import MoETransformer

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bf16_inference")
    _save(sharp_model(21), directory, DROPLESS)
    return directory


def test_bf16_weights_and_cache_half_the_bytes(checkpoint: Path) -> None:
    fp32 = load_model(checkpoint)
    bf16 = load_model(checkpoint, precision="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {BF16}
    assert bf16.precision.precision.value == "bf16"
    assert describe_model(bf16)["weight_bytes"] * 2 == describe_model(fp32)["weight_bytes"]
    engine = InferenceEngine(bf16.model, max_batch=2)
    assert engine.kv_dtype == BF16 and engine.cache.k_SGLC[0].dtype == BF16
    engine.restore()
    # The same model in bf16: next-token logits within bf16 rounding of fp32's.
    tokens = torch.tensor([list(b"In the beginning God")])
    with torch.no_grad():
        want = fp32.model(tokens).logits_BTV
        got = bf16.model(tokens).logits_BTV
    assert got.dtype == BF16
    assert float((got.float() - want).norm() / want.norm()) < 2e-2


def test_bf16_engine_equals_recomputation_of_the_same_model(checkpoint: Path) -> None:
    """Cached, packed, batched decoding in bf16 = full forwards of the bf16 model."""
    model = load_model(checkpoint, precision="bf16").model
    requests = prompts(6, seed=3)
    engine = InferenceEngine(model, max_batch=6)
    ids = [engine.submit(p, SamplingParams(max_tokens=10, temperature=0.0)) for p in requests]
    together = {c.request_id: bytes(c.token_ids) for c in engine.run()}
    engine.restore()
    for request_id, prompt in zip(ids, requests):
        assert together[request_id] == greedy_by_recomputation(model, prompt, 10), prompt


def test_sampling_reads_fp32_logits(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moe.inference.engine as engine_module

    seen: list[torch.dtype] = []
    sample_tokens = engine_module.sample_tokens

    def spy(logits_BV, *args):  # type: ignore[no-untyped-def]
        seen.append(logits_BV.dtype)
        return sample_tokens(logits_BV, *args)

    monkeypatch.setattr(engine_module, "sample_tokens", spy)
    model = load_model(checkpoint, precision="bf16").model
    completion = generate(model, b"And God said", 6, temperature=0.8, seed=1)
    assert len(completion.token_ids) == 6 and set(seen) == {torch.float32}


def test_int8_experts_in_a_bf16_model(checkpoint: Path) -> None:
    """int8 experts keep fp32 scales and compute on bf16 activations; the engine over
    that model equals its own recomputation."""
    loaded = load_model(checkpoint, quantize="int8", precision="bf16")
    experts = [m for m in loaded.model.modules() if isinstance(m, Int8Experts)]
    assert experts
    for module in experts:
        assert module.w1_q_EHD.dtype == torch.int8 and module.w1_scale_EH.dtype == torch.float32
    prompt = b"Let there be light"
    assert bytes(
        generate(loaded.model, prompt, 8, temperature=0.0).token_ids
    ) == greedy_by_recomputation(loaded.model, prompt, 8)


def test_launch_generate_in_bf16(checkpoint: Path) -> None:
    config = GenerateConfig(checkpoint=str(checkpoint), prompt="In the beginning",
                            temperature=0.0, max_tokens=8, precision="bf16")  # type: ignore[arg-type]  # fmt: skip
    (completion,) = run_generate(config, ProcessInfo())
    model = load_model(checkpoint, precision="bf16").model
    assert completion.text == generate(model, b"In the beginning", 8, temperature=0.0).text


def test_bad_inference_precision_is_named(checkpoint: Path) -> None:
    from launch.serve import ServeOptions

    with pytest.raises(ValueError, match=r"precision=fp16 needs CUDA, this run is on cpu"):
        load_model(checkpoint, precision="fp16")
    with pytest.raises(ValueError, match=r"precision='fp8' is not one of: auto, fp32, bf16, fp16"):
        load_model(checkpoint, precision="fp8")
    with pytest.raises(ValueError, match=r"^precision='fp8' is not one of"):
        GenerateConfig(checkpoint="x", prompt="y", precision="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"serve\.precision='fp8' is not one of"):
        ServeOptions(precision="fp8")


def test_bf16_logprobs_and_prompt_scores_come_from_fp32_logits() -> None:
    """A bf16 model's reported log-probabilities (sampled tokens with penalties, their
    alternatives, an echoed prompt) are log-softmax of its own full forward's logits
    taken in fp64, up to the engine's bf16 noise (packing, the cache), several times
    closer on average than log-softmax taken in bf16, and none is a bf16 value."""
    model = model_of(1)
    cast_parameters(model, BF16)
    engine = InferenceEngine(model, max_batch=4)
    params = dict(max_tokens=6, temperature=1.0, logprobs=3, prompt_logprobs=2,
                  presence_penalty=0.5, frequency_penalty=0.3)  # fmt: skip
    texts = {
        engine.submit(p, SamplingParams(seed=i, **params)): p  # type: ignore[arg-type]
        for i, p in enumerate(prompts(4, seed=2))
    }
    reported: list[tuple[float, float, float]] = []  # (engine, fp64 and bf16 log-softmax)
    for completion in engine.run():
        prompt = list(texts[completion.request_id])
        sampled = [t.id for t in completion.tokens]
        reference = full_logprobs(model, prompt + sampled)
        with torch.no_grad(), model.capacity_override("dropless"):
            logits_TV = model(torch.tensor([prompt + sampled])).logits_BTV[0]
        in_bf16 = torch.log_softmax(logits_TV, dim=-1)
        assert in_bf16.dtype == BF16
        scores: list[tuple[float, int, int]] = []  # (reported, position, token)
        for i, token in enumerate(completion.tokens):
            assert token.logprob is not None
            position = len(prompt) - 1 + i
            scores.append((token.logprob.logprob, position, token.id))
            scores += [(value, position, other) for other, value in token.logprob.top]
        assert completion.prompt_logprobs is not None
        for t, score in enumerate(completion.prompt_logprobs):
            scores.append((score.logprob, t, prompt[t + 1]))
        reported += [
            (value, float(reference[p, token]), float(in_bf16[p, token]))
            for value, p, token in scores
        ]
    assert len(reported) > 50
    engine_error = np.mean([abs(value - want) for value, want, _ in reported])
    bf16_error = np.mean([abs(bf16 - want) for _, want, bf16 in reported])
    assert engine_error < 0.5 * bf16_error, (engine_error, bf16_error)
    for value, want, _ in reported:
        assert math.isclose(value, want, abs_tol=2e-2), (value, want)
        assert float(torch.tensor(value).to(BF16)) != value  # computed past bf16's 8 bits


def test_bf16_telemetry_counts_every_routed_slot() -> None:
    """In a bf16 model the telemetry's tokens per expert are whole counts of what the
    tokens report they were routed to: one-byte prompts, so every position the model
    read produced a generated token whose `experts` name its routing. Enough tokens that
    a count accumulated in bf16 (8 significant bits) would have been rounded."""
    model = MoETransformer(small_config(max_seq_len=160), DROPLESS, seed=4).eval()
    cast_parameters(model, BF16)
    engine = InferenceEngine(model, max_batch=4)
    engine.take_telemetry()
    params = SamplingParams(max_tokens=150, temperature=1.0, seed=3, routed_experts=True)
    for prompt in (b"a", b"Z", b"~", b"0"):
        engine.submit(prompt, params)
    blocks = [block for block, _ in model.moe_layers()]
    counts = {block: [0] * 4 for block in blocks}
    for completion in engine.run():
        for token in completion.tokens:
            assert token.experts is not None
            for block, chosen in zip(blocks, token.experts):
                for expert in chosen:
                    counts[block][expert] += 1
    telemetry = engine.take_telemetry()
    assert telemetry.model_tokens == 4 * 150  # each prompt byte and 149 generated ones read
    assert max(max(row) for row in counts.values()) > 256
    assert telemetry.expert_tokens == counts
    assert all(telemetry.dropped_slots[block] == 0 for block in blocks)
