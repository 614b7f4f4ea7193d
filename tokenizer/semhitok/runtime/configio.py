"""Run configs: YAML ↔ nested frozen dataclasses, strict, with `a.b.c=value` command-line overrides.

Unknown keys, missing required keys and values of the wrong type fail with the dotted key in the message, so a
typo in a YAML file or on the command line never silently trains the wrong thing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match its dataclass."""


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) → plain dict/list/scalars, ready for JSON or YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from `data` strictly: unknown or missing keys and wrong types raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {[_join(where, k) for k in unknown]} for {cls.__name__}; valid: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in data and _required(f)]
    if missing:
        raise ConfigError(f"missing key(s) {[_join(where, k) for k in missing]} for {cls.__name__}")
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check/convert one value against a type hint (dataclass, Optional/Union, Literal, tuple, list, dict, scalar)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(args, value, where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list, Sequence):
        return _coerce_sequence(tp, origin, args, value, where)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    return _coerce_scalar(tp, value, where)


def _coerce_union(args: tuple, value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(arg, value, where)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(f"{where}: {value!r} matches none of the allowed types ({'; '.join(errors)})")


def _coerce_sequence(tp: Any, origin: Any, args: tuple, value: Any, where: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    item = args[0] if args else Any
    items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `5e-5` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b=value` strings to a nested dict (values parsed as YAML: `1e-4`, `true`, `[1, 2]`)."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section of the config")
            node = node[part]
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), base: T | None = None) -> T:
    """`cls` from a YAML file (merged over `base`, if given) and command-line overrides, strictly validated."""
    data = to_dict(base) if base is not None else {}
    if path is not None:
        data = merge_dicts(data, read_yaml(Path(path)))
    return from_dict(cls, apply_overrides(data, overrides))


def read_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML run config as a dict, with inheritance: a top-level `base:` (a path relative to this file, or a list of
    them) names files whose contents are merged first, in order (each may have its own `base:`); this file's keys
    then override them key by key (`merge_dicts`). ConfigError names a missing file, bad YAML or an inheritance cycle."""
    path = Path(path)
    if not path.is_file():
        where = f" (base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    if path.resolve() in {p.resolve() for p in _chain}:
        raise ConfigError(f"{path}: `base:` cycle: {' -> '.join(str(p) for p in (*_chain, path))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: `base:` must be a file name or a list of file names, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = merge_dicts(merged, read_yaml(path.parent / base, (*_chain, path)))
    return merge_dicts(merged, data)


def merge_dicts(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def save_config(obj: Any, path: str | Path) -> None:
    """Write a dataclass config as JSON (`.json`) or YAML (anything else)."""
    path, data = Path(path), to_dict(obj)
    text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text)


def config_diff(a: Any, b: Any, ignore: Sequence[str] = (), where: str = "") -> list[str]:
    """Dotted keys whose values differ between two `to_dict` trees, as 'key: a vs b' (keys in `ignore` skipped)."""
    if where in ignore:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in config_diff(a.get(k), b.get(k), ignore, f"{where}.{k}" if where else k)]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def check_lr(key: str, lr: float) -> None:
    """A learning rate is a finite number > 0 (both trainers' configs)."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{key} must be a finite number > 0, got {lr}")
