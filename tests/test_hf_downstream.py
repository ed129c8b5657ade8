"""What the project does with its own models, on imported HF models: fine-tuning from one
at EP=1 and EP=2 (`train.init_from`), distillation, a task subset, int8 experts and the
planner."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_utils import run_distributed, values_or_raise
from hf_models import save_byte_family, save_family, train_rank
from test_distill import distill_config
from test_train import tiny_config

from launch.config import CommConfig
from launch.plan import PlanRunConfig, run_plan
from launch.training.distillation import distill
from launch.training.loop import train
from moe.data import build_dataset
from moe.inference import load_model
from moe.inference.subset import write_subset
from moe.interop.hf_import import import_hf
from moe.transformer import lm_loss

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def byte_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imported Mixtral over bytes (the project's corpora are bytes)."""
    root = tmp_path_factory.mktemp("byte_mixtral")
    save_byte_family("mixtral", root / "hf", num_hidden_layers=2)
    return import_hf(root / "hf", root / "checkpoint").directory


@pytest.fixture(scope="module")
def byte_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imported Qwen2-MoE over bytes: a shared expert, a dense block, q/k/v biases."""
    root = tmp_path_factory.mktemp("byte_qwen2")
    save_byte_family("qwen2_moe", root / "hf")
    return import_hf(root / "hf", root / "checkpoint").directory


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    root = tmp_path_factory.mktemp("qwen3")
    hf = save_family("qwen3_moe", root / "hf")
    return hf, import_hf(root / "hf", root / "checkpoint").directory


def _fine_tune(run_dir: Path, checkpoint: Path, ep: int) -> Any:
    return tiny_config(
        run_dir, f"train.init_from={checkpoint}", "routing=dropless", "routing.aux_loss_weight=0",
        "routing.z_loss_weight=0", "train.steps=2", "train.warmup_steps=1", "train.batch_size=4", "train.eval_every=2",
        "train.eval_batches=1", "train.log_every=1", "train.checkpoint_every=0",
        "data.seq_len=32", f"comm.ep_size={ep}",
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.distributed
def test_fine_tuning_starts_from_the_imported_weights_at_ep1_and_ep2(
    byte_mixtral: Path, tmp_path: Path
) -> None:
    config = _fine_tune(tmp_path / "ep1", byte_mixtral, 1)
    assert config.model.num_experts == 4  # the run's own model; init_from adopts the checkpoint's
    ep1 = train(config).losses
    ep2 = values_or_raise(
        run_distributed(train_rank, 2, _fine_tune(tmp_path / "ep2", byte_mixtral, 2),
                        timeout_s=300.0)
    )  # fmt: skip
    # The first step's loss (no routing losses in this run) is the imported model's cross
    # entropy on the first batch.
    imported = load_model(byte_mixtral).model.train()
    adopted = config.train  # same seed and batch as the runs
    sampler = build_dataset(config.data).sampler(adopted.batch_size, adopted.seed, 0, 1, False)
    tokens_BT = sampler.next_batch().tokens_BT
    with torch.no_grad():
        expected = lm_loss(imported(tokens_BT[:, :-1]), tokens_BT[:, 1:]).ce.item()
    assert ep1[0] == pytest.approx(expected, rel=1e-5)
    assert ep2[0] == ep2[1] and ep2[0] == pytest.approx(ep1, rel=1e-4)
    assert ep1[1] < ep1[0]


def test_init_from_refuses_data_of_another_vocabulary(qwen3: Any, tmp_path: Path) -> None:
    _, checkpoint = qwen3
    with pytest.raises(ValueError, match="use the checkpoint's tokenizer"):
        train(_fine_tune(tmp_path / "run", checkpoint, 1))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_distilling_an_imported_teacher(byte_qwen2: Path, tmp_path: Path) -> None:
    config = distill_config(tmp_path / "student", byte_qwen2, "distill.init=top",
                            "train.steps=2", "train.warmup_steps=1", "train.eval_every=2", "train.checkpoint_every=0",
                            "data.seq_len=32", "train.batch_size=4", "train.lr=1e-7",
                            "train.min_lr=0")  # fmt: skip
    result = distill(config)
    assert result.final_step == 2 and result.model is not None
    teacher = load_model(byte_qwen2).model
    student = load_model(tmp_path / "student").model
    assert student.moe_layers() == []
    # Attention, norms and embeddings start as the teacher's (then 2 tiny steps).
    for name, tensor in teacher.state_dict().items():
        if ".ffn." not in name:
            torch.testing.assert_close(student.state_dict()[name], tensor, atol=1e-5, rtol=0)


def test_task_subset_of_an_imported_model_computes_the_full_model(
    qwen3: Any, tmp_path: Path
) -> None:
    """As on native models: at coverage 1.0 the subset computes, on the measured tokens,
    what the full model (and transformers) computes (Qwen3-MoE renormalises its top-k,
    so the restricted softmax changes nothing)."""
    hf, checkpoint = qwen3
    full = load_model(checkpoint)
    tokens_BT = torch.tensor([full.tokenizer.encode("In the beginning")[:2]])  # 2 x top-3 of 6
    result = write_subset(checkpoint, 0, tmp_path / "subset", coverage=1.0, data=tokens_BT)
    assert any(len(ids) < 6 for ids in result.experts.values())
    subset = load_model(result.directory)
    assert subset.tokenizer.files() == full.tokenizer.files()
    with torch.no_grad():
        ours = subset.model(tokens_BT).logits_BTV
        torch.testing.assert_close(ours, full.model(tokens_BT).logits_BTV, atol=1e-5, rtol=1e-5)
        reference = hf(tokens_BT).logits
    assert float((ours - reference).norm() / reference.norm()) < 1e-4


def test_int8_experts_of_an_imported_model(qwen3: Any) -> None:
    """As on native models: logits within a few percent of the float model's."""
    _, checkpoint = qwen3
    fp32, int8 = load_model(checkpoint).model, load_model(checkpoint, quantize="int8").model
    assert all(layer.experts.quantization == "int8" for _, layer in int8.moe_layers())
    tokens_BT = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = int8(tokens_BT).logits_BTV, fp32(tokens_BT).logits_BTV
    error_BT = (a - b).norm(dim=-1) / b.norm(dim=-1)
    assert 1e-6 < float(error_BT.median()) < 4e-2


def test_the_planner_reads_an_imported_checkpoint(tmp_path: Path) -> None:
    save_family("qwen2_moe", tmp_path / "hf")
    checkpoint = import_hf(tmp_path / "hf", tmp_path / "checkpoint").directory
    config = PlanRunConfig()
    config.plan.checkpoint = str(checkpoint)
    shape, rows = run_plan(config)
    assert shape.experts_per_block == (6, 0, 6) and shape.top_k == 2
    assert shape.shared_expert_hidden == 56 and shape.head_dim == 12 and rows
    assert CommConfig().ep_size == 1


def test_subsets_measure_on_data_the_model_reads(
    qwen3: Any, byte_mixtral: Path, tmp_path: Path
) -> None:
    from launch.subset import run_subset, to_subset_config

    _, checkpoint = qwen3
    with pytest.raises(ValueError, match="reads the tokens of its own tokenizer"):
        write_subset(checkpoint, 0, tmp_path / "bpe")
    with pytest.raises(ValueError, match=r"no data section \(an imported model\)"):
        write_subset(byte_mixtral, 0, tmp_path / "bytes")
    config = to_subset_config({
        "checkpoint": str(byte_mixtral), "task": "1", "out": str(tmp_path / "bytes"),
        "coverage": 0.5, "max_windows": 2, "data": {"source": "synthetic", "seq_len": 32},
    })  # fmt: skip
    result = run_subset(config)
    assert result.task == 1 and any(len(ids) < 6 for ids in result.experts.values())


def test_a_replica_serves_an_imported_model_in_its_tokens(qwen3: Any) -> None:
    """The serving replica (without Ray): token counts in the model's tokens, stop strings
    on the text, streamed pieces that make up the completion (the OpenAI API end to end:
    tests/test_serve_hf_openai.py)."""
    import asyncio

    from launch.serving.deployments import ModelServer, ModelSpec
    from launch.serving.protocol import GenerationRequest, StreamEnd

    _, checkpoint = qwen3
    server = ModelServer(ModelSpec("full", str(checkpoint), max_batch=2))
    tokenizer = load_model(checkpoint).tokenizer
    ids = tuple(tokenizer.encode("In the beginning God created the heaven", True))
    request = GenerationRequest(prompts=(ids,), max_tokens=9, temperature=0.0)

    async def requests() -> None:  # one event loop: the replica's batching loop lives in it
        whole = await server.complete(request)
        (choice,) = whole.choices
        assert choice.completion_tokens == 9 and choice.finish_reason == "length"
        assert whole.prompt_tokens == (len(ids),) and whole.completion_tokens == 9
        pieces = [item async for item in server.stream(request)]
        assert isinstance(pieces[-1], StreamEnd) and pieces[-1].completion_tokens == 9
        assert "".join(piece.text for piece in pieces[:-1]) == choice.text
        stop = choice.text[2:4]
        stopped = (await server.complete(dataclasses.replace(request, stop=(stop,)))).choices
        assert stopped[0].finish_reason == "stop"
        assert stopped[0].text == choice.text[: choice.text.find(stop)]

    asyncio.run(asyncio.wait_for(requests(), 120))
