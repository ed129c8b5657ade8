"""The OpenAI API end to end on an imported HuggingFace model with a real BPE tokenizer:
the official `openai` client against `launch.serve` serving a tiny random Qwen2-MoE
written by transformers' `save_pretrained` (a shared expert, a dense block, q/k/v biases)
with a byte-level BPE trained on the shipped KJV and a chat template in its
`tokenizer_config.json`, imported with `launch.import_hf`.

Every expectation comes from transformers itself (the model's logits, greedy `generate`,
the tokenizer's `decode` and `apply_chat_template`), never from this project's code:
token strings in `logprobs` are the tokenizer's, log-probabilities equal log-softmax of
transformers' logits, echo scores the prompt, chat renders the tokenizer's own template,
`usage` counts the tokenizer's tokens, and stop strings (spanning tokens) cut the text.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any

import httpx
import openai
import pytest
import torch
from hf_models import save_family

from launch.serve import ServeConfig, ServeOptions, start, stop
from moe.interop.hf_import import import_hf

pytest.importorskip("transformers")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

# ChatML, as Qwen's tokenizers carry it (rendered here by transformers, there by the
# gateway's own Jinja2 environment).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = "In the beginning God created the heaven"
MESSAGES = [{"role": "user", "content": "Who made the light?"}]


@dataclasses.dataclass
class Served:
    url: str
    client: openai.OpenAI
    model: Any  # transformers' model: the oracle
    tokenizer: Any  # transformers' tokenizer: the oracle


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import transformers

    root = tmp_path_factory.mktemp("hf_openai")
    hf_dir = root / "hf"
    model = save_family("qwen2_moe", hf_dir, seed=1)
    with torch.no_grad():
        # Byte tokens less likely: greedy continuations of several characters per token
        # (a random model otherwise repeats single bytes), so that text and tokens differ.
        model.lm_head.weight[:257] *= 0.3
    model.save_pretrained(hf_dir)
    config_file = hf_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    checkpoint = import_hf(hf_dir, root / "checkpoint").directory
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    options = ServeOptions(port=_free_port(), max_batch=4, max_tokens=16,
                           health_check_period_s=2.0)  # fmt: skip
    try:
        url = start(ServeConfig(checkpoint=str(checkpoint), serve=options))
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield Served(url, client, model, tokenizer)
    finally:
        stop()


# --- oracles: transformers ---------------------------------------------------------------


def encode(served: Served, text: str) -> list[int]:
    return list(served.tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(served: Served, ids: list[int]) -> str:
    return str(served.tokenizer.decode(ids, clean_up_tokenization_spaces=False))


def name(served: Served, token: int) -> str:
    """A token's name in `logprobs` (docs/SERVING.md): its text, or "token_id:N" when it
    is no whole character on its own."""
    text = decode(served, [token])
    return text if text and "\ufffd" not in text else f"token_id:{token}"


def greedy(served: Served, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `ids` (stops at the model's eos)."""
    with torch.no_grad():
        out = served.model.generate(torch.tensor([ids]), max_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=0)  # fmt: skip
    return [int(t) for t in out[0, len(ids) :]]


def log_softmax(served: Served, ids: list[int]) -> torch.Tensor:
    """[T, V]: row t, transformers' log-probabilities of the token after ids[:t + 1]."""
    with torch.no_grad():
        logits = served.model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


# --- the API ----------------------------------------------------------------------------


def test_completion_logprobs_are_the_tokenizers_tokens_and_transformers_scores(
    served: Served,
) -> None:
    prompt_ids = encode(served, PROMPT)
    expected = greedy(served, prompt_ids, 8)
    answer = served.client.completions.create(
        model="full", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3
    )
    (choice,) = answer.choices
    assert choice.text == decode(served, expected)
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == len(expected)
    assert choice.logprobs is not None and choice.logprobs.top_logprobs is not None
    assert choice.logprobs.tokens == [name(served, t) for t in expected]
    reference = log_softmax(served, prompt_ids + expected)
    for position, token in enumerate(expected):
        row = reference[len(prompt_ids) - 1 + position]
        assert choice.logprobs.token_logprobs is not None
        assert choice.logprobs.token_logprobs[position] == pytest.approx(
            float(row[token]), abs=1e-4
        )
        best = int(row.argmax())
        top = choice.logprobs.top_logprobs[position]
        assert top[name(served, best)] == pytest.approx(float(row[best]), abs=1e-4)


def test_echo_scores_the_prompt_in_the_tokenizers_tokens(served: Served) -> None:
    prompt_ids = encode(served, PROMPT)
    answer = served.client.completions.create(
        model="full", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1
    )
    (choice,) = answer.choices
    assert choice.text == PROMPT
    assert answer.usage is not None and answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert logprobs.tokens == [name(served, t) for t in prompt_ids]
    reference = log_softmax(served, prompt_ids)
    assert logprobs.token_logprobs[0] is None  # nothing predicts the first token
    for position in range(1, len(prompt_ids)):
        expected = float(reference[position - 1, prompt_ids[position]])
        assert logprobs.token_logprobs[position] == pytest.approx(expected, abs=1e-4)


def test_chat_renders_the_tokenizers_template(served: Served) -> None:
    rendered = served.tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )
    prompt_ids = encode(served, rendered)
    expected = greedy(served, prompt_ids, 6)
    answer = served.client.chat.completions.create(
        model="full",
        messages=MESSAGES,
        max_completion_tokens=6,
        temperature=0,  # type: ignore[arg-type]
    )
    (choice,) = answer.choices
    assert choice.message.content == decode(served, expected)
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == len(expected)


def test_stop_strings_match_on_the_text_whole_and_streamed(served: Served) -> None:
    prompt_ids = encode(served, PROMPT)
    expected = greedy(served, prompt_ids, 12)
    text = decode(served, expected)
    # A stop string that spans a token boundary: the last character of token 2's text
    # and the first of token 3's.
    boundary = len(decode(served, expected[:3]))
    stop = text[boundary - 1 : boundary + 1]
    assert len(stop) == 2
    cut = text[: text.find(stop)]
    used = next(n for n in range(1, len(expected) + 1) if stop in decode(served, expected[:n]))
    answer = served.client.completions.create(
        model="full", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    (choice,) = answer.choices
    assert (choice.text, choice.finish_reason) == (cut, "stop")
    assert answer.usage is not None and answer.usage.completion_tokens == used
    chunks = served.client.completions.create(
        model="full", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    pieces, usage = [], None
    for chunk in chunks:
        pieces.extend(c.text for c in chunk.choices)
        usage = chunk.usage or usage
    assert "".join(pieces) == cut
    assert usage is not None and usage.completion_tokens == used


def test_the_gateway_reads_the_imported_tokenizer(served: Served) -> None:
    """What the service read came from the import: tokenizer.json and its config."""
    info = httpx.get(f"{served.url}/tokenizer_info", timeout=30.0).json()
    assert info["vocab_size"] == len(served.tokenizer)
    assert info["eos_token"] == served.tokenizer.eos_token
    assert info["eos_token_id"] == served.tokenizer.eos_token_id
    assert info["chat_template"] == CHAT_TEMPLATE
