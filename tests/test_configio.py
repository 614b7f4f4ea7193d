"""Strict YAML ↔ dataclass configs with command-line overrides."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from semhitok.runtime.configio import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    read_yaml,
    save_config,
    to_dict,
)


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


def test_base_inheritance_merges_bases_in_order_then_the_file(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "common.yaml").write_text("model: {width: 8, depth: 2}\ntrain: {lr: 0.1, steps: 5}\n")
    (tmp_path / "parts" / "stage.yaml").write_text("base: common.yaml\ntrain: {steps: 50, stage: b}\n")
    (tmp_path / "family.yaml").write_text("model: {width: 16}\n")
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text("base: [parts/stage.yaml, family.yaml]\ntrain: {lr: 0.5}\n")
    assert read_yaml(leaf) == {"model": {"width": 16, "depth": 2}, "train": {"lr": 0.5, "steps": 50, "stage": "b"}}


def test_base_errors_name_the_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"`base:` cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        read_yaml(a)
    b.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.yaml \(base of .*b\.yaml\)"):
        read_yaml(a)
    b.write_text("base: {x: 1}\n")
    with pytest.raises(ConfigError, match="`base:` must be a file name or a list of file names"):
        read_yaml(a)
