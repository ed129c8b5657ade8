"""The Hydra configs: every experiment composes into validated dataclasses; unknown keys
and bad values fail with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from launch.config import (
    CommConfig,
    Engine,
    RunConfig,
    TrainConfig,
    register_configs,
    to_run_config,
)
from moe.config import ModelConfig, dense_equivalent
from moe.data import DataConfig
from routing.config import CapacityKind, RouterKind, RoutingConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides))


def test_there_are_experiments() -> None:
    assert {"tiny", "demo"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    run = to_run_config(_compose(f"experiment={experiment}"))
    assert isinstance(run, RunConfig)
    assert isinstance(run.model, ModelConfig)
    assert isinstance(run.routing, RoutingConfig)
    assert isinstance(run.routing.router, RouterKind)
    assert isinstance(run.comm, CommConfig)
    assert isinstance(run.data, DataConfig)
    assert isinstance(run.train, TrainConfig)
    assert run.run_dir


@pytest.mark.parametrize(
    "group", ["model", "routing", "comm", "data", "train"], ids=lambda group: group
)
def test_every_group_preset_composes(group: str) -> None:
    for preset in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        extra = ["data.path=/tmp/texts"] if (group, preset) == ("data", "folder") else []
        run = to_run_config(_compose(f"{group}={preset}", *extra))
        assert isinstance(getattr(run, group), type(getattr(RunConfig(), group)))


def test_presets_mean_what_they_say() -> None:
    assert to_run_config(_compose("routing=bpr")).routing.capacity == CapacityKind.PRIORITY
    assert to_run_config(_compose("routing=dropless")).routing.capacity == CapacityKind.DROPLESS
    assert to_run_config(_compose("routing=sigma")).routing.router == RouterKind.SIGMA
    assert to_run_config(_compose("routing=task")).routing.router == RouterKind.TASK
    assert to_run_config(_compose("model=dense")).model.moe_layer_indices() == []
    prmoe = to_run_config(_compose("model=prmoe")).model
    assert prmoe.residual_mlp and prmoe.experts_per_block() == [4, 4, 8, 8]
    demo = to_run_config(_compose("experiment=demo"))
    assert demo.comm.ep_size == 2 and demo.data.source.value == "kjv"


def test_overrides_reach_the_dataclasses() -> None:
    run = to_run_config(
        _compose(
            "routing=bpr",
            "routing.capacity_factor=1.0",
            "train.engine=deepspeed",
            "train.zero_stage=2",
            "run_dir=/tmp/somewhere",
        )
    )
    assert run.routing.capacity_factor == 1.0
    assert run.train.engine == Engine.DEEPSPEED and run.train.zero_stage == 2
    assert run.run_dir == "/tmp/somewhere"


def test_hydra_writes_inside_run_dir() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=["run_dir=/tmp/x"], return_hydra_config=True)
    assert cfg.hydra.run.dir == "/tmp/x"
    assert cfg.hydra.output_subdir is None


@pytest.mark.parametrize(
    "override",
    ["model.nonexistent=1", "routing.capacity_factr=1.0", "train.stepz=10", "bogus=1"],
)
def test_unknown_keys_fail_in_hydra(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException, match=key.split(".")[-1]):
        _compose(override)


def test_forced_unknown_key_fails_in_our_validation() -> None:
    with pytest.raises(ValueError, match=r"train\.bar"):
        to_run_config(_compose("+train.bar=1"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("routing.router=softmax", r"routing\.router='softmax' is not one of: topk, sigma, task"),
        ("routing.capacity=some", r"routing\.capacity='some'"),
        ("train.engine=jax", r"train\.engine='jax' is not one of: torch, deepspeed"),
        ("train.zero_stage=3", r"train\.zero_stage=3"),
        ("train.steps=0", r"train\.steps=0"),
        ("train.min_lr=1.0", r"train\.min_lr=1\.0"),
        ("comm.alltoall=ring", r"comm\.alltoall='ring'"),
        ("comm.backend=mpi", r"comm\.backend='mpi'"),
        ("comm.ep_size=0", r"comm\.ep_size=0"),
        ("model.n_heads=3", r"n_heads=3"),
        ("data.source=web", r"source='web'"),
        ("wandb.mode=cloud", r"wandb\.mode='cloud'"),
        ("data=folder", r"data\.path"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_run_config(_compose(override))


def test_ill_typed_values_fail_in_hydra() -> None:
    with pytest.raises(ConfigCompositionException, match=r"train\.steps=abc"):
        _compose("train.steps=abc")


def test_plain_dict_builds_with_defaults() -> None:
    run = to_run_config({"train": {"steps": 5, "warmup_steps": 1}, "run_dir": "/tmp/r"})
    assert run.train.steps == 5 and run.model == ModelConfig()
    with pytest.raises(ValueError, match="unknown key"):
        to_run_config({"trian": {}})


def test_dense_preset_matches_small_at_equal_active_parameters() -> None:
    small = to_run_config(_compose("model=small", "routing=topk"))
    dense = to_run_config(_compose("model=dense")).model
    assert dense == dense_equivalent(small.model, small.routing.top_k)
