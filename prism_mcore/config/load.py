"""YAML + dotted command-line overrides -> a validated `PrismConfig`, or a one-line `ConfigError`.

A YAML file may name a `base:` file (relative to itself) whose values it overrides, so cluster
configs share one body. Overrides look like `optim.lr=1e-6` or `parallel.sequence_parallel=true`;
their values are parsed as YAML scalars/lists.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from prism_mcore.config.hf import fill_from_hf
from prism_mcore.config.schema import PrismConfig, layout_problems


class ConfigError(ValueError):
    """A config problem, phrased in one line that names the key and its constraint."""

    exit_code = 2


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: base: cycle through {' -> '.join(map(str, seen))}")
    if path.is_dir():
        raise ConfigError(f"config {path}: is a directory, expected a YAML file")
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"config {path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None and path.is_file():
        # An empty (or all-comment) file is a truncated or wrong file, not "all defaults". /dev/null, which
        # is not a regular file, stays the way to say "no file, everything from overrides".
        raise ConfigError(f"config {path}: empty file, expected a mapping of sections (model:, trainer:, ...)")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return deep_merge(_read_yaml(path.parent / base, seen + (path,)), data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(tree: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. optim.lr=1e-6")
    parts = key.strip().split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float) and value != value:
        return ".nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return ".inf" if value > 0 else "-.inf"
    return repr(value)


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"config error: unknown key {key}"
    msg = first["msg"].removeprefix("Value error, ")
    if not key:  # a cross-field check from PrismConfig._check_layout names its keys itself
        return f"config error: {msg}"
    got = first.get("input")
    # YAML spelling for the scalars YAML spells differently from Python (a user typed `true`, not `True`)
    shown = "" if isinstance(got, (dict, list)) else f"={_yaml_scalar(got)}"
    return f"config error: {key}{shown}: {msg}"


def build_config(tree: dict[str, Any]) -> PrismConfig:
    try:
        if isinstance(tree.get("model"), dict):
            tree = {**tree, "model": fill_from_hf(tree["model"])}
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"config error: model.hf_path: {e}") from None
    disc = tree.get("discriminator")
    try:
        if isinstance(disc, dict) and isinstance(disc.get("model"), dict):
            tree = {**tree, "discriminator": {**disc, "model": fill_from_hf(disc["model"])}}
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"config error: discriminator.model.hf_path: {e}") from None
    try:
        return PrismConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> PrismConfig:
    tree = _read_yaml(Path(path)) if path else {}
    for o in overrides:
        apply_override(tree, o)
    return build_config(tree)


def check_world_size(cfg: PrismConfig, world_size: int) -> None:
    """Re-check the layout against the launcher's real rank count (unknown when the YAML was written)."""
    problems = layout_problems(cfg, world_size)
    if problems:
        raise ConfigError(f"config error: {problems[0]}")
