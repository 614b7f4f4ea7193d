"""Strict YAML ↔ dataclass configs with command-line overrides."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from semhitok.runtime.configio import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass(frozen=True)
class Run:
    name: str
    kind: Literal["hierarchical", "flat"] = "hierarchical"
    steps: int = 10
    resume: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_round_trip_through_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    save_config(Run(name="a", optim=Optim(lr=2e-4)), path)
    run = load_config(Run, path, ["optim.lr=5e-5", "kind=flat", "resume=ckpt/last"])
    assert run == Run(name="a", kind="flat", resume="ckpt/last", optim=Optim(lr=5e-5))
    assert from_dict(Run, to_dict(run)) == run


def test_ints_become_floats_and_lists_tuples():
    run = from_dict(Run, {"name": "x", "optim": {"lr": 1, "betas": [0.5, 0.6]}})
    assert run.optim == Optim(lr=1.0, betas=(0.5, 0.6))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "optimm": {}}, r"unknown key\(s\) \['optimm'\]"),
        ({"name": "x", "optim": {"learning_rate": 1}}, r"unknown key\(s\) \['optim.learning_rate'\]"),
        ({}, r"missing key\(s\) \['name'\]"),
        ({"name": "x", "kind": "shared"}, r"kind: 'shared' is not one of"),
        ({"name": "x", "steps": "ten"}, r"steps: expected int"),
        ({"name": "x", "steps": True}, r"steps: expected int"),
        ({"name": "x", "optim": {"betas": [0.9]}}, r"optim.betas: expected 2 items"),
    ],
)
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Run, data)


def test_bad_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["lr"])
    with pytest.raises(ConfigError, match="'optim' is not a section"):
        apply_overrides({"optim": 1}, ["optim.lr=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, tmp_path / "bad.yaml")
