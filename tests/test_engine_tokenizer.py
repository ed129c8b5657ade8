"""The engine with a real tokenizer: prompts as text or ids, text that never splits a
UTF-8 character, stop strings on text, eos, padded vocabularies (`moe.inference.text`)."""

from __future__ import annotations

import pytest
import torch
from hf_models import EOS, _tokenizer_json

from moe.config import ModelConfig
from moe.inference import InferenceEngine, SamplingParams
from moe.inference.decode import DecodeCompileOptions
from moe.inference.text import TextStream
from moe.interop.tokenizer import HFTokenizer
from moe.transformer import MoETransformer
from routing import RoutingConfig

TEXT = "Léa said: “ünïcödé 🙂 and 日本” — done."

# The compiled decode step traced by dynamo and run eagerly (what is checked is that the
# mask reaches its rows; inductor's numbers are tests/test_decode_compile.py's).
COMPILED = {"compile": True, "compile_options": DecodeCompileOptions(backend="eager")}
ENGINES = {"eager": {}, "compiled": COMPILED}


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    return HFTokenizer(_tokenizer_json(320), {"eos_token": EOS}, "tiny BPE")


def _model(vocab: int, seed: int = 0) -> MoETransformer:
    config = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                         max_seq_len=48, expert_hidden=16, num_experts=4, tie_embeddings=False,
                         activation="swiglu")  # fmt: skip
    return MoETransformer(config, RoutingConfig(capacity="dropless"), seed=seed).eval()


def _favour(model: MoETransformer, token: int) -> None:
    """Make `token` the model's argmax after any context (a hook on the output head)."""
    assert model.lm_head is not None

    def hook(module: torch.nn.Module, inputs: object, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., token] += 100.0
        return logits

    model.lm_head.register_forward_hook(hook)


def test_stream_never_splits_a_character(tokenizer: HFTokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    # Characters of several bytes come in several tokens (byte-level BPE of KJV text).
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in pieces)
    stream = TextStream(tokenizer, tokenizer.encode("Prompt: "))
    shown = []
    for token in ids:
        assert not stream.push(token)
        piece = stream.visible()
        assert "\ufffd" not in piece
        shown.append(piece)
    text, rest = stream.finish()
    assert text == TEXT == "".join(shown) + rest


@pytest.mark.parametrize("stop", ["ünï", "🙂 a", "done."])
def test_stop_strings_match_on_text_across_tokens(tokenizer: HFTokenizer, stop: str) -> None:
    stream = TextStream(tokenizer, [], stop=[stop, "never"])
    shown, ended_at = "", None
    for n, token in enumerate(tokenizer.encode(TEXT), 1):
        ended = stream.push(token)
        shown += stream.visible()
        if ended:
            ended_at = n
            break
    text, rest = stream.finish()
    assert text == TEXT[: TEXT.find(stop)] == shown + rest
    assert stop not in shown and ended_at is not None
    # It ended at the first token whose text completes the stop string.
    before = tokenizer.decode(tokenizer.encode(TEXT)[: ended_at - 1])
    assert stop not in before


def test_text_and_id_prompts_give_the_same_completion(tokenizer: HFTokenizer) -> None:
    model = _model(320)
    engine = InferenceEngine(model, tokenizer=tokenizer, max_batch=4)
    params = SamplingParams(max_tokens=12, temperature=0)
    ids = tokenizer.encode("In the beginning God")
    a = engine.submit("In the beginning God", params)
    b = engine.submit(ids, params)
    c = engine.submit(b"In the beginning God", params)
    done = {completion.request_id: completion for completion in engine.run()}
    assert done[a].token_ids == done[b].token_ids == done[c].token_ids
    assert done[a].prompt_tokens == len(ids)
    eos = tokenizer.eos_token_id
    generated = [i for i in done[a].token_ids if i != eos]
    assert done[a].text == tokenizer.decode(generated)
    # The oracle: greedy by full recomputation.
    context = list(ids)
    with torch.no_grad():
        for _ in range(len(done[a].token_ids)):
            context.append(int(model(torch.tensor([context])).logits_BTV[0, -1].argmax()))
    assert tuple(context[len(ids) :]) == done[a].token_ids


def test_eos_ends_a_completion(tokenizer: HFTokenizer) -> None:
    model = _model(320, seed=1)
    eos = tokenizer.eos_token_id
    assert eos is not None
    _favour(model, eos)
    engine = InferenceEngine(model, tokenizer=tokenizer)
    engine.submit("abc", SamplingParams(max_tokens=10, temperature=0))
    (done,) = list(engine.run())
    assert done.finish_reason == "stop" and done.token_ids == (eos,) and done.text == ""


@pytest.mark.parametrize("kind", ENGINES)
def test_padded_vocabulary_rows_are_never_sampled(tokenizer: HFTokenizer, kind: str) -> None:
    model = _model(336, seed=2)  # 16 embedding rows beyond the tokenizer's 320 tokens
    _favour(model, 330)
    engine = InferenceEngine(model, tokenizer=tokenizer, max_batch=2, **ENGINES[kind])
    engine.submit("abc", SamplingParams(max_tokens=6, temperature=0))
    engine.submit("abc", SamplingParams(max_tokens=6, temperature=1.0, seed=3))
    for done in engine.run():
        assert all(i < 320 for i in done.token_ids) and len(done.token_ids) == 6


@pytest.mark.parametrize("kind", ENGINES)
def test_padded_vocabulary_rows_are_never_scored(tokenizer: HFTokenizer, kind: str) -> None:
    """Log-probabilities, alternatives and prompt scores are over the tokenizer's tokens:
    log-softmax of the full forward's logits restricted to the first 320 rows (the
    sampled tokens' from the compiled step's rows in `compiled`)."""
    model = _model(336, seed=2)
    _favour(model, 330)
    prompt = tokenizer.encode("In the beginning", add_special_tokens=True)
    engine = InferenceEngine(model, tokenizer=tokenizer, max_batch=1, **ENGINES[kind])
    engine.submit(prompt, SamplingParams(max_tokens=4, temperature=0, logprobs=5,
                                         prompt_logprobs=5))  # fmt: skip
    (done,) = list(engine.run())
    with torch.no_grad():
        logits_TV = model(torch.tensor([prompt + list(done.token_ids)])).logits_BTV[0]
    reference_TV = torch.log_softmax(logits_TV[:, :320].double(), dim=-1)
    assert done.prompt_logprobs is not None
    scores = list(done.prompt_logprobs) + [t.logprob for t in done.tokens]
    targets = prompt[1:] + list(done.token_ids)
    for position, (score, target) in enumerate(zip(scores, targets)):
        assert score is not None and score.token == target
        assert score.logprob == pytest.approx(float(reference_TV[position, target]), abs=1e-5)
        assert [i for i, _ in score.top] == reference_TV[position].topk(5).indices.tolist()


def test_refusals(tokenizer: HFTokenizer) -> None:
    with pytest.raises(ValueError, match="pass its tokenizer"):
        InferenceEngine(_model(320))
    with pytest.raises(ValueError, match="the tokenizer has 320 tokens but the model only 300"):
        InferenceEngine(_model(300), tokenizer=tokenizer)
    engine = InferenceEngine(_model(320), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"ids \[320\] are invalid"):
        engine.submit([5, 320])
    with pytest.raises(ValueError, match="not UTF-8"):
        engine.submit(b"\xff\xfe")
    with pytest.raises(ValueError, match="max_len=99"):
        InferenceEngine(_model(320), tokenizer=tokenizer, max_len=99)
