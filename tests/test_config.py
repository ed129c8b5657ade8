"""The Hydra configs: every experiment composes into validated dataclasses; unknown keys
and bad values fail with errors that name the key."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from launch.config import (
    RunConfig,
    TrainingEngineKind,
    register_configs,
    to_run_config,
)
from moe.config import ModelConfig, dense_equivalent
from routing.config import CapacityKind, RouterKind

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides))


def _yaml(path: Path) -> dict[str, Any]:
    """The keys a config file sets itself (its `defaults` list left out)."""
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(values, dict)
    values.pop("defaults", None)
    return values


def _defaults(path: Path) -> dict[str, str]:
    """`group: preset` of a defaults list (`override /group: preset` too)."""
    chosen: dict[str, str] = {}
    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
        if isinstance(entry, dict):
            ((key, preset),) = entry.items()
            group = key.removeprefix("override ").strip("/")
            if "/" not in group and preset is not None:
                chosen[group] = preset
    return chosen


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _assert_loaded(section: object, expected: dict[str, Any], where: str) -> None:
    """Every key in `expected` reached `section` with that value (`???` is skipped)."""
    assert expected, where
    for key, value in expected.items():
        if value == "???":
            continue
        assert hasattr(section, key), f"{where}.{key} is not a field"
        assert _plain(getattr(section, key)) == value, f"{where}.{key}"


def test_there_are_experiments() -> None:
    assert {"tiny", "demo"} <= set(EXPERIMENTS)


# A few values spelt out, so that the YAML-driven checks below are not the only word.
KNOWN = {
    "tiny": {
        "run_dir": "runs/tiny",
        "model.d_model": 64,
        "model.num_experts": 4,
        "routing.top_k": 2,
        "comm.ep_size": 1,
        "data.source": "synthetic",
        "train.steps": 60,
    },
    "demo": {
        "run_dir": "runs/demo",
        "model.d_model": 128,
        "model.num_experts": 8,
        "comm.ep_size": 2,
        "data.source": "kjv",
        "train.steps": 600,
        "train.warmup_steps": 50,
        "train.sample_prompt": "And God said, ",
    },
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    run = to_run_config(_compose(f"experiment={experiment}"))
    assert isinstance(run, RunConfig)
    assert isinstance(run.routing.router, RouterKind)
    for dotted, value in KNOWN.get(experiment, {}).items():
        *sections, key = dotted.split(".")
        section = getattr(run, sections[0]) if sections else run
        assert _plain(getattr(section, key)) == value, f"{experiment}: {dotted}"
    # The presets it picks (over the root config's), then what it sets itself on top.
    root = _yaml(CONF / "config.yaml")
    own = _yaml(CONF / "experiment" / f"{experiment}.yaml")
    presets = {
        **_defaults(CONF / "config.yaml"),
        **_defaults(CONF / "experiment" / f"{experiment}.yaml"),
    }
    for group, preset in presets.items():
        expected = {**_yaml(CONF / group / f"{preset}.yaml"), **own.get(group, {})}
        _assert_loaded(getattr(run, group), expected, f"{experiment}: {group}={preset}")
    for key, value in {**root, **own}.items():
        if key == "hydra" or key in presets:
            continue
        if isinstance(value, dict):
            _assert_loaded(getattr(run, key), {**root.get(key, {}), **value}, experiment)
        else:
            assert getattr(run, key) == value, f"{experiment}: {key}"


@pytest.mark.parametrize(
    "group", ["model", "routing", "comm", "data", "train"], ids=lambda group: group
)
def test_every_group_preset_composes(group: str) -> None:
    presets = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert presets
    for preset in presets:
        needs_path = group == "data" and preset in ("folder", "jsonl", "parquet")
        extra = ["data.path=/tmp/texts"] if needs_path else []
        run = to_run_config(_compose(f"{group}={preset}", *extra))
        section = getattr(run, group)
        assert isinstance(section, type(getattr(RunConfig(), group)))
        _assert_loaded(section, _yaml(CONF / group / f"{preset}.yaml"), f"{group}={preset}")
        if extra:
            assert str(section.path) == "/tmp/texts"


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
    assert run.train.engine == TrainingEngineKind.DEEPSPEED and run.train.zero_stage == 2
    assert run.run_dir == "/tmp/somewhere"


def test_hydra_writes_inside_run_dir() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=["run_dir=/tmp/x"], return_hydra_config=True)
    assert cfg.hydra.run.dir == "/tmp/x"
    assert cfg.hydra.output_subdir is None


@pytest.mark.parametrize(
    "override",
    [
        "model.nonexistent=1",
        "routing.capacity_factr=1.0",
        "routing.top_kk=2",
        "train.stepz=10",
        "bogus=1",
        # A misspelt group key and a misspelt group name: the whole key is named.
        "model.d_modle=3",
        "trian.steps=10",
        "rooting=topk",
    ],
)
def test_unknown_keys_fail_in_hydra(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException, match=f"'{re.escape(key)}'"):
        _compose(override)


def test_unknown_preset_fails_in_hydra_naming_it() -> None:
    with pytest.raises(ConfigCompositionException, match=r"'routing/topkk'"):
        _compose("routing=topkk")


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
