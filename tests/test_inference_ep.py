"""Expert-parallel decoding on spawned gloo ranks: every rank holds half of every
layer's experts and decodes its share of the requests; the greedy texts equal EP=1's,
including when one rank runs out of work long before the other (it keeps calling its
MoE layers with no tokens until both are done). Compiled (`compile=true`), the all-to-all
runs eagerly between the compiled segments and EP=2 gives EP=1's compiled texts, also
in the steps where a rank prefills a newcomer beside its compiled decodes (two model
calls a step on every rank, an empty one where a rank has nothing of that kind)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed, values_or_raise
from test_inference_engine import DROPLESS, _save, prompts, sharp_model

from launch.generate import GenerateConfig, run_generate
from launch.runtime import ProcessInfo
from moe.inference.decode import DecodeCompileOptions

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


# Dynamo's graphs and segmentation, without inductor's C++ compile in every rank (the
# inductor path itself is checked against eager in tests/test_decode_compile.py).
COMPILED = DecodeCompileOptions(buckets=(1, 2), backend="aot_eager")


def _config(
    checkpoint: Path, texts: list[bytes], max_tokens: int, compile: bool = False
) -> GenerateConfig:
    return GenerateConfig(
        checkpoint=str(checkpoint), prompts=[t.decode("latin-1") for t in texts],
        max_tokens=max_tokens, temperature=0.0, max_batch=2, compile=compile,
    )  # fmt: skip


def _ep_rank(
    rank: int, world_size: int, checkpoint: str, texts: list[bytes], compile: bool = False
) -> list[tuple[int, ...]]:
    torch.set_num_threads(1)
    info = ProcessInfo(rank=rank, world_size=world_size, local_rank=rank, local_world_size=2)
    config = _config(Path(checkpoint), texts, 10, compile)
    completions = run_generate(config, info, COMPILED if compile else None)
    return [c.token_ids for c in completions]


def test_ep2_greedy_texts_equal_ep1(tmp_path: Path) -> None:
    model = sharp_model(21)
    _save(model, tmp_path, DROPLESS)
    # 5 prompts, 2 slots per rank: rank 0 decodes 3 (one waits for a slot: 20 steps),
    # rank 1 decodes 2 (10 steps), then calls its MoE layers with no tokens.
    texts = prompts(5, seed=9)
    ep1 = [c.token_ids for c in run_generate(_config(tmp_path, texts, 10), ProcessInfo())]
    ranks = values_or_raise(run_distributed(_ep_rank, 2, str(tmp_path), texts, timeout_s=180.0))
    assert ranks[0] == ranks[1] == ep1
    assert len(set(ep1)) > 1


def test_ep2_compiled_equals_ep1_compiled(tmp_path: Path) -> None:
    model = sharp_model(22)
    _save(model, tmp_path, DROPLESS)
    texts = prompts(5, seed=10)
    ep1 = [c.token_ids for c in run_generate(_config(tmp_path, texts, 10), ProcessInfo())]
    ep1_compiled = run_generate(_config(tmp_path, texts, 10, True), ProcessInfo(), COMPILED)
    assert [c.token_ids for c in ep1_compiled] == ep1
    ranks = values_or_raise(
        run_distributed(_ep_rank, 2, str(tmp_path), texts, True, timeout_s=300.0)
    )
    assert ranks[0] == ranks[1] == ep1
