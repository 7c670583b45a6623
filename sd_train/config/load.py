"""Loading the run configuration: dataclass defaults < YAML file < `section.key=value` CLI overrides.

`load_config` rejects unknown keys (suggesting the closest known one), wrong types and YAML
syntax errors with a ConfigError naming the field or the file and line. The resolved config is
written next to the run with `dump_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from sd_train.config.launcher import read_launch_env
from sd_train.config.schema import TrainConfig
from sd_train.errors import ConfigError


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


# The spellings PyYAML reads as booleans (YAML 1.1; "y" and "n" stay strings).
_YAML_BOOLS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` (as resolved by get_type_hints)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], path)
        for tp_ in inner:  # `bool | int`: the first member the value is, in declared order
            try:
                return _coerce(value, tp_, path)
            except ConfigError:
                pass
        names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
        raise ConfigError(f"{path} must be {names}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and value not in args:
            # YAML 1.1 reads off/no/false (on/yes/true) as a boolean: `dist.memory_check=off` and
            # `mixed_precision: no` mean the choice spelled that way.
            spelled = [a for a in args if isinstance(a, str) and a.lower() in _YAML_BOOLS[value]]
            value = spelled[0] if len(spelled) == 1 else value
        if value not in args:
            raise ConfigError(f"{path}={value!r} is not one of {list(args)}: set {path} to one of them")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}: write it as [a, b, ...]")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} is a section; give it as a mapping of its keys, got {value!r}")
        return _build(tp, value, path + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp}")  # a bug in this file, not the user's


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    known = _fields(cls)
    hints = typing.get_type_hints(cls)
    for key in values:
        if not isinstance(key, str):
            # YAML reads `1:`, `yes:`, `null:` or `2024-01-01:` as a number, bool, None or date.
            raise ConfigError(
                f"config key {prefix}{key!r} is a {type(key).__name__}, not a name: YAML read it as a value. "
                f"Keys are field names ({', '.join(sorted(known)[:4])}, ...); quote it if it is meant as text"
            )
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" Did you mean {prefix}{close[0]}?" if close else f" Known keys: {sorted(known)}."
            raise ConfigError(f"unknown config key {prefix}{key}.{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {k} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=1 c=x` -> nested dict. Values are parsed as YAML, so `lr=1e-4`, `flag=true`,
    `prompts=[a, b]` and `step_start_ema=null` all work."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """`YAML syntax error at line L, column C: <problem>` (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is None:
        return f"YAML syntax error: {problem}"
    return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_config(path: Optional[str], overrides: list[str] = ()) -> TrainConfig:
    """Defaults < YAML at `path` < overrides. Raises ConfigError on unknown keys, bad types or a YAML
    syntax error (naming the file and line)."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file. Pick one from configs/")
        with open(p) as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"--config {path}: {_yaml_problem(e)}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of keys")
        tree = loaded
    tree = _merge(tree, parse_overrides(list(overrides)))
    return _build(TrainConfig, tree)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def env_world_size() -> int:
    """World size as set by torchrun / accelerate launch or srun, before any process group exists
    (raises ConfigError for a SLURM job of several tasks with no rendezvous)."""
    return read_launch_env(os.environ).world_size
