"""Chunked prefill (`InferenceEngine(chunked_prefill=True)`, the default): prompts longer
than a step's token budget are prefilled in chunks beside the running decodes.

The oracle is the model's full forward over the whole context for every new token
(`greedy_by_recomputation`), which shares no code with the engine's cache or scheduler.
"""

from __future__ import annotations

import pytest
import torch
from test_inference_engine import greedy_by_recomputation, prompts, sharp_model

from moe.inference import InferenceEngine, SamplingParams

torch.set_num_threads(1)


def test_chunked_prompts_generate_what_the_full_forward_does() -> None:
    model = sharp_model(31, max_seq_len=64)
    texts = [bytes(range(65, 65 + n)) for n in (23, 9, 40)] + prompts(3, seed=31)
    engine = InferenceEngine(model, max_batch=3, max_step_tokens=5)
    ids = [engine.submit(t, SamplingParams(max_tokens=8, temperature=0)) for t in texts]
    done = {c.request_id: bytes(c.token_ids) for c in engine.run()}
    engine.restore()
    for request_id, text in zip(ids, texts):
        assert done[request_id] == greedy_by_recomputation(model, text, 8)


def test_running_decodes_do_not_stall_while_a_long_prompt_prefills() -> None:
    """3 sequences decode; a 40-token prompt arrives. With a budget of 3 + 4 tokens per
    step it is prefilled 4 tokens at a time while every running sequence gets a token
    at every step; its own first token comes after the 10th chunk."""
    model = sharp_model(32, max_seq_len=64)
    engine = InferenceEngine(model, max_batch=4, max_step_tokens=7)
    params = SamplingParams(max_tokens=30, temperature=0)
    running = [engine.submit(t, params) for t in (b"ab", b"cd", b"ef")]
    engine.step()  # the three prompts, whole (6 tokens)
    long_prompt = bytes(range(60, 100))
    long_id = engine.submit(long_prompt, SamplingParams(max_tokens=5, temperature=0))
    for step in range(10):
        events = {e.request_id for e in engine.step()}
        assert set(running) <= events, f"a running sequence stalled at step {step}"
        assert (long_id in events) == (step == 9)
    done = {c.request_id: bytes(c.token_ids) for c in engine.run()}
    engine.restore()
    assert done[long_id] == greedy_by_recomputation(model, long_prompt, 5)


def test_without_chunking_a_prompt_waits_until_it_fits_whole() -> None:
    model = sharp_model(33, max_seq_len=16)
    with pytest.raises(ValueError, match=r"max_step_tokens=8 is too small.*max_len=16"):
        InferenceEngine(model, max_step_tokens=8, chunked_prefill=False)
    # A shorter context (max_len) is what a whole prompt must fit.
    InferenceEngine(model, max_step_tokens=8, chunked_prefill=False, max_len=8).restore()
    engine = InferenceEngine(model, max_batch=2, max_step_tokens=16, chunked_prefill=False)
    first = engine.submit(b"x" * 10, SamplingParams(max_tokens=3, temperature=0))
    second = engine.submit(b"y" * 10, SamplingParams(max_tokens=3, temperature=0))
    assert [e.request_id for e in engine.step()] == [first]  # 10 + 10 > 16: one prompt
    assert {e.request_id for e in engine.step()} == {first, second}
    engine.restore()
