"""What the engine reports besides tokens: log-probabilities of sampled tokens and of an
echoed prompt, penalties and logit bias, prompt-only requests (max_tokens=0), the
experts each token was routed to, and its telemetry (tokens per expert per layer).

Every oracle is computed here from the model's plain full forward over the whole
sequence (no cache, no packing) and hand-written arithmetic, never from the engine's
or the sampler's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_inference_engine import prompts, small_config

from moe.inference import InferenceEngine, SamplingParams
from moe.inference.decode import DecodeCompileOptions
from moe.inference.sampling import adjusted_logits, sample_tokens
from moe.transformer import MoETransformer
from routing import RoutingConfig

torch.set_num_threads(1)


def model_of(seed: int, routing: RoutingConfig | None = None) -> MoETransformer:
    """A random model with moderately peaked logits (greedy choices have margins, sampled
    ones vary)."""
    model = MoETransformer(small_config(), routing or RoutingConfig(capacity="dropless"), seed=seed)
    with torch.no_grad():
        model.final_norm.weight.mul_(4.0)
    return model.eval()


def full_logprobs(model: MoETransformer, tokens: list[int]) -> torch.Tensor:
    """log-softmax of the full forward over `tokens`: [T, V] (row t predicts t + 1)."""
    with torch.no_grad(), model.capacity_override("dropless"):
        logits_TV = model(torch.tensor([tokens])).logits_BTV[0].double()
    return logits_TV - torch.logsumexp(logits_TV, dim=-1, keepdim=True)


def test_sampled_tokens_logprobs_equal_the_full_forward() -> None:
    """Several requests batched and sampled; every reported log-probability and top-k
    alternative equals log-softmax of the full forward at that position."""
    model = model_of(1)
    engine = InferenceEngine(model, max_batch=4)
    texts = prompts(5, seed=2)
    ids = {
        engine.submit(p, SamplingParams(max_tokens=9, temperature=1.0, seed=i, logprobs=4)): p
        for i, p in enumerate(texts)
    }
    for completion in engine.run():
        prompt = list(ids[completion.request_id])
        sampled = [t.id for t in completion.tokens]
        assert sampled == list(completion.token_ids) and len(sampled) == 9
        reference = full_logprobs(model, prompt + sampled)
        for i, token in enumerate(completion.tokens):
            row = reference[len(prompt) - 1 + i]
            assert token.logprob is not None and token.logprob.token == token.id
            assert math.isclose(token.logprob.logprob, float(row[token.id]), abs_tol=2e-4)
            values, order = torch.topk(row, 4)
            assert [t for t, _ in token.logprob.top] == order.tolist()
            torch.testing.assert_close(
                torch.tensor([lp for _, lp in token.logprob.top], dtype=torch.float64),
                values, atol=2e-4, rtol=0,
            )  # fmt: skip


def test_echo_scores_equal_the_teacher_forced_likelihood_and_max_tokens_zero_generates_nothing() -> (
    None
):
    model = model_of(2)
    engine = InferenceEngine(model, max_batch=3)
    texts = prompts(3, seed=4)
    texts[0] = b"In the beginning God"  # a long one beside short ones, in one prefill step
    scored = {engine.submit(p, SamplingParams(max_tokens=0, prompt_logprobs=2)): p for p in texts}
    plain = engine.submit(b"unscored", SamplingParams(max_tokens=0))
    done = {c.request_id: c for c in engine.run()}
    assert done[plain].tokens == () and done[plain].prompt_logprobs is None
    assert (
        done[plain].text == ""
        and done[plain].token_ids == ()
        and done[plain].finish_reason == "length"
    )
    for request_id, prompt in scored.items():
        completion = done[request_id]
        assert completion.tokens == () and completion.completion_tokens == 0
        reference = full_logprobs(model, list(prompt))
        scores = completion.prompt_logprobs
        assert scores is not None and len(scores) == len(prompt) - 1
        teacher_forced = sum(float(reference[t, prompt[t + 1]]) for t in range(len(prompt) - 1))
        assert math.isclose(sum(s.logprob for s in scores), teacher_forced, abs_tol=1e-3)
        for t, score in enumerate(scores):
            assert score.token == prompt[t + 1]
            assert [i for i, _ in score.top] == torch.topk(reference[t], 2).indices.tolist()


def test_penalties_and_bias_as_defined() -> None:
    """adjusted = logits - presence * [count > 0] - frequency * count + bias, by hand."""
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={0: 2.0, 3: -1.0})  # fmt: skip
    generated = [3, 3, 1]  # token 3 twice, token 1 once, tokens 0 and 2 never
    expected = torch.tensor([1 + 2.0, 2 - 0.5 - 0.25, 3.0, 4 - 0.5 - 0.5 - 1.0])
    torch.testing.assert_close(adjusted_logits(logits, params, generated), expected)
    # Sampled frequencies follow softmax(adjusted) (temperature 1, no filter).
    generator = torch.Generator().manual_seed(0)
    draws = [
        sample_tokens(logits[None], [params], [generator], [generated])[0] for _ in range(6000)
    ]
    probabilities = torch.softmax(expected, dim=0).tolist()
    for token, probability in enumerate(probabilities):
        assert abs(draws.count(token) / 6000 - probability) < 0.02, (token, probability)
    # Greedy reads the adjusted logits: token 0 (3.0) ties token 2 (3.0); argmax takes 0.
    greedy = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={0: 2.0, 3: -1.0})  # fmt: skip
    assert sample_tokens(logits[None], [greedy], [generator], [generated]) == [0]
    with pytest.raises(ValueError, match="logit_bias token -1"):
        SamplingParams(logit_bias={-1: 1.0})


def test_greedy_with_penalties_and_bias_equals_a_hand_written_loop() -> None:
    model = model_of(3)
    prompt = list(b"And God said")
    bias = {ord("e"): 3.0, ord(" "): -2.0}
    params = SamplingParams(max_tokens=12, temperature=0, presence_penalty=1.5,
                            frequency_penalty=0.75, logit_bias=bias)  # fmt: skip
    engine = InferenceEngine(model, max_batch=2)
    request = engine.submit(bytes(prompt), params)
    engine.submit(b"a neighbour", SamplingParams(max_tokens=12, temperature=0))
    got = {c.request_id: c for c in engine.run()}[request].token_ids
    context, counts = list(prompt), [0] * 256
    for _ in range(12):
        with torch.no_grad():
            logits = model(torch.tensor([context])).logits_BTV[0, -1].tolist()
        for token in range(256):
            logits[token] -= 1.5 * (counts[token] > 0) + 0.75 * counts[token]
            logits[token] += bias.get(token, 0.0)
        choice = max(range(256), key=lambda t: logits[t])
        counts[choice] += 1
        context.append(choice)
    assert got == tuple(context[len(prompt) :])
    unpenalised = InferenceEngine(model, max_batch=1)
    unpenalised.submit(bytes(prompt), SamplingParams(max_tokens=12, temperature=0))
    assert next(iter(unpenalised.run())).token_ids != got  # the penalties changed something


def _route_reference(model: MoETransformer, tokens: list[int]) -> list[list[list[int]]]:
    """[T][layer][K]: the experts each position of the full forward routes to, read from
    each MoE layer's input with the layer's own router."""
    inputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
        for _, layer in model.moe_layers()
    ]
    try:
        with torch.no_grad(), model.capacity_override("dropless"):
            model(torch.tensor([tokens]))
            plans = [
                layer.route(x.reshape(-1, x.shape[-1]))
                for (_, layer), x in zip(model.moe_layers(), inputs)
            ]
    finally:
        for hook in hooks:
            hook.remove()
    ids = torch.stack([plan.expert_ids_TK for plan in plans], dim=1)  # [T, layers, K]
    return [[sorted(k) for k in row] for row in ids.tolist()]


@pytest.mark.parametrize("compile", [False, True])
def test_routed_experts_and_telemetry_count_what_the_model_routed(compile: bool) -> None:
    """Each generated token's experts are the full forward's routing at the position
    that produced it; the telemetry's tokens per expert per layer add up to the routing
    of every position the model read, its token counts to the load. Compiled (one
    bucket of 2 rows: a lone sequence decodes beside a padding row), the padding row's
    routing is neither reported nor counted."""
    model = model_of(4)
    options = DecodeCompileOptions(buckets=(2,), backend="aot_eager", warmup="lazy")
    engine = InferenceEngine(model, max_batch=2, compile=compile, compile_options=options)
    engine.take_telemetry()  # from here on
    texts = prompts(3, seed=6)
    params = SamplingParams(max_tokens=6, temperature=0, routed_experts=True)
    by_id = {engine.submit(p, params): p for p in texts}
    expected_counts = torch.zeros(len(model.moe_layers()), 4, dtype=torch.int64)
    for completion in engine.run():
        prompt = list(by_id[completion.request_id])
        sampled = [t.id for t in completion.tokens]
        reference = _route_reference(model, prompt + sampled[:-1])  # what the model read
        for i, token in enumerate(completion.tokens):
            assert token.experts is not None
            assert [sorted(k) for k in token.experts] == reference[len(prompt) - 1 + i]
        for row in reference:
            for layer, chosen in enumerate(row):
                for expert in chosen:
                    expected_counts[layer, expert] += 1
    telemetry = engine.take_telemetry()
    read = sum(len(p) + 6 - 1 for p in texts)
    assert telemetry.model_tokens == read
    assert telemetry.prompt_tokens == sum(len(p) for p in texts)
    assert telemetry.generated_tokens == 3 * 6
    top_k = model.moe_layers()[0][1].routing.top_k
    blocks = [block for block, _ in model.moe_layers()]
    assert sorted(telemetry.expert_tokens) == blocks
    for layer, block in enumerate(blocks):
        assert sum(telemetry.expert_tokens[block]) == top_k * read
        assert telemetry.expert_tokens[block] == expected_counts[layer].tolist()
        assert telemetry.dropped_slots[block] == 0
    assert telemetry.running == telemetry.waiting == telemetry.slots_in_use == 0
    assert telemetry.slots_total == 2 and telemetry.alltoall_seconds == 0.0
    assert engine.take_telemetry().steps == 0  # taken: the counters start again


def test_trained_capacity_drops_are_counted() -> None:
    """Under a fixed capacity below the demand (routing='trained'), kept plus dropped
    slots are every slot, and some are dropped."""
    routing = RoutingConfig(capacity="fixed", capacity_factor=0.5)
    model = model_of(5, routing)
    engine = InferenceEngine(model, max_batch=2, routing="trained")
    engine.take_telemetry()
    for prompt in prompts(4, seed=8):
        engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0))
    list(engine.run())
    telemetry = engine.take_telemetry()
    for block, _ in model.moe_layers():
        kept = sum(telemetry.expert_tokens[block])
        assert kept + telemetry.dropped_slots[block] == routing.top_k * telemetry.model_tokens
    assert sum(telemetry.dropped_slots.values()) > 0
