"""Importing HF MoE models, checked against transformers itself (the test oracle).

Tiny random models of every family are written by transformers (`tests/hf_models.py`,
shared per module), imported with `moe.interop.hf_import`, and compared with the
transformers model they came from: logits in fp32 at EP=1 and EP=2, each layer's
chosen experts, greedy generation through `launch.generate` with the checkpoint's
tokenizer. Refusals name the field or tensor, and nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_utils import run_distributed, values_or_raise
from hf_models import FAMILIES, ep_logits, family_config, save_family

from launch.generate import GenerateConfig, run_generate
from launch.runtime import ProcessInfo
from moe.inference import load_model
from moe.interop.hf_config import FAMILIES as HF_FAMILIES
from moe.interop.hf_config import HFConfig, configs_from_hf
from moe.interop.hf_import import import_hf

transformers = pytest.importorskip("transformers")

LAYOUTS = ("per_expert", "fused")


class Imported:
    def __init__(self, root: Path, kind: str, layout: str) -> None:
        self.kind, self.hf_dir, self.out = kind, root / "hf", root / "checkpoint"
        self.hf = save_family(kind, self.hf_dir, layout=layout)
        self.result = import_hf(self.hf_dir, self.out)
        self.loaded = load_model(self.result.directory)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache: dict[tuple[str, str], Imported] = {}

    def get(kind: str, layout: str = "per_expert") -> Imported:
        if (kind, layout) not in cache:
            root = tmp_path_factory.mktemp(f"{kind}_{layout}")
            cache[kind, layout] = Imported(root, kind, layout)
        return cache[kind, layout]

    return get


def _tokens(vocab: int, seed: int = 0, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_equal_transformers(imported: Any, kind: str, layout: str) -> None:
    model = imported(kind, layout)
    tokens = _tokens(model.result.model.vocab_size)
    with torch.no_grad():
        reference = model.hf(tokens).logits
        ours = model.loaded.model(tokens).logits_BTV
    assert relative_error(ours, reference) < 1e-4


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_layer_picks_the_experts_transformers_picks(imported: Any, kind: str) -> None:
    model = imported(kind)
    tokens = _tokens(model.result.model.vocab_size, seed=1)
    picked: list[torch.Tensor] = []
    hooks = [
        layer.router.register_forward_hook(lambda m, a, plan: picked.append(plan.expert_ids_TK))
        for _, layer in model.loaded.model.moe_layers()
    ]
    with torch.no_grad():
        model.loaded.model(tokens)
        router_logits = model.hf(tokens, output_router_logits=True).router_logits
    for hook in hooks:
        hook.remove()
    top_k = model.result.routing.top_k
    assert len(picked) == len(router_logits) == len(model.result.model.moe_layer_indices())
    for ours, logits in zip(picked, router_logits):
        expected = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1).indices
        assert torch.equal(ours, expected)


@pytest.mark.distributed
def test_logits_equal_transformers_at_ep2(imported: Any) -> None:
    """Two families in one 2-rank run: Qwen2-MoE (shared expert, a dense block) and
    OLMoE (q/k norm over the projection, clipping)."""
    models = [imported("qwen2_moe"), imported("olmoe", "fused")]
    jobs = [(str(m.result.directory), _tokens(m.result.model.vocab_size, seed=2)) for m in models]
    ranks = values_or_raise(run_distributed(ep_logits, 2, jobs, timeout_s=240.0))
    for index, (model, (_, tokens)) in enumerate(zip(models, jobs)):
        with torch.no_grad():
            reference = model.hf(tokens).logits
        assert ranks[0][index][1] != ranks[1][index][1]  # each rank holds its own experts
        for rank in ranks:
            assert relative_error(rank[index][0], reference) < 1e-4


@pytest.mark.parametrize("kind", FAMILIES)
def test_greedy_generation_equals_transformers_generate(imported: Any, kind: str) -> None:
    model = imported(kind)
    tokenizer = model.loaded.tokenizer
    prompts = ["In the beginning God created", "And the earth was"]
    completions = run_generate(
        GenerateConfig(checkpoint=str(model.out), prompts=prompts, max_tokens=14,
                       temperature=0.0, max_batch=2),
        ProcessInfo(),
    )  # fmt: skip
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.hf.generate(ids, do_sample=False, max_new_tokens=14, pad_token_id=0)
        expected = out[0, ids.shape[1] :].tolist()
        assert list(completion.token_ids) == expected
        eos = tokenizer.eos_token_id
        assert completion.text == tokenizer.decode([i for i in expected if i != eos])
        assert completion.finish_reason == ("stop" if eos in expected else "length")


def test_the_checkpoint_records_what_it_came_from(imported: Any) -> None:
    model = imported("qwen3_moe")
    meta = json.loads((model.result.directory / "meta.json").read_text())
    assert meta["config"]["import"]["model_type"] == "qwen3_moe"
    assert (
        meta["config"]["model"]["qk_norm"] == "head" and meta["config"]["model"]["head_dim"] == 16
    )
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(meta["files"])
    assert meta["moe_layers"][0]["num_experts"] == 6


# --- the config: defaults and refusals ----------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
def test_defaults_are_transformers_defaults(kind: str) -> None:
    """An absent field reads as transformers' own default: a config.json of only its
    model_type imports as transformers' default config does."""
    classes = {"mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
               "qwen3_moe": "Qwen3MoeConfig", "olmoe": "OlmoeConfig"}  # fmt: skip
    full = getattr(transformers, classes[kind])().to_dict()
    assert configs_from_hf({"model_type": kind})[:2] == configs_from_hf(full)[:2]
    config = HFConfig({"model_type": kind})
    for key, default in HF_FAMILIES[kind].defaults.items():
        # None: derived from other fields (kv heads from heads), as transformers does.
        if key in full and default is not None:
            assert config.get(key) == full[key], key


REFUSED = [
    ("mixtral", {"sliding_window": 16}, "sliding_window=16"),
    ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type='yarn'"),
    ("olmoe", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("mixtral", {"architectures": ["MixtralForSequenceClassification"]}, "architectures"),
    ("olmoe", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ("deepseek_v3", {}, "model_type='deepseek_v3'.*supported: mixtral, olmoe, qwen2_moe"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "change", "message"), REFUSED)
def test_what_is_not_exact_is_refused_before_anything_is_written(
    tmp_path: Path, kind: str, change: dict[str, Any], message: str
) -> None:
    source = tmp_path / "hf"
    save_family("mixtral" if kind == "deepseek_v3" else kind, source)
    data = json.loads((source / "config.json").read_text())
    data.update(change, **({"model_type": kind} if kind == "deepseek_v3" else {}))
    (source / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        import_hf(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _rewrite_weights(source: Path, change: Any) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(source / "model.safetensors"))
    change(state)
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})


def test_missing_unused_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    source = tmp_path / "hf"
    save_family("qwen2_moe", source)
    expert = "model.layers.2.mlp.experts.3.down_proj.weight"
    _rewrite_weights(source, lambda state: state.pop(expert))
    with pytest.raises(ValueError, match=f"missing tensor {expert}"):
        import_hf(source, tmp_path / "out")
    save_family("qwen2_moe", source)
    _rewrite_weights(source, lambda state: state.update(extra=torch.zeros(3)))
    with pytest.raises(ValueError, match=r"1 tensors would be left out.*'extra'"):
        import_hf(source, tmp_path / "out")
    save_family("qwen2_moe", source)
    data = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**data, "moe_intermediate_size": 20}))
    with pytest.raises(
        ValueError, match=r"model.layers.0.mlp.experts.0.gate_proj.weight has shape \[24, 48\]; "
        r"the config needs \[20, 48\]",
    ):  # fmt: skip
        import_hf(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_without_tokenizer_must_read_bytes(tmp_path: Path) -> None:
    source = tmp_path / "hf"
    save_family("mixtral", source)
    (source / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"has no tokenizer\.json but the model has a vocabulary"):
        import_hf(source, tmp_path / "out")
    config = family_config("mixtral", vocab_size=256)
    byte_model = tmp_path / "bytes"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(byte_model)
    result = import_hf(byte_model, tmp_path / "out")
    assert not load_model(result.directory).tokenizer.files()  # bytes
