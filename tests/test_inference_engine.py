"""The inference engine: cached = recomputed, batched = alone, iteration-level
scheduling, sampling, stop strings, bad input, and the launch.generate entry point.

The oracle of every equality is the model's plain full forward over the whole sequence
(no cache, no packing), with greedy or seeded choices made here, token by token.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from moe.checkpoint import save_checkpoint
from moe.config import ModelConfig
from moe.inference import (
    InferenceEngine,
    SamplingParams,
    Segment,
    SlotKVCache,
    generate,
    load_model,
)
from moe.inference.sampling import filtered_probs, sample_tokens
from moe.transformer import MoETransformer
from routing import CapacityKind, RoutingConfig

torch.set_num_threads(1)

DROPLESS = RoutingConfig(capacity="dropless")


def small_config(**overrides: object) -> ModelConfig:
    base: dict = dict(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, ffn_hidden=48,
        expert_hidden=16, num_experts=4, moe_every=1,
    )  # fmt: skip
    base.update(overrides)
    return ModelConfig(**base)


def sharp_model(
    seed: int, routing: RoutingConfig = DROPLESS, **overrides: object
) -> MoETransformer:
    """A random model with large output logits, so greedy choices have clear margins."""
    model = MoETransformer(small_config(**overrides), routing, seed=seed)
    with torch.no_grad():
        model.final_norm.weight.mul_(30.0)
    return model.eval()


def greedy_by_recomputation(model: MoETransformer, prompt: bytes, n: int) -> bytes:
    """The oracle: full forward over the whole context for every new token."""
    context = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits_V = model(torch.tensor([context])).logits_BTV[0, -1]
            context.append(int(logits_V.argmax()))
    return bytes(context[len(prompt) :])


def prompts(count: int, seed: int = 0) -> list[bytes]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (count,), generator=generator).tolist()
    return [bytes(torch.randint(32, 127, (n,), generator=generator).tolist()) for n in lengths]


def test_packed_cache_logits_equal_full_recomputation() -> None:
    """Several sequences prefilled in one packed call, then decoded together with one
    more joining midway: every step's logits equal a full forward of that sequence."""
    model = sharp_model(1)
    config = model.config
    cache = SlotKVCache(len(model.blocks), 4, config.n_kv_heads, config.max_seq_len,
                        config.head_dim, torch.device("cpu"), torch.float32)  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    sequences = {
        slot: torch.randint(0, 256, (20,), generator=generator).tolist() for slot in (0, 2, 3)
    }
    done = {0: 0, 2: 0, 3: 0}
    plan = [{0: 7, 2: 3}, {0: 1, 2: 1, 3: 9}, {0: 1, 2: 5, 3: 1}, {0: 1, 2: 1, 3: 1}]
    with torch.no_grad():
        for step in plan:
            segments = [Segment(slot, done[slot], count) for slot, count in step.items()]
            tokens = [
                t
                for slot, count in step.items()
                for t in sequences[slot][done[slot] : done[slot] + count]
            ]
            logits = model(torch.tensor([tokens]), None, cache.step(segments)).logits_BTV[0]
            cache.commit(segments)
            offset = 0
            for slot, count in step.items():
                upto = done[slot] + count
                full = model(torch.tensor([sequences[slot][:upto]])).logits_BTV[0, done[slot] :]
                torch.testing.assert_close(
                    logits[offset : offset + count], full, atol=2e-4, rtol=1e-4
                )
                offset += count
                done[slot] = upto


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_greedy_generation_equals_recomputation(kv_heads: int) -> None:
    model = sharp_model(2, n_kv_heads=kv_heads)
    prompt = b"In the beginning"
    completion = generate(model, prompt, 12, temperature=0.0)
    assert bytes(completion.token_ids) == greedy_by_recomputation(model, prompt, 12)
    assert completion.text == bytes(completion.token_ids).decode("utf-8", errors="replace")


def test_generation_past_the_window_reprefills_the_last_half() -> None:
    model = sharp_model(3, max_seq_len=16)
    out = bytes(generate(model, b"abcdefghij", 40, temperature=0.0).token_ids)
    assert len(out) == 40
    # Oracle: slide as the engine documents (full window, then the last half, refilled).
    context, start_new = list(b"abcdefghij"), []
    window = list(context)
    with torch.no_grad():
        for _ in range(40):
            token = int(model(torch.tensor([window])).logits_BTV[0, -1].argmax())
            start_new.append(token)
            window.append(token)
            if len(window) > 16:  # the cache held 16 positions: keep the last 8
                window = window[-8:]
    assert out == bytes(start_new)


def test_batch_of_32_equals_each_request_alone() -> None:
    model = sharp_model(4)
    requests = [
        (p, SamplingParams(max_tokens=8 + i % 7, temperature=0.0 if i % 2 else 0.9,
                           top_k=[0, 5][i % 2], top_p=[1.0, 0.8][i % 3 == 0], seed=i))
        for i, p in enumerate(prompts(32))
    ]  # fmt: skip
    engine = InferenceEngine(model, max_batch=32)
    ids = [engine.submit(p, params) for p, params in requests]
    together = {c.request_id: c.token_ids for c in engine.run()}
    engine.restore()
    for request_id, (prompt, params) in zip(ids, requests):
        alone = InferenceEngine(model, max_batch=1)
        alone.submit(prompt, params)
        (completion,) = list(alone.run())
        assert together[request_id] == completion.token_ids, request_id
    greedy = [i for i, (_, params) in enumerate(requests) if params.temperature == 0]
    for i in greedy[:4]:
        prompt, params = requests[i]
        expected = greedy_by_recomputation(model, prompt, params.max_tokens)
        assert bytes(together[ids[i]]) == expected


def test_finished_sequences_free_their_slot_for_waiting_requests() -> None:
    model = sharp_model(5)
    engine = InferenceEngine(model, max_batch=2)
    long_id = engine.submit(b"long", SamplingParams(max_tokens=12, temperature=0))
    short_id = engine.submit(b"short", SamplingParams(max_tokens=2, temperature=0))
    waiting_id = engine.submit(b"waits", SamplingParams(max_tokens=3, temperature=0))
    finished_at: dict[int, int] = {}
    first_output_at: dict[int, int] = {}
    step = 0
    while engine.has_work():
        step += 1
        for event in engine.step():
            first_output_at.setdefault(event.request_id, step)
            if event.completion is not None:
                finished_at[event.request_id] = step
    assert finished_at[short_id] == 2
    assert first_output_at[waiting_id] == 3  # admitted the step after the slot freed
    assert finished_at[waiting_id] == 5 < finished_at[long_id] == 12


def test_completion_fields_stop_strings_and_streamed_text() -> None:
    model = sharp_model(6)
    free = generate(model, b"The ", 20, temperature=0.0)
    # A stop string of two whole characters of the free text, not at its start.
    start = next(k for k in range(2, len(free.text) - 1) if "\ufffd" not in free.text[k : k + 2])
    stop = free.text[start : start + 2]
    # The stop string is complete after the first prefix of ids whose text holds it.
    ends = next(
        n for n in range(1, 21) if stop in bytes(free.token_ids[:n]).decode("utf-8", "replace")
    )
    engine = InferenceEngine(model)
    request = engine.submit(b"The ", SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))
    streamed = ""
    completion = None
    while engine.has_work():
        for event in engine.step():
            assert event.request_id == request
            streamed += event.new_text
            completion = event.completion or completion
    assert completion is not None and completion.finish_reason == "stop"
    assert completion.text == free.text[: free.text.find(stop)] == streamed
    assert completion.prompt_tokens == 4 and completion.completion_tokens == ends
    assert completion.token_ids == free.token_ids[:ends]
    assert (
        completion.time_to_first_token_s > 0
        and completion.total_time_s >= completion.time_to_first_token_s
    )
    engine.submit(b"The ", SamplingParams(max_tokens=3, temperature=0))
    (done,) = list(engine.run())
    assert done.finish_reason == "length" and done.token_ids == free.token_ids[:3]


def test_dropless_by_default_and_restore() -> None:
    """With a tight fixed capacity a request's output depends on its neighbours; the
    engine's dropless routing removes that, and restore() gives the policy back."""
    tight = RoutingConfig(capacity="fixed", capacity_factor=0.25)
    model = sharp_model(7, routing=tight)
    batch = prompts(8, seed=3)
    params = SamplingParams(max_tokens=6, temperature=0)

    def run(routing: str, requests: list[bytes]) -> list[tuple[int, ...]]:
        engine = InferenceEngine(model, routing=routing)
        ids = [engine.submit(p, params) for p in requests]
        out = {c.request_id: c.token_ids for c in engine.run()}
        engine.restore()
        return [out[i] for i in ids]

    assert run("dropless", batch) == [run("dropless", [p])[0] for p in batch]
    trained = run("trained", batch)
    assert trained != [run("trained", [p])[0] for p in batch]
    assert all(layer.routing.capacity == CapacityKind.FIXED for _, layer in model.moe_layers())


def test_task_router_requests_need_a_known_task() -> None:
    routing = RoutingConfig(router="task", num_tasks=3, capacity="dropless")
    model = sharp_model(8, routing=routing)
    engine = InferenceEngine(model, task_ids=range(3))
    with pytest.raises(ValueError, match="give task_id"):
        engine.submit(b"a")
    with pytest.raises(ValueError, match=r"task_id=5 is not a task of this model"):
        engine.submit(b"a", task_id=5)
    a = engine.submit(b"same prompt", SamplingParams(max_tokens=6, temperature=0), task_id=0)
    b = engine.submit(b"same prompt", SamplingParams(max_tokens=6, temperature=0), task_id=2)
    out = {c.request_id: bytes(c.token_ids) for c in engine.run()}
    context = list(b"same prompt")
    with torch.no_grad():
        for task, rid in ((0, a), (2, b)):
            ctx = list(context)
            for _ in range(6):
                logits = model(torch.tensor([ctx]), torch.tensor([task])).logits_BTV[0, -1]
                ctx.append(int(logits.argmax()))
            assert out[rid] == bytes(ctx[len(context) :])


def test_sampling_is_seeded_per_request() -> None:
    model = sharp_model(9)
    with torch.no_grad():
        model.final_norm.weight.div_(30.0)  # flat distributions: samples differ by seed
    params = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, seed=11)
    a = generate(model, b"abc", 20, temperature=1.0, top_k=50, seed=11).token_ids
    engine = InferenceEngine(model)
    first = engine.submit(b"abc", params)
    engine.submit(b"zzzz", dataclasses.replace(params, seed=12))
    second = engine.submit(b"abc", dataclasses.replace(params, seed=13))
    out = {c.request_id: c.token_ids for c in engine.run()}
    assert out[first] == a and out[second] != a


def test_filters_against_hand_computed_distributions() -> None:
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3]))
    top_p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.65))
    torch.testing.assert_close(top_p, torch.tensor([0.0, 0.4, 0.0, 0.3]) / 0.7)
    top_k = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    torch.testing.assert_close(top_k, torch.tensor([0.0, 0.4, 0.2, 0.3]) / 0.9)
    hot = filtered_probs(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(hot, torch.tensor([0.01, 0.16, 0.04, 0.09]) / 0.30)
    # Sampled frequencies follow the filtered distribution (top-p keeps tokens 1 and 3).
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=0.65)
    draws = [sample_tokens(logits[None], [params], [generator])[0] for _ in range(4000)]
    assert set(draws) == {1, 3}
    assert abs(draws.count(1) / 4000 - 4 / 7) < 0.03


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": -1}, "max_tokens=-1"),
        ({"temperature": -0.1}, "temperature=-0.1"),
        ({"top_p": 0.0}, r"top_p=0.0 is invalid; accepted: a number in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_k": -1}, "top_k=-1"),
        ({"stop": (b"",)}, "stop="),
        ({"stop": (b"\xff",)}, "not UTF-8"),
    ],
)
def test_bad_sampling_params(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_requests() -> None:
    engine = InferenceEngine(sharp_model(10))
    with pytest.raises(ValueError, match="prompt=b'' is invalid"):
        engine.submit(b"")
    with pytest.raises(ValueError, match="max_batch=0"):
        InferenceEngine(sharp_model(10), max_batch=0)


def _save(model: MoETransformer, directory: Path, routing: RoutingConfig) -> Path:
    from launch.config import RunConfig
    from launch.training.checkpointing import config_dict

    run = RunConfig(model=model.config, routing=routing)
    return save_checkpoint(directory / "checkpoints", model, None, 3, config_dict(run))


def test_load_model_from_a_run_directory(tmp_path: Path) -> None:
    routing = RoutingConfig(capacity="fixed", capacity_factor=1.0)
    model = sharp_model(11, routing=routing)
    _save(model, tmp_path, routing)
    loaded = load_model(tmp_path)
    assert loaded.step == 3 and loaded.checkpoint.name == "step_3"
    prompt = b"Let there be"
    expected = generate(model, prompt, 10, temperature=0).token_ids
    assert generate(loaded.model, prompt, 10, temperature=0).token_ids == expected
    with pytest.raises(ValueError, match="is not a checkpoint"):
        load_model(tmp_path / "nothing")
    with pytest.raises(ValueError, match="quantize='int4'"):
        load_model(tmp_path, quantize="int4")


def test_a_checkpoint_of_another_shape_does_not_load(tmp_path: Path) -> None:
    from moe.checkpoint import load_checkpoint

    path = _save(sharp_model(12), tmp_path, DROPLESS)
    other = MoETransformer(small_config(d_model=64), DROPLESS)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_checkpoint(path, other)


@pytest.mark.slow
def test_launch_generate_prints_the_engines_greedy_text(tmp_path: Path) -> None:
    import subprocess
    import sys

    model = sharp_model(13)
    _save(model, tmp_path, DROPLESS)
    prompt = "In the beginning"
    expected = generate(model, prompt, 12, temperature=0).text
    command = [sys.executable, "-m", "launch.generate", f"checkpoint={tmp_path}",
               f"prompt='{prompt}'", "temperature=0", "max_tokens=12"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == prompt + expected.splitlines()[0]
    bad = subprocess.run([*command[:-1], "max_tokens=0"], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert bad.returncode == 2 and "max_tokens=0" in bad.stderr
