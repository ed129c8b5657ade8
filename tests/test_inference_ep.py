"""Expert-parallel decoding on spawned gloo ranks: every rank holds half of every
layer's experts and decodes its share of the requests; the greedy texts equal EP=1's,
including when one rank runs out of work long before the other (it keeps calling its
MoE layers with no tokens until both are done)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed, values_or_raise
from test_inference_engine import DROPLESS, _save, prompts, sharp_model

from launch.generate import GenerateConfig, run_generate
from launch.runtime import ProcessInfo

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _config(checkpoint: Path, texts: list[bytes], max_tokens: int) -> GenerateConfig:
    return GenerateConfig(
        checkpoint=str(checkpoint), prompts=[t.decode("latin-1") for t in texts],
        max_tokens=max_tokens, temperature=0.0, max_batch=2,
    )  # fmt: skip


def _ep_rank(
    rank: int, world_size: int, checkpoint: str, texts: list[bytes]
) -> list[tuple[int, ...]]:
    torch.set_num_threads(1)
    info = ProcessInfo(rank=rank, world_size=world_size, local_rank=rank, local_world_size=2)
    completions = run_generate(_config(Path(checkpoint), texts, 10), info)
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
