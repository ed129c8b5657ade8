"""The OpenAI protocol without Ray: every new completions field and its bad values, chat
messages and templates (sandboxed Jinja2), /tokenize and /detokenize bodies, the
request limits, the answers' shapes, and the `/metrics` collector of replica reports
(read back with prometheus-client's own parser)."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from launch.serving.chat import PLAIN_TEMPLATE, ChatTemplate, parse_chat_request, parse_messages
from launch.serving.metrics import ServiceMetrics
from launch.serving.protocol import (
    CHOICE_SEED_STRIDE,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    Limits,
    ModelEntry,
    ReplicaReport,
    RequestError,
)
from launch.serving.validation import (
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
)
from moe.inference.telemetry import EngineTelemetry
from moe.interop.tokenizer import ByteTokenizer

LIMITS = Limits(max_body_bytes=4096, max_tokens=64, max_n=4, max_best_of=6, max_logprobs=20,
                max_prompts=3, max_request_tokens=400)  # fmt: skip
CATALOG = {"m": ModelEntry("m", None, 32)}
BYTES = ByteTokenizer()
RAISING = (
    "{% for m in messages %}{% if m.role == 'system' %}"
    "{{ raise_exception('no system messages, please') }}{% endif %}"
    "<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def completion(**fields: object) -> CompletionRequest:
    body = json.dumps({"model": "m", "prompt": "x", **fields}).encode()
    return parse_completion_request(body, CATALOG, LIMITS, BYTES)


def chat(template: ChatTemplate | None = None, **fields: object) -> ChatRequest:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})
    return parse_chat_request(
        body.encode(), CATALOG, LIMITS, BYTES, template or ChatTemplate(None, None, None)
    )


def test_prompt_forms_and_fields_round_trip() -> None:
    assert completion(prompt="ab").generation.prompts == ((97, 98),)
    assert completion(prompt=["ab", "c"]).generation.prompts == ((97, 98), (99,))
    ids = completion(prompt=[104, 105])
    assert ids.generation.prompts == ((104, 105),) and ids.prompt_texts == ("hi",)
    lists = completion(prompt=[[104], [105, 33]])
    assert lists.generation.prompts == ((104,), (105, 33)) and lists.prompt_texts == ("h", "i!")
    request = completion(
        n=2, best_of=3, logprobs=5, echo=True, max_tokens=0, presence_penalty=-1.5,
        frequency_penalty=2, logit_bias={"65": -100, "66": 7.5}, user="me", suffix=None,
        seed=9, stop=["\n"], return_routed_experts=True,
    )  # fmt: skip
    generation = request.generation
    assert (generation.n, generation.best_of, generation.logprobs, generation.echo) == (
        2,
        3,
        5,
        True,
    )
    assert generation.max_tokens == 0 and generation.routed_experts
    assert (generation.presence_penalty, generation.frequency_penalty) == (-1.5, 2.0)
    assert generation.logit_bias == ((65, -100.0), (66, 7.5)) and generation.seed == 9
    streamed = completion(stream=True, stream_options={"include_usage": True})
    assert streamed.stream and streamed.include_usage
    # No seed: a fresh one per request; a seed: kept, choice j's derived from it.
    assert len({completion().generation.seed for _ in range(4)}) == 4
    assert generation.choice_seed(0) == 9
    assert generation.choice_seed(2) == (9 + 2 * CHOICE_SEED_STRIDE) % 2**63
    params = generation.params(1, score_prompt=False)
    assert params.logprobs == 5 and params.prompt_logprobs is None and params.seed != 9
    assert generation.params(0, score_prompt=True).prompt_logprobs == 5
    # best_of > n without logprobs: the engine still scores each token (for the ranking).
    assert completion(n=1, best_of=2).generation.params(0, False).logprobs == 0


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"n": 0}, 422, "n"),
        ({"n": 5}, 422, "n"),  # serve.max_n
        ({"n": 1.5}, 422, "n"),
        ({"best_of": 1, "n": 2}, 422, "best_of"),
        ({"best_of": 7}, 422, "best_of"),  # serve.max_best_of
        ({"best_of": 2, "stream": True}, 422, "best_of"),
        ({"logprobs": 21}, 422, "logprobs"),
        ({"logprobs": -1}, 422, "logprobs"),
        ({"logprobs": True}, 422, "logprobs"),
        ({"echo": "yes"}, 422, "echo"),
        ({"max_tokens": 65}, 422, "max_tokens"),
        ({"presence_penalty": 2.5}, 422, "presence_penalty"),
        ({"frequency_penalty": "1"}, 422, "frequency_penalty"),
        ({"logit_bias": {"abc": 1}}, 422, "logit_bias"),
        ({"logit_bias": {"256": 1}}, 422, "logit_bias"),  # not a byte
        ({"logit_bias": {"5": 101}}, 422, "logit_bias"),
        ({"logit_bias": [1, 2]}, 422, "logit_bias"),
        ({"user": 5}, 422, "user"),
        ({"suffix": "end"}, 422, "suffix"),
        ({"stream_options": {"include_usage": True}}, 422, "stream_options"),  # no stream
        ({"stream": True, "stream_options": {"include_usage": 1}}, 422, "stream_options"),
        ({"stream": True, "stream_options": {"other": True}}, 422, "stream_options.other"),
        ({"return_routed_experts": "y"}, 422, "return_routed_experts"),
        ({"prompt": []}, 422, "prompt"),
        ({"prompt": [[]]}, 422, "prompt"),
        ({"prompt": [256]}, 422, "prompt"),
        ({"prompt": [True, 1]}, 422, "prompt"),
        ({"prompt": ["a", [1]]}, 422, "prompt"),
        ({"prompt": ["a", "b", "c", "d"]}, 422, "prompt"),  # serve.max_prompts
        ({"prompt": "x" * 33}, 400, "prompt"),  # longer than the context
        # serve.max_request_tokens: 3 prompts x best_of 3 x (30 + 20) = 450 > 400
        ({"prompt": ["x" * 30] * 3, "max_tokens": 20, "best_of": 3}, 400, "prompt"),
        ({"tools": []}, 422, "tools"),
    ],
)
def test_bad_completion_fields_are_named(fields: dict, status: int, param: str) -> None:
    with pytest.raises(RequestError) as caught:
        completion(**fields)
    assert (caught.value.status, caught.value.param) == (status, param), caught.value.message
    assert caught.value.body()["error"]["message"]


def test_the_request_token_bound_counts_best_of() -> None:
    # 3 prompts x best_of 2 x (30 + 20) = 300 <= serve.max_request_tokens (400)
    assert completion(prompt=["x" * 30] * 3, max_tokens=20, best_of=2).generation.best_of == 2


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match=r"max_best_of=2 is below serve\.max_n=4"):
        Limits(max_n=4, max_best_of=2)
    with pytest.raises(ValueError, match="max_logprobs=21"):
        Limits(max_logprobs=21)
    with pytest.raises(ValueError, match="max_prompts=0"):
        Limits(max_prompts=0)


def test_chat_fields_round_trip() -> None:
    request = chat(n=2, logprobs=True, top_logprobs=3, max_completion_tokens=7, max_tokens=5,
                   stream=True, stream_options={"include_usage": True}, seed=1)  # fmt: skip
    assert request.generation.n == 2 and request.generation.max_tokens == 7
    assert request.logprobs and request.top_logprobs == 3 and request.generation.logprobs == 3
    assert request.stream and request.include_usage
    assert request.generation.prompts == (tuple(b"user: hi\nassistant:"),)
    assert chat(max_tokens=5).generation.max_tokens == 5
    assert chat().generation.max_tokens == LIMITS.max_tokens and chat().generation.logprobs is None


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"messages": [{"content": "hi"}]}, 422, "messages[0].role"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            422,
            "messages[0].content",
        ),
        (
            {"messages": [{"role": "user", "content": "a", "tool_calls": []}]},
            422,
            "messages[0].tool_calls",
        ),
        ({"messages": []}, 422, "messages"),
        ({"messages": "hi"}, 422, "messages"),
        ({"n": 0}, 422, "n"),
        ({"top_logprobs": 2}, 422, "top_logprobs"),  # without logprobs
        ({"logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
        ({"max_completion_tokens": 0}, 422, "max_completion_tokens"),
        ({"echo": True}, 422, "echo"),  # a completions field
        ({"messages": [{"role": "user", "content": "x" * 40}]}, 400, "messages"),  # context
    ],
)
def test_bad_chat_fields_are_named(fields: dict, status: int, param: str) -> None:
    with pytest.raises(RequestError) as caught:
        chat(**fields)
    assert (caught.value.status, caught.value.param) == (status, param), caught.value.message


def test_templates_render_in_a_sandbox() -> None:
    messages = parse_messages([
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
    ])  # fmt: skip
    plain = ChatTemplate(None, None, None)
    assert plain.source == PLAIN_TEMPLATE and plain.is_plain
    assert plain.render(messages) == "system: Be terse.\nuser: Hello\nassistant:"
    assert plain.render(messages, add_generation_prompt=False) == "system: Be terse.\nuser: Hello\n"
    chatml = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "<s>", "</s>",
    )  # fmt: skip
    assert chatml.render(messages[1:]) == (
        "<s><|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    raising = ChatTemplate(RAISING, None, None)
    assert raising.render(messages[1:]) == "<user>Hello\n<assistant>"
    with pytest.raises(RequestError) as caught:
        raising.render(messages)
    error = caught.value
    assert error.status == 400 and error.code == "chat_template_error"
    assert "no system messages, please" in error.message
    with pytest.raises(RequestError, match="SecurityError"):  # the sandbox holds
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", None, None).render(messages)
    with pytest.raises(RequestError, match="chat template failed"):
        ChatTemplate("{{ messages[0].content.append(1) }}", None, None).render(messages)
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", None, None)
    with pytest.raises(RequestError) as caught:
        chat(template=raising, messages=[{"role": "system", "content": "x"}])
    assert caught.value.status == 400


def test_tokenize_and_detokenize_bodies() -> None:
    _, parsed = parse_tokenize_request(
        b'{"prompt": "ab", "add_special_tokens": false}', CATALOG, LIMITS
    )
    assert parsed is not None and parsed.text == "ab" and not parsed.add_special_tokens
    data, none = parse_tokenize_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}',
                                        CATALOG, LIMITS)  # fmt: skip
    assert none is None and data["messages"][0]["content"] == "x"
    assert parse_detokenize_request(b'{"tokens": [104, 105]}', CATALOG, LIMITS, 256).tokens == (
        104,
        105,
    )
    for body, param in [
        (b'{"prompt": 5}', "prompt"), (b'{"prompt": "a", "extra": 1}', "extra"),
        (b'{"prompt": "a", "model": "nope"}', "model"),
    ]:  # fmt: skip
        with pytest.raises(RequestError) as caught:
            parse_tokenize_request(body, CATALOG, LIMITS)
        assert caught.value.param == param
    for body in (b'{"tokens": [256]}', b'{"tokens": "ab"}', b'{"tokens": [true]}'):
        with pytest.raises(RequestError) as caught:
            parse_detokenize_request(body, CATALOG, LIMITS, 256)
        assert caught.value.param == "tokens" and caught.value.status == 422


def _report(
    replica: str, sequence: int, steps: int, running: int, ep_size: int = 1
) -> ReplicaReport:
    telemetry = EngineTelemetry(
        steps=steps, model_tokens=10 * steps, alltoall_seconds=0.5 * steps,
        expert_tokens={0: [steps, 2 * steps], 3: [0, steps]}, dropped_slots={0: 1, 3: 0},
        running=running, slots_in_use=running, slots_total=4,
    )  # fmt: skip
    return ReplicaReport("full", replica, ep_size, sequence, telemetry, queued=1)


def _scrape(metrics: ServiceMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_replica_reports_sum_per_deployment_and_parse_as_prometheus() -> None:
    metrics = ServiceMetrics(stale_s=60.0)
    metrics.replicas.update(_report("a", sequence=5, steps=5, running=2, ep_size=2))
    metrics.replicas.update(_report("b", sequence=3, steps=3, running=1, ep_size=2))
    metrics.replicas.update(
        _report("a", sequence=4, steps=4, running=9, ep_size=2)
    )  # late: ignored
    metrics.requests.labels("full", "completions", "200").inc(3)
    samples = _scrape(metrics)
    full = (("deployment", "full"),)
    assert samples[("moe_engine_steps_total", full)] == 8
    assert samples[("moe_engine_tokens_total", full)] == 80
    assert (
        samples[
            ("moe_expert_tokens_total", (("deployment", "full"), ("expert", "1"), ("layer", "0")))
        ]
        == 16
    )
    assert (
        samples[
            ("moe_expert_tokens_total", (("deployment", "full"), ("expert", "1"), ("layer", "3")))
        ]
        == 8
    )
    assert samples[("moe_dropped_slots_total", (("deployment", "full"), ("layer", "0")))] == 2
    assert samples[("moe_alltoall_seconds_total", full)] == 4.0
    assert samples[("moe_sequences_running", full)] == 3 and samples[("moe_kv_slots", full)] == 8
    assert (
        samples[("moe_queue_depth", full)] == 2 and samples[("moe_replicas_reporting", full)] == 2
    )
    key = (
        "moe_requests_total",
        (("endpoint", "completions"), ("model", "full"), ("status", "200")),
    )
    assert samples[key] == 3
    # A replica silent for longer than stale_s keeps its counters, not its gauges.
    metrics.replicas.stale_s = 0.0
    time.sleep(0.01)
    samples = _scrape(metrics)
    assert samples[("moe_engine_steps_total", full)] == 8
    assert samples[("moe_sequences_running", full)] == 0
    assert samples[("moe_replicas_reporting", full)] == 0


def test_generation_request_params_carry_every_field() -> None:
    generation = GenerationRequest(
        prompts=((1, 2),), n=2, best_of=2, max_tokens=3, temperature=0.5, top_p=0.9,
        stop=("é",), seed=4, presence_penalty=1.0, frequency_penalty=-1.0,
        logit_bias=((3, 2.0),), logprobs=2, echo=True, routed_experts=True, task=1,
    )  # fmt: skip
    params = generation.params(0, score_prompt=True)
    assert (params.max_tokens, params.temperature, params.top_p) == (3, 0.5, 0.9)
    assert params.stop == ("é",) and params.seed == 4  # matched on text
    assert (params.presence_penalty, params.frequency_penalty) == (1.0, -1.0)
    assert params.logit_bias == ((3, 2.0),) and params.logprobs == 2
    assert params.prompt_logprobs == 2 and params.routed_experts


def test_a_tokenizer_of_the_hf_kind_names_counts_and_templates(tmp_path: object) -> None:
    """The gateway's side of a checkpoint with `tokenizer.json`: prompts tokenized with
    it, ids checked against its vocabulary, its chat template (with its bos and eos)
    rendered, tokens named and offsets counted in its text."""
    from pathlib import Path

    from test_tokenizer import _train_bpe

    from launch.serving.responses import CompletionLogprobs, TokenNames
    from moe.inference.outputs import GeneratedToken
    from moe.inference.sampling import TokenLogprob
    from moe.interop.tokenizer import HFTokenizer

    directory = Path(str(tmp_path))
    trained = _train_bpe(directory)
    config = {
        "eos_token": "<eos>", "bos_token": "<eos>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}"
                         "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
    }  # fmt: skip
    files = {**trained.files(), "tokenizer_config.json": json.dumps(config).encode()}
    tokenizer = HFTokenizer.from_files(files, "test")
    catalog = {"m": ModelEntry("m", None, 512)}
    body = json.dumps({"model": "m", "prompt": "In the beginning God"}).encode()
    request = parse_completion_request(body, catalog, LIMITS, tokenizer)
    ids = tokenizer.encode("In the beginning God", add_special_tokens=True)
    assert request.generation.prompts == (tuple(ids),) and len(ids) < len("In the beginning God")
    for bad in ({"prompt": [300]}, {"prompt": "x", "logit_bias": {"300": 1}}):
        with pytest.raises(RequestError):
            parse_completion_request(
                json.dumps({"model": "m", **bad}).encode(), catalog, LIMITS, tokenizer
            )
    template = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "the God"}]})
    chat_request = parse_chat_request(body.encode(), catalog, LIMITS, tokenizer, template)
    rendered = "<eos>[user] the God<eos>[assistant]"
    assert chat_request.generation.prompts == (tuple(tokenizer.encode(rendered)),)
    assert tokenizer.encode(rendered)[0] == tokenizer.eos_token_id  # the template's bos
    names = TokenNames(tokenizer)
    assert not names.byte_level and names.name(ids[1]) == tokenizer.decode([ids[1]])
    assert names.utf8(ids[1]) == list(tokenizer.decode([ids[1]]).encode())
    partial = tokenizer.encode("日")[0]  # one byte of a 3-byte character
    assert names.name(partial) == f"token_id:{partial}" and names.utf8(partial) is None
    text = "In the beginning God"
    builder = CompletionLogprobs(names, 0)
    builder.add_prompt(ids, [TokenLogprob(t, -1.0) for t in ids[1:]])
    builder.add_tokens([GeneratedToken(t, TokenLogprob(t, -1.0)) for t in tokenizer.encode(" the")])
    body_out = builder.take()
    whole = text + " the"
    for name, offset in zip(body_out["tokens"], body_out["text_offset"]):
        assert whole[offset : offset + len(name)] == name
