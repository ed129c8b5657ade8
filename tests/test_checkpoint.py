"""Checkpoints: round trip, atomic publication, corrupt/missing files, resharding across
expert-parallel sizes (simulated ranks and real gloo ranks), optimizer state, pruning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_utils import run_distributed, values_or_raise
from torch import nn

import moe.checkpoint.save as checkpoint_save
from moe.checkpoint import (
    LATEST_FILE,
    begin_checkpoint,
    decode_state,
    encode_state,
    expert_file,
    finalize_checkpoint,
    load_checkpoint,
    read_meta,
    resolve_latest,
    save_checkpoint,
    verify_checkpoint,
    write_checkpoint_shard,
)
from moe.config import ModelConfig
from moe.experts import GroupedExperts
from moe.transformer import MoETransformer
from routing import CapacityKind, RoutingConfig

torch.set_num_threads(1)

D, H, E = 8, 6, 8  # model width, expert hidden width, global experts per layer


class ShardedToy(nn.Module):
    """Two MoE layers of real `GroupedExperts` holding experts offset..offset+count-1 of E,
    a dense projection, and an embedding tied to the output head (as in the LM)."""

    def __init__(self, offset: int, count: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, D)
        self.layers = nn.ModuleList(
            GroupedExperts(
                count, D, H, "swiglu" if i else "gelu", expert_ids=range(offset, offset + count)
            )
            for i in range(2)
        )
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens_T: torch.Tensor) -> torch.Tensor:
        """Every token through every local expert (summed): uses all expert weights."""
        x_TD = self.proj(self.embed(tokens_T))
        for experts in self.layers:
            x_TD = x_TD + sum(experts.expert_forward(x_TD, e) for e in range(experts.num_experts))
        return self.head(x_TD)


def full_model(seed: int) -> ShardedToy:
    torch.manual_seed(seed)
    return ShardedToy(0, E)


def shard_of(full: ShardedToy, offset: int, count: int) -> ShardedToy:
    """Rank holding experts offset..offset+count-1 of `full`, dense weights replicated."""
    shard = ShardedToy(offset, count)
    state = {
        key: value[offset : offset + count] if key.startswith("layers.") else value
        for key, value in full.state_dict().items()
    }
    shard.load_state_dict(state)
    return shard


def save_as_ranks(
    directory: Path, full: ShardedToy, ranges: list[tuple[int, int]], step: int
) -> Path:
    """Simulate a distributed save: each 'rank' writes its shard, rank 0 finalizes."""
    temp = begin_checkpoint(directory, step)
    manifests = [
        write_checkpoint_shard(temp, shard_of(full, offset, count), rank=rank)
        for rank, (offset, count) in enumerate(ranges)
    ]
    return finalize_checkpoint(temp, manifests, step=step, config={"ep": len(ranges)})


def assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    got, expected = model.state_dict(), reference.state_dict()
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.equal(got[key], expected[key]), key


def test_round_trip_weights_extra_and_layout(tmp_path: Path) -> None:
    model = full_model(0)
    extra = {"sampler": {"step": 7, "seed": 3}, "rng": torch.get_rng_state(), "loss": 1.5}
    path = save_checkpoint(tmp_path, model, None, 7, {"lr": 0.1, "layers": [1, 2]}, extra)
    assert path == tmp_path / "step_7" and resolve_latest(tmp_path) == path
    fresh = full_model(1)
    loaded = load_checkpoint(path, fresh)
    assert_same_weights(fresh, model)
    assert fresh.head.weight is fresh.embed.weight  # the tie survives loading
    assert loaded.step == 7 and loaded.config == {"lr": 0.1, "layers": [1, 2]}
    assert loaded.extra["sampler"] == {"step": 7, "seed": 3} and loaded.extra["loss"] == 1.5
    assert torch.equal(loaded.extra["rng"], extra["rng"])
    meta = verify_checkpoint(path)
    assert meta["moe_layers"] == [
        {"index": i, "module": f"layers.{i}", "num_experts": E,
         "expert_ids": list(range(E)), "quantization": "none"}
        for i in range(2)
    ]  # fmt: skip
    assert meta["world_size"] == 1 and meta["ep_size"] == 1
    assert (path / expert_file(1, 7)).is_file() and not (path / expert_file(1, 8)).exists()
    tokens = torch.randint(0, 16, (5,))
    assert torch.equal(fresh(tokens), model(tokens))


def test_transformer_round_trip_gives_the_same_outputs(tmp_path: Path) -> None:
    config = ModelConfig(
        d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16, ffn_hidden=24,
        expert_hidden=8, num_experts=4, moe_every=2, residual_mlp=True,
    )  # fmt: skip
    routing = RoutingConfig(top_k=2, capacity=CapacityKind.DROPLESS)
    model = MoETransformer(config, routing, seed=0)
    path = save_checkpoint(tmp_path, model, None, 3, {})
    fresh = MoETransformer(config, routing, seed=1)
    tokens_BT = torch.randint(0, 256, (2, 10))
    assert not torch.equal(fresh(tokens_BT).logits_BTV, model(tokens_BT).logits_BTV)
    load_checkpoint(path, fresh)
    assert torch.equal(fresh(tokens_BT).logits_BTV, model(tokens_BT).logits_BTV)


def test_optimizer_state_round_trip_continues_identically(tmp_path: Path) -> None:
    model = full_model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    tokens = torch.randint(0, 16, (6,))
    for _ in range(2):
        optimizer.zero_grad()
        model(tokens).square().mean().backward()
        optimizer.step()
    path = save_checkpoint(tmp_path, model, optimizer.state_dict(), 2, {})
    resumed = full_model(5)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.5)
    loaded = load_checkpoint(path, resumed, load_optimizer=True)
    assert loaded.optimizer_state is not None
    resumed_optimizer.load_state_dict(loaded.optimizer_state)
    assert resumed_optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    for net, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        opt.zero_grad()
        net(tokens).square().mean().backward()
        opt.step()
    assert_same_weights(resumed, model)


def test_encode_state_round_trip_and_rejects_objects() -> None:
    state = {
        0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3)},
        "g": [(0.9, 0.99), None, "x", True],
    }
    tensors: dict[str, torch.Tensor] = {}
    encoded = json.loads(json.dumps(encode_state(state, tensors)))
    decoded = decode_state(encoded, tensors)
    assert list(decoded) == [0, "g"] and decoded["g"] == [(0.9, 0.99), None, "x", True]
    assert torch.equal(decoded[0]["m"], state[0]["m"]) and decoded[0]["step"].item() == 3.0
    nested: dict[str, Any] = {"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}}
    tensors = {}
    decoded = decode_state(encode_state(nested, tensors), tensors)
    assert decoded["a/b"].item() == 0.0 and decoded["a"]["b"].item() == 1.0
    with pytest.raises(ValueError, match=r"'/g/1'.*type object"):
        encode_state({"g": [1, object()]}, {})


def test_crash_mid_write_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = save_checkpoint(tmp_path, full_model(0), None, 1, {})
    real_save = checkpoint_save.save_tensors

    def crash_on_an_expert(root: Path, relative: str, tensors: dict[str, torch.Tensor]) -> str:
        if relative == expert_file(1, 3):
            raise OSError("disk full (simulated)")
        return real_save(root, relative, tensors)

    monkeypatch.setattr(checkpoint_save, "save_tensors", crash_on_an_expert)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, full_model(1), None, 2, {})
    assert not (tmp_path / "step_2").exists()
    assert resolve_latest(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step_1"]
    # A crash after the rename but before `latest` moved: step_2 is whole, latest is old.
    monkeypatch.setattr(checkpoint_save, "save_tensors", real_save)
    real_write = checkpoint_save.write_bytes

    def crash_on_latest(path: Path, data: bytes) -> None:
        if path.name == LATEST_FILE:
            raise OSError("killed (simulated)")
        real_write(path, data)

    monkeypatch.setattr(checkpoint_save, "write_bytes", crash_on_latest)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, full_model(1), None, 2, {})
    assert resolve_latest(tmp_path) == first
    verify_checkpoint(tmp_path / "step_2")
    # The resumed run saves step 2 again: it replaces the old one whole.
    monkeypatch.setattr(checkpoint_save, "write_bytes", real_write)
    model = full_model(2)
    second = save_checkpoint(tmp_path, model, None, 2, {})
    assert resolve_latest(tmp_path) == second
    fresh = full_model(3)
    load_checkpoint(second, fresh)
    assert_same_weights(fresh, model)


def test_corrupt_and_missing_files_are_named(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, full_model(0), None, 1, {})
    victim = path / expert_file(0, 5)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{victim}.*corrupt"):
        load_checkpoint(path, full_model(1))
    with pytest.raises(ValueError, match=f"{victim}.*corrupt"):
        verify_checkpoint(path)
    victim.unlink()
    with pytest.raises(ValueError, match=f"{victim}.*missing"):
        load_checkpoint(path, full_model(1))
    # A model holding only experts 0..3 never reads expert 5: it loads.
    load_checkpoint(path, ShardedToy(0, 4))
    (path / "dense.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"dense\.safetensors.*corrupt"):
        load_checkpoint(path, ShardedToy(0, 4))
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta\.json.*corrupt"):
        load_checkpoint(path, full_model(1))
    (path / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"meta\.json is missing"):
        load_checkpoint(path, full_model(1))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_latest(tmp_path)
    assert resolve_latest(tmp_path / "nothing_here") is None


@pytest.mark.parametrize("ranges", [[(0, 4), (4, 4)], [(0, 8)]], ids=["ep2", "ep1"])
def test_save_at_ep4_loads_at_smaller_ep(tmp_path: Path, ranges: list[tuple[int, int]]) -> None:
    full = full_model(0)
    path = save_as_ranks(tmp_path, full, [(0, 2), (2, 2), (4, 2), (6, 2)], step=5)
    meta = read_meta(path)
    assert meta["world_size"] == 4 and meta["ep_size"] == 4
    assert [layer["num_experts"] for layer in meta["moe_layers"]] == [E, E]
    tokens = torch.randint(0, 16, (7,))
    for offset, count in ranges:
        torch.manual_seed(99)
        target = ShardedToy(offset, count)
        load_checkpoint(path, target)
        assert_same_weights(target, shard_of(full, offset, count))
    if ranges == [(0, 8)]:
        assert torch.equal(target(tokens), full(tokens))


def test_save_at_ep1_loads_at_ep4(tmp_path: Path) -> None:
    full = full_model(0)
    path = save_checkpoint(tmp_path, full, None, 1, {})
    for offset in range(0, E, 2):
        target = ShardedToy(offset, 2)
        load_checkpoint(path, target)
        assert_same_weights(target, shard_of(full, offset, 2))
    with pytest.raises(ValueError, match=r"holds experts \[6, 7, 8, 9\]"):
        load_checkpoint(path, ShardedToy(6, 4))
    wider = ShardedToy(0, E)
    wider.proj = nn.Linear(D, 2 * D)
    with pytest.raises(ValueError, match=r"proj\.weight: \(8, 8\) vs model \(16, 8\)"):
        load_checkpoint(path, wider)


def test_optimizer_state_needs_the_same_layout(tmp_path: Path) -> None:
    full = full_model(0)
    temp = begin_checkpoint(tmp_path, 1)
    manifests = []
    for rank, offset in enumerate((0, 4)):
        shard = shard_of(full, offset, 4)
        state = {"rank": rank, "moment": torch.full((2,), float(rank))}
        manifests.append(write_checkpoint_shard(temp, shard, state, rank=rank))
    path = finalize_checkpoint(temp, manifests, step=1, config={})
    loaded = load_checkpoint(path, ShardedToy(4, 4), load_optimizer=True, rank=1, world_size=2)
    assert loaded.optimizer_state is not None and loaded.optimizer_state["rank"] == 1
    assert torch.equal(loaded.optimizer_state["moment"], torch.ones(2))
    untouched = full_model(1)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(ValueError, match="does not reshard"):
        load_checkpoint(path, untouched, load_optimizer=True, rank=0, world_size=1)
    assert all(torch.equal(v, before[k]) for k, v in untouched.state_dict().items())
    load_checkpoint(path, full_model(1))  # weights alone reshard


def test_data_parallel_replicas_and_bad_layouts(tmp_path: Path) -> None:
    full = full_model(0)
    # EP=2 x DP=2: ranks 0 and 2 hold experts 0..3, ranks 1 and 3 hold 4..7.
    path = save_as_ranks(tmp_path, full, [(0, 4), (4, 4), (0, 4), (4, 4)], step=1)
    meta = read_meta(path)
    assert meta["world_size"] == 4 and meta["ep_size"] == 2
    target = full_model(1)
    load_checkpoint(path, target)
    assert_same_weights(target, full)

    temp = begin_checkpoint(tmp_path, 2)
    diverged = shard_of(full, 0, 4)
    with torch.no_grad():
        diverged.layers[0].w1_EDH[1] += 1.0
    manifests = [
        write_checkpoint_shard(temp, shard_of(full, 0, 4), rank=0),
        write_checkpoint_shard(temp, diverged, rank=1),
        write_checkpoint_shard(temp, shard_of(full, 4, 4), rank=2),
    ]
    with pytest.raises(ValueError, match="replicas diverged"):
        finalize_checkpoint(temp, manifests, step=2, config={})
    temp = begin_checkpoint(tmp_path, 3)
    gap = [write_checkpoint_shard(temp, shard_of(full, o, 2), rank=r) for r, o in enumerate((0, 4))]
    with pytest.raises(ValueError, match="do not tile"):
        finalize_checkpoint(temp, gap, step=3, config={})
    assert not (tmp_path / "step_2").exists() and not (tmp_path / "step_3").exists()
    assert resolve_latest(tmp_path) == path


def test_keep_last_prunes_old_steps(tmp_path: Path) -> None:
    model = full_model(0)
    for step in range(1, 5):
        save_checkpoint(tmp_path, model, None, step * 10, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step_30", "step_40"]
    assert resolve_latest(tmp_path) == tmp_path / "step_40"
    with pytest.raises(ValueError, match="keep_last=0"):
        save_checkpoint(tmp_path, model, None, 50, {}, keep_last=0)
    assert resolve_latest(tmp_path) == tmp_path / "step_40"
    assert not (tmp_path / "step_50").exists()


def _distributed_saves(rank: int, world_size: int, directory: str) -> dict[str, str]:
    """A good save, then one where rank 1's optimizer state cannot be written."""
    import torch.distributed as dist

    full = full_model(0)
    count = E // world_size
    shard = shard_of(full, rank * count, count)
    group = dist.new_group(list(range(world_size)))
    path = save_checkpoint(directory, shard, {"rank": rank}, 4, {"w": world_size}, group=group)
    bad_state: dict[str, Any] = {"rank": rank, "bad": object() if rank == 1 else None}
    try:
        save_checkpoint(Path(directory) / "failing", shard, bad_state, 4, {}, group=group)
    except (ValueError, RuntimeError) as error:
        return {"path": str(path), "error": f"{type(error).__name__}: {error}"}
    return {"path": str(path), "error": ""}


@pytest.mark.distributed
def test_distributed_save_with_a_group_loads_at_ep1(tmp_path: Path) -> None:
    results = values_or_raise(run_distributed(_distributed_saves, 2, str(tmp_path)))
    assert [r["path"] for r in results] == [str(tmp_path / "step_4")] * 2
    target = full_model(1)
    loaded = load_checkpoint(tmp_path / "step_4", target)
    assert_same_weights(target, full_model(0))
    assert loaded.meta["world_size"] == 2 and loaded.config == {"w": 2}
    # Every rank raised: rank 1 its own error, rank 0 an error naming rank 1.
    assert results[1]["error"].startswith("ValueError") and "'/bad'" in results[1]["error"]
    assert results[0]["error"].startswith("RuntimeError") and "rank 1" in results[0]["error"]
    assert not (tmp_path / "failing" / "step_4").exists()
    assert resolve_latest(tmp_path / "failing") is None


def _lm_setup() -> tuple[ModelConfig, RoutingConfig, torch.Tensor]:
    config = ModelConfig(
        d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16, ffn_hidden=24,
        expert_hidden=8, num_experts=4, moe_every=1,
    )  # fmt: skip
    routing = RoutingConfig(top_k=2, capacity=CapacityKind.DROPLESS)
    tokens_BT = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    return config, routing, tokens_BT


def _reshard_on_four_ranks(
    rank: int, world_size: int, ep1: str, ep4_directory: str
) -> list[torch.Tensor]:
    """On 4 ranks: load the EP=1 checkpoint at EP=4 and save it from there; then load that
    at EP=2 (x 2 data-parallel replicas). Models are built with other weights (seed 7)
    before loading. Returns the logits at EP=4 and at EP=2."""
    from comm.topology import Topology, build_process_groups
    from moe.dispatchers import ExpertParallelDispatcher

    config, routing, tokens_BT = _lm_setup()
    logits = []
    for ep_size, source in ((4, ep1), (2, f"{ep4_directory}/step_2")):
        groups = build_process_groups(Topology(world_size, world_size, ep_size))
        model = MoETransformer(
            config, routing, lambda b, n, g=groups: ExpertParallelDispatcher(n, g), seed=7
        )
        load_checkpoint(source, model)
        if ep_size == 4:
            save_checkpoint(ep4_directory, model, None, 2, {}, group=groups.world)
        with torch.no_grad():
            logits.append(model(tokens_BT).logits_BTV)
    return logits


@pytest.mark.distributed
@pytest.mark.slow
def test_transformer_saved_at_ep4_gives_the_same_outputs_at_ep2_and_ep1(tmp_path: Path) -> None:
    config, routing, tokens_BT = _lm_setup()
    reference = MoETransformer(config, routing, seed=0)
    with torch.no_grad():
        expected = reference(tokens_BT).logits_BTV
    ep1 = save_checkpoint(tmp_path / "ep1", reference, None, 1, {})
    results = values_or_raise(
        run_distributed(_reshard_on_four_ranks, 4, str(ep1), str(tmp_path / "ep4"))
    )
    ep4 = tmp_path / "ep4" / "step_2"
    assert read_meta(ep4)["ep_size"] == 4 and len(list((ep4 / "experts").iterdir())) == 8
    for logits in (logits for per_rank in results for logits in per_rank):
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    at_ep1 = MoETransformer(config, routing, seed=7)
    load_checkpoint(ep4, at_ep1)
    assert_same_weights(at_ep1, reference)
    with torch.no_grad():
        assert torch.equal(at_ep1(tokens_BT).logits_BTV, expected)
