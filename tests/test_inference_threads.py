"""Intra-op threads of engine steps (`moe.inference.threads`): on CPU an eager step of at
most `SERIAL_STEP_TOKENS` tokens (decode) runs the model and the sampler on one thread,
a larger step (prefill) on the caller's threads, which every step restores; the outputs
stay those of the model's plain recomputation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from test_inference_engine import greedy_by_recomputation, sharp_model

import moe.inference.engine as engine_module
from moe.inference import InferenceEngine, SamplingParams
from moe.inference.loading import cast_parameters
from moe.inference.threads import SERIAL_STEP_TOKENS, step_threads


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_step_threads_one_for_small_cpu_steps_and_restored(two_threads: None) -> None:
    cpu = torch.device("cpu")
    with step_threads(SERIAL_STEP_TOKENS, cpu):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with step_threads(SERIAL_STEP_TOKENS + 1, cpu):
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="inside"), step_threads(1, cpu):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    with step_threads(1, cpu, limit=0):
        assert torch.get_num_threads() == 2


def test_serial_step_tokens_off_and_refused_below_zero(two_threads: None) -> None:
    model = sharp_model(32)
    with pytest.raises(ValueError, match="serial_step_tokens=-1"):
        InferenceEngine(model, serial_step_tokens=-1)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    engine = InferenceEngine(model, max_batch=1, serial_step_tokens=0)
    engine.submit(b"abc", SamplingParams(max_tokens=3, temperature=0.0))
    list(engine.run())
    assert seen and set(seen) == {2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_run_on_one_thread_prefill_on_the_callers(
    dtype: torch.dtype, two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = sharp_model(31, max_seq_len=128)
    cast_parameters(model, dtype)
    # Spies: the threads every model call (by its token count) and the sampler ran on.
    model_calls: list[tuple[int, int]] = []
    model.register_forward_pre_hook(
        lambda _, args: model_calls.append((args[0].shape[1], torch.get_num_threads()))
    )
    sampler_threads: list[int] = []
    sample_tokens = engine_module.sample_tokens

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        sampler_threads.append(torch.get_num_threads())
        return sample_tokens(*args, **kwargs)

    monkeypatch.setattr(engine_module, "sample_tokens", spy)
    generator = torch.Generator().manual_seed(4)
    requests = [
        bytes(torch.randint(32, 127, (20,), generator=generator).tolist()) for _ in range(4)
    ]
    engine = InferenceEngine(model, max_batch=4, max_step_tokens=128)
    model_calls.clear()  # the engine's warm-up call
    ids = [engine.submit(p, SamplingParams(max_tokens=6, temperature=0.0)) for p in requests]
    outputs = {c.request_id: bytes(c.token_ids) for c in engine.run()}
    assert torch.get_num_threads() == 2
    assert model_calls[0] == (80, 2)  # the 4 prompts in one prefill
    assert model_calls[1:] and all(call == (4, 1) for call in model_calls[1:]), model_calls
    assert sampler_threads == [2] + [1] * 5
    engine.restore()
    for request_id, prompt in zip(ids, requests):
        assert outputs[request_id] == greedy_by_recomputation(model, prompt, 6), prompt
