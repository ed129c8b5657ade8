"""Exporting to the Mixtral layout, checked by transformers' own `from_pretrained`: an
imported model comes back as it was, a model trained here loads and computes what it
computes here (logits and greedy text), and what Mixtral cannot hold is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_models import save_family
from test_train import tiny_config

from launch.config import RunConfig
from launch.training.checkpointing import config_dict
from launch.training.loop import train
from moe.checkpoint import save_checkpoint
from moe.config import ModelConfig
from moe.inference import InferenceEngine, SamplingParams, load_model
from moe.interop.hf_export import export_hf
from moe.interop.hf_import import import_hf
from moe.transformer import MoETransformer
from routing import RoutingConfig

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


def test_an_imported_mixtral_exports_back_as_it_was(tmp_path: Path) -> None:
    original = save_family("mixtral", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "checkpoint")
    result = export_hf(tmp_path / "checkpoint", tmp_path / "exported", shard_bytes=200_000)
    assert "model.safetensors.index.json" in result.files  # sharded
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(result.files)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    tokens = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _relative_error(loaded(tokens).logits, original(tokens).logits) < 1e-6
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["eos_token_id"] == original.config.eos_token_id


@pytest.fixture(scope="module")
def trained_here(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mixtral-shaped model trained here: SwiGLU experts, softmax top-2 with
    renormalised weights, dropless, tied embeddings (bytes)."""
    run_dir = tmp_path_factory.mktemp("mixtral_shaped")
    train(tiny_config(run_dir, "model.activation=swiglu", "routing=dropless", "train.steps=10",
                      "train.eval_every=10", "train.checkpoint_every=10"))  # fmt: skip
    return run_dir


@pytest.mark.slow
def test_a_model_trained_here_loads_in_transformers(trained_here: Path, tmp_path: Path) -> None:
    export_hf(trained_here, tmp_path / "exported")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert hf.config.tie_word_embeddings
    ours = load_model(trained_here).model
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _relative_error(ours(tokens).logits_BTV, hf(tokens).logits) < 1e-4
    prompt = list(b"In the beginning")
    engine = InferenceEngine(ours)
    engine.submit(prompt, SamplingParams(max_tokens=16, temperature=0))
    (completion,) = list(engine.run())
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                          pad_token_id=0)  # fmt: skip
    assert list(completion.token_ids) == out[0, len(prompt) :].tolist()


REFUSED = [
    ({"activation": "gelu"}, {}, "gelu experts"),
    ({"activation": "swiglu", "moe_every": 2}, {}, "dense blocks"),
    ({"activation": "swiglu", "residual_mlp": True}, {}, "residual MLP"),
    ({"activation": "swiglu", "shared_expert_hidden": 8}, {}, "a shared expert"),
    ({"activation": "swiglu", "qk_norm": "head", "qkv_bias": True}, {}, "biases.*q/k norm"),
    ({"activation": "swiglu"}, {"router": "sigma"}, "the sigma router"),
    ({"activation": "swiglu"}, {"router": "task", "num_tasks": 2}, "the task router"),
    ({"activation": "swiglu"}, {"normalize_weights": False}, "not renormalised"),
    ({"activation": "swiglu"}, {"top_k": 1}, "top-1 without normalize_top1"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "routing", "message"), REFUSED)
def test_what_mixtral_cannot_hold_is_refused_by_feature(
    tmp_path: Path, model: dict[str, Any], routing: dict[str, Any], message: str
) -> None:
    config = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=32,
                         ffn_hidden=32, expert_hidden=16, num_experts=4, **model)  # fmt: skip
    routing_config = RoutingConfig(capacity="dropless", **routing)
    run = RunConfig(model=config, routing=routing_config)
    save_checkpoint(tmp_path / "ck", MoETransformer(config, routing_config), None, 1,
                    config_dict(run))  # fmt: skip
    with pytest.raises(ValueError, match=message):
        export_hf(tmp_path / "ck", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_int8_and_subset_checkpoints_are_refused(trained_here: Path, tmp_path: Path) -> None:
    from moe.inference.subset import write_subset

    subset = write_subset(trained_here, 0, tmp_path / "subset", coverage=0.3, max_windows=2)
    with pytest.raises(ValueError, match="task subset"):
        export_hf(subset.directory, tmp_path / "out")
    int8 = write_subset(trained_here, 0, tmp_path / "int8", coverage=1.0, quantize="int8",
                        max_windows=2).directory  # fmt: skip
    with pytest.raises(ValueError, match=r"stores \['int8'\] experts"):
        export_hf(int8, tmp_path / "out")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_hf(trained_here, tmp_path / "int8")


@pytest.mark.slow
def test_the_entry_points(tmp_path: Path) -> None:
    save_family("qwen2_moe", tmp_path / "hf")
    run = [sys.executable, "-m", "launch.import_hf", f"path={tmp_path / 'hf'}",
           f"out={tmp_path / 'checkpoint'}"]  # fmt: skip
    done = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "qwen2_moe: 3 blocks" in done.stdout and "peak resident memory" in done.stdout
    again = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    export = [sys.executable, "-m", "launch.export_hf", f"checkpoint={tmp_path / 'checkpoint'}",
              f"out={tmp_path / 'exported'}"]  # fmt: skip
    refused = subprocess.run(export, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert refused.returncode == 2 and "a shared expert" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
