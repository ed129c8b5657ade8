"""The OpenAI-compatible API with the official `openai` client against a running service
(`launch.serve`, one Ray Serve application for the module: start-up is the expensive
part): every field round-trips, the SDK's own response models validate every answer,
whole and streamed; log-probabilities equal log-softmax of the model's own full forward
(computed here); echo scores a prompt as evaluation harnesses read it (token-id prompts,
echo, logprobs, max_tokens 0 or 1); n with a seed reproduces; best_of ranks; penalties
and logit_bias act as defined; chat renders through the configured template; /tokenize,
/detokenize, /tokenizer_info, /health; bad input gets 4xx naming the field; `/metrics`
parses with prometheus-client and moves by what a known load sent.

The model is byte-level (a token is a byte), so every id is known from the text side.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from typing import Any

import httpx
import openai
import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families
from test_serve_protocol import RAISING
from test_subset import tiny_run_config

from launch.serve import ServeConfig, ServeOptions, start, stop
from launch.training.checkpointing import config_dict
from moe.checkpoint import save_checkpoint
from moe.inference import generate, load_model
from moe.transformer import MoETransformer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONTEXT = 64


@dataclasses.dataclass
class Service:
    url: str
    client: openai.OpenAI
    http: httpx.Client
    model: MoETransformer


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("openai")
    config = tiny_run_config("topk", 8)
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, max_seq_len=CONTEXT)
    )
    model = MoETransformer(config.model, config.routing, seed=21)
    with torch.no_grad():
        model.final_norm.weight.mul_(4.0)  # peaked enough for greedy margins, not one-hot
    save_checkpoint(root / "run" / "checkpoints", model, None, 3, config_dict(config))
    template = root / "chat.jinja"
    template.write_text(RAISING)
    options = ServeOptions(
        port=_free_port(), max_batch=8, max_tokens=32, max_n=4, max_best_of=4,
        max_ongoing_requests=16, chat_template=str(template), health_check_period_s=2.0,
    )  # fmt: skip
    try:
        url = start(ServeConfig(checkpoint=str(root / "run"), serve=options))
        reference = load_model(root / "run").model
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with httpx.Client(base_url=url, timeout=120.0) as http:
            yield Service(url, client, http, reference)
    finally:
        stop()


# --- oracles and helpers ---------------------------------------------------------------


def full_logprobs(model: MoETransformer, tokens: list[int]) -> torch.Tensor:
    """log-softmax of the model's full forward over `tokens`: [T, V], row t predicts t+1."""
    with torch.no_grad(), model.capacity_override("dropless"):
        logits = model(torch.tensor([tokens])).logits_BTV[0].double()
    return torch.log_softmax(logits, dim=-1)


def token_id(name: str) -> int:
    """A byte-level token's id from its name in the answer ("token_id:N" or its text)."""
    if name.startswith("token_id:"):
        return int(name.removeprefix("token_id:"))
    (byte,) = name.encode("utf-8")
    return byte


def strict_completion(raw: dict[str, Any]) -> Completion:
    """Validate an answer against the SDK's `Completion` model strictly. Two nulls that
    OpenAI's own API sends are filled first, as the SDK types do not admit them: the
    first echoed token's log-probability, and a streamed chunk's finish_reason."""
    fixed = json.loads(json.dumps(raw))
    for choice in fixed["choices"]:
        choice["finish_reason"] = choice["finish_reason"] or "length"
        logprobs = choice.get("logprobs")
        if logprobs and logprobs["token_logprobs"] and logprobs["token_logprobs"][0] is None:
            logprobs["token_logprobs"][0] = 0.0
            logprobs["top_logprobs"][0] = {}
    return Completion.model_validate(fixed)


def post(service: Service, path: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = service.http.post(path, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def stream_lines(service: Service, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with service.http.stream("POST", path, json={**body, "stream": True}) as answer:
        assert answer.status_code == 200
        lines = [line for line in answer.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def joined(pieces: list[dict[str, Any]], key: str) -> list[Any]:
    """One logprobs list of a choice from its streamed pieces."""
    return [item for piece in pieces for item in piece["logprobs"][key]]


def scrape(service: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = service.http.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# --- the tests ---------------------------------------------------------------------------


def test_models_health_and_tokenizer_endpoints(service: Service) -> None:
    models = service.client.models.list()
    assert [m.id for m in models.data] == ["full"] and models.data[0].owned_by == "moe-system"
    assert service.http.get("/health").json() == service.http.get("/healthz").json()
    assert service.http.get("/health").json()["status"] == "ok"
    tokens = post(service, "/tokenize", {"model": "full", "prompt": "Abé"})
    assert tokens == {"count": 4, "max_model_len": CONTEXT, "tokens": list("Abé".encode()),
                      "token_strs": None}  # fmt: skip
    chat = post(service, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert bytes(chat["tokens"]) == b"<user>hi\n<assistant>"  # the configured template
    assert post(service, "/detokenize", {"tokens": chat["tokens"]}) == {
        "prompt": "<user>hi\n<assistant>"
    }
    info = service.http.get("/tokenizer_info").json()
    assert info["vocab_size"] == 256 and info["eos_token"] is None
    assert info["max_model_len"] == CONTEXT and info["chat_template"] == RAISING


def test_prompt_forms_round_trip_and_equal_offline_greedy(service: Service) -> None:
    texts = ["In the beginning", "And God said", "x"]
    expected = [generate(service.model, t.encode(), 6, temperature=0).text for t in texts]
    forms: list[Any] = [texts[0], texts, list(texts[1].encode()), [list(t.encode()) for t in texts]]
    wanted = [expected[:1], expected, expected[1:2], expected]
    for prompt, answers in zip(forms, wanted):
        raw = service.client.completions.with_raw_response.create(
            model="full", prompt=prompt, max_tokens=6, temperature=0, user="tester"
        )
        parsed = raw.parse()
        strict_completion(json.loads(raw.text))
        assert [c.text for c in parsed.choices] == answers
        assert [c.index for c in parsed.choices] == list(range(len(answers)))
        assert all(c.finish_reason == "length" and c.logprobs is None for c in parsed.choices)
        assert parsed.usage is not None and parsed.usage.completion_tokens == 6 * len(answers)
        used = [t for t, a in zip(texts, expected) if a in answers]
        assert parsed.usage.prompt_tokens == sum(len(t.encode()) for t in used)


def test_logprobs_equal_the_full_forward(service: Service) -> None:
    prompt = "In the beginning"
    raw = service.client.completions.with_raw_response.create(
        model="full", prompt=prompt, max_tokens=8, temperature=1.0, seed=7, logprobs=5
    )
    choice = strict_completion(json.loads(raw.text)).choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert logprobs.top_logprobs is not None and logprobs.text_offset is not None
    generated = [token_id(t) for t in logprobs.tokens]
    assert bytes(generated).decode("utf-8", "replace") == choice.text
    reference = full_logprobs(service.model, list(prompt.encode()) + generated)
    for i, token in enumerate(generated):
        row = reference[len(prompt) - 1 + i]
        assert math.isclose(logprobs.token_logprobs[i], float(row[token]), abs_tol=2e-4)
        top = {token_id(name): value for name, value in logprobs.top_logprobs[i].items()}
        best = torch.topk(row, 5)
        assert set(best.indices.tolist()) | {token} == set(top)  # the sampled one always
        for index, value in zip(best.indices.tolist(), best.values.tolist()):
            assert math.isclose(top[index], value, abs_tol=2e-4)
    offsets = logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(choice.text)
    for i, (name, offset) in enumerate(zip(logprobs.tokens, offsets)):
        # After whole characters only, a token starts where its offset says (an unfinished
        # character before it counts from where that character starts: docs/SERVING.md).
        if not any(n.startswith("token_id:") for n in logprobs.tokens[: i + 1]):
            assert choice.text[offset] == name


def test_echo_scores_a_prompt_as_evaluation_harnesses_do(service: Service) -> None:
    """lm-evaluation-harness's log-likelihood: token-id prompts (context + continuation),
    echo, logprobs=1, max_tokens 0 (or 1), the continuation's log-probabilities summed."""
    context, continuations = b"And God said, Let there be", [b" light", b" dark"]
    prompts = [list(context + c) for c in continuations]
    for max_tokens in (0, 1):
        raw = service.client.completions.with_raw_response.create(
            model="full", prompt=prompts, echo=True, logprobs=1, max_tokens=max_tokens,
            temperature=0,
        )  # fmt: skip
        answer = json.loads(raw.text)
        strict_completion(answer)
        assert answer["usage"]["completion_tokens"] == max_tokens * 2
        for ids, choice in zip(prompts, answer["choices"]):
            logprobs = choice["logprobs"]
            assert choice["text"].encode()[: len(ids)] == bytes(ids)
            assert len(logprobs["tokens"]) == len(ids) + max_tokens
            assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
            assert [token_id(t) for t in logprobs["tokens"]][: len(ids)] == ids
            assert logprobs["text_offset"][: len(ids)] == list(range(len(ids)))
            reference = full_logprobs(service.model, ids)
            tail = range(len(context), len(ids))  # the continuation's tokens
            expected = sum(float(reference[t - 1, ids[t]]) for t in tail)
            got = sum(logprobs["token_logprobs"][t] for t in tail)
            assert math.isclose(got, expected, abs_tol=1e-3)
            for t in range(1, len(ids)):
                assert math.isclose(logprobs["token_logprobs"][t], float(reference[t - 1, ids[t]]),
                                    abs_tol=2e-4)  # fmt: skip
    # Streamed: the echoed prompt and its scores come in each choice's first chunk.
    chunks = stream_lines(service, "/v1/completions", {
        "model": "full", "prompt": "Let there be", "echo": True, "logprobs": 0, "max_tokens": 2,
        "temperature": 0,
    })  # fmt: skip
    assert chunks[0]["choices"][0]["text"].startswith("Let there be")
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert len(joined([c["choices"][0] for c in chunks], "tokens")) == 12 + 2


def test_n_with_a_seed_reproduces_and_best_of_ranks(service: Service) -> None:
    def choices(**fields: Any) -> list[Any]:
        answer = service.client.completions.create(
            model="full", prompt="Blessed are", max_tokens=8, temperature=1.0, **fields
        )
        return answer.choices

    two = choices(n=2, seed=11)
    assert len(two) == 2 and two[0].text != two[1].text
    assert [c.text for c in choices(n=2, seed=11)] == [c.text for c in two]
    assert choices(n=1, seed=11)[0].text == two[0].text  # choice 0 samples with the seed
    unseeded = {choices(n=1)[0].text for _ in range(3)}
    assert len(unseeded) > 1  # no seed: a fresh one per request
    every = choices(n=3, best_of=3, seed=5, logprobs=0)
    means = [sum(c.logprobs.token_logprobs) / 8 for c in every]  # type: ignore[union-attr, arg-type]
    best = choices(n=1, best_of=3, seed=5)
    assert best[0].text == every[means.index(max(means))].text


def test_penalties_and_logit_bias_act_as_defined(service: Service) -> None:
    forced = service.client.completions.create(
        model="full", prompt="In", max_tokens=5, temperature=0, logit_bias={"120": 100}
    )
    assert forced.choices[0].text == "xxxxx"
    prompt = list(b"And God said")
    presence, frequency, bias = 0.8, 1.2, {ord("e"): 2.5}
    answer = service.client.completions.create(
        model="full", prompt="And God said", max_tokens=10, temperature=0,
        presence_penalty=presence, frequency_penalty=frequency, logit_bias={"101": 2.5},
    )  # fmt: skip
    context, counts = list(prompt), [0] * 256  # the definition, by hand, on the full forward
    for _ in range(10):
        logits = full_logprobs(service.model, context)[-1].tolist()  # softmax keeps argmax
        adjusted = [
            logits[t] - presence * (counts[t] > 0) - frequency * counts[t] + bias.get(t, 0.0)
            for t in range(256)
        ]
        choice = max(range(256), key=lambda t: adjusted[t])
        counts[choice] += 1
        context.append(choice)
    assert answer.choices[0].text == bytes(context[len(prompt) :]).decode("utf-8", "replace")


def test_streamed_completions_with_and_without_usage(service: Service) -> None:
    body = {"model": "full", "prompt": ["Blessed are", "In"], "max_tokens": 6, "n": 2,
            "temperature": 1.0, "seed": 3, "logprobs": 2}  # fmt: skip
    whole = post(service, "/v1/completions", body)
    chunks = stream_lines(service, "/v1/completions",
                          {**body, "stream_options": {"include_usage": True}})  # fmt: skip
    for chunk in chunks:
        strict_completion(chunk)
    *pieces, last = chunks
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    assert all(piece["usage"] is None and len(piece["choices"]) == 1 for piece in pieces)
    for choice in whole["choices"]:
        mine = [p["choices"][0] for p in pieces if p["choices"][0]["index"] == choice["index"]]
        assert "".join(p["text"] for p in mine) == choice["text"]
        for key in ("tokens", "token_logprobs", "text_offset"):
            assert joined(mine, key) == pytest.approx(choice["logprobs"][key], abs=1e-5), key
        assert [p["finish_reason"] for p in mine][-1] == "length"
    plain = stream_lines(service, "/v1/completions", {**body, "logprobs": None})
    assert all("usage" not in chunk for chunk in plain)
    streamed = service.client.completions.create(**{**body, "stream": True})  # the SDK reads it
    texts: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}


def test_chat_whole_and_streamed(service: Service) -> None:
    messages = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Me."},
                {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]  # fmt: skip
    rendered = "<user>Who?\n<assistant>Me.\n<user>Why?\n<assistant>"
    fields = {"model": "full", "n": 2, "seed": 3, "temperature": 1.0}
    raw = service.client.chat.completions.with_raw_response.create(
        messages=messages, logprobs=True, top_logprobs=3, max_completion_tokens=6, **fields
    )
    answer = ChatCompletion.model_validate(json.loads(raw.text))
    same = post(service, "/v1/completions",
                {**fields, "prompt": rendered, "max_tokens": 6, "logprobs": 3})  # fmt: skip
    assert [c.message.content for c in answer.choices] == [c["text"] for c in same["choices"]]
    assert answer.usage is not None and answer.usage.prompt_tokens == len(rendered)
    for choice, plain in zip(answer.choices, same["choices"]):
        assert choice.message.role == "assistant" and choice.finish_reason == "length"
        content = choice.logprobs.content  # type: ignore[union-attr]
        assert content is not None
        assert [c.token for c in content] == plain["logprobs"]["tokens"]
        assert [c.logprob for c in content] == pytest.approx(plain["logprobs"]["token_logprobs"])
        assert all(len(c.top_logprobs) == 3 and len(c.bytes or []) == 1 for c in content)
        assert [c.bytes[0] for c in content] == [token_id(c.token) for c in content]  # type: ignore[index]
    chunks = stream_lines(service, "/v1/chat/completions", {
        **fields, "messages": messages, "max_tokens": 6,
        "stream_options": {"include_usage": True},
    })  # fmt: skip
    parsed = [ChatCompletionChunk.model_validate(chunk) for chunk in chunks]
    assert parsed[-1].choices == [] and parsed[-1].usage == answer.usage
    for choice in answer.choices:
        mine = [c.choices[0] for c in parsed[:-1] if c.choices[0].index == choice.index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert mine[-1].finish_reason == "length"
    stream = service.client.chat.completions.create(messages=messages, max_tokens=6, stream=True,
                                                    **fields)  # fmt: skip
    assert sum(len(chunk.choices) for chunk in stream) > 0


def test_routed_experts_extension(service: Service) -> None:
    answer = service.client.completions.create(
        model="full", prompt="In", max_tokens=4, temperature=0,
        extra_body={"return_routed_experts": True},
    )  # fmt: skip
    routed = answer.choices[0].model_extra["routed_experts"]  # type: ignore[index]
    assert len(routed) == 4 and all(len(token) == 2 for token in routed)  # 2 MoE layers
    assert all(len(set(k)) == 2 and set(k) <= set(range(8)) for token in routed for k in token)


@pytest.mark.parametrize(
    ("endpoint", "fields", "status", "param"),
    [
        ("completions", {"n": 0}, 422, "n"),
        ("completions", {"logprobs": 21}, 422, "logprobs"),
        ("completions", {"n": 3, "best_of": 2}, 422, "best_of"),
        ("completions", {"suffix": "the end"}, 422, "suffix"),
        ("completions", {"prompt": "x" * (CONTEXT + 1)}, 400, "prompt"),
        ("chat", {"messages": [{"content": "no role"}]}, 422, "messages[0].role"),
        ("chat", {"messages": [{"role": "king", "content": "hi"}]}, 422, "messages[0].role"),
        ("chat", {"messages": [{"role": "system", "content": "hi"}]}, 400, "messages"),
        ("chat", {"top_logprobs": 2}, 422, "top_logprobs"),
    ],
)
def test_bad_input_gets_4xx_naming_the_field(
    service: Service, endpoint: str, fields: dict, status: int, param: str
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        if endpoint == "completions":
            service.client.completions.create(**{"model": "full", "prompt": "x", **fields})
        else:
            body = {"model": "full", "messages": [{"role": "user", "content": "x"}], **fields}
            service.client.chat.completions.create(**body)
    error = caught.value
    assert error.status_code == status and error.body["param"] == param  # type: ignore[index]
    if param == "messages":  # the template raised
        assert "no system messages, please" in error.message


def test_metrics_move_by_a_known_load(service: Service) -> None:
    before = scrape(service)
    prompts = ["In the", "Blessed are the", "And"]
    for prompt in prompts:
        service.client.completions.create(model="full", prompt=prompt, max_tokens=5, temperature=0)
    chat_prompt = "<user>hi\n<assistant>"
    stream = service.client.chat.completions.create(
        model="full", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4,
        stream=True, temperature=0,
    )  # fmt: skip
    assert sum(1 for _ in stream) > 0
    with pytest.raises(openai.APIStatusError):
        service.client.completions.create(model="full", prompt="x", n=0)
    after = scrape(service)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("moe_requests_total", model="full", endpoint="completions", status="200") == 3
    assert delta("moe_requests_total", model="full", endpoint="chat", status="200") == 1
    assert delta("moe_requests_total", model="full", endpoint="completions", status="422") == 1
    prompt_tokens = sum(len(p) for p in prompts) + len(chat_prompt)
    assert delta("moe_prompt_tokens_total", model="full") == prompt_tokens
    assert delta("moe_generation_tokens_total", model="full") == 3 * 5 + 2 * 4
    assert delta("moe_time_to_first_token_seconds_count", model="full") == 5
    assert delta("moe_time_per_output_token_seconds_count", model="full") == 5
    # The model read every prompt and every generated token but each sequence's last.
    read = sum(len(p) + 4 for p in prompts) + 2 * (len(chat_prompt) + 3)
    assert delta("moe_engine_tokens_total", deployment="full") == read
    for layer in ("0", "1"):
        routed = sum(
            delta("moe_expert_tokens_total", deployment="full", layer=layer, expert=str(e))
            for e in range(8)
        )
        assert routed == 2 * read  # top-2, dropless
        assert delta("moe_dropped_slots_total", deployment="full", layer=layer) == 0
    gauges = {name: after[(name, (("deployment", "full"),))] for name in (
        "moe_sequences_running", "moe_sequences_waiting", "moe_kv_slots_in_use", "moe_kv_slots",
        "moe_queue_depth", "moe_replicas_reporting")}  # fmt: skip
    assert gauges == {"moe_sequences_running": 0, "moe_sequences_waiting": 0,
                      "moe_kv_slots_in_use": 0, "moe_kv_slots": 8, "moe_queue_depth": 0,
                      "moe_replicas_reporting": 1}  # fmt: skip
    assert after[("moe_requests_in_flight", (("model", "full"),))] == 0
    assert ("moe_alltoall_seconds_total", (("deployment", "full"),)) not in after  # EP=1
