"""Typed configs from YAML plus dotted command-line overrides.

Every config in Spacetime is a dataclass: a docstring under each field, validation in
``__post_init__``. This module only moves values between YAML, the command line and those
dataclasses; it holds no knowledge of any particular config. Precedence, lowest first:
dataclass defaults, the YAML files in the order given, then ``key.sub=value`` overrides.

    cfg = load_config(TrainConfig, "configs/demo/dit.yaml", ["model.num_layers=4"])
    cfg = load_config(TrainConfig, ["configs/demo/recipe-dit.yaml", "configs/demo/recipe-dit-finish.yaml"])
    save_config(cfg, out_dir / "config.yaml")

Type checking and unknown keys are OmegaConf's job (structured configs); value checks are the
dataclasses' own. Either way a bad config stops with a :class:`ConfigError` that names the
dotted key, the value and what is allowed, before anything runs.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot become a valid config."""


def load_config(
    schema: type[T],
    path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build ``schema`` from its defaults, then the YAML at ``path``, then dotted ``overrides``.

    ``path`` may be several files: each is merged over the ones before it, so a short file can state how
    one run differs from another's config (a fine-tuning stage over its base run) without copying it.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(schema)
    layers = []
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    for file in map(Path, paths):
        if not file.is_file():
            raise ConfigError(f"config file {str(file)!r} does not exist")
        try:
            layers.append(OmegaConf.load(file))
        except Exception as err:  # yaml.YAMLError and friends: say which file
            raise ConfigError(f"config file {str(file)!r} is not valid YAML: {err}") from err
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.num_layers=4")
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(_explain(err, schema)) from None
    return _build(schema, OmegaConf.to_container(merged, resolve=True), prefix="")


def _explain(err: Exception, schema: type) -> str:
    """Turn an OmegaConf merge error into one line: key, value, what is allowed."""
    from omegaconf.errors import ConfigKeyError

    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        parent_key, _, name = key.rpartition(".")
        cls = _field_type_at(schema, parent_key)
        allowed = ", ".join(f.name for f in dataclasses.fields(cls)) if cls else "?"
        return f"unknown config key {key!r}; valid keys here: {allowed}"
    value = getattr(err, "msg", str(err)).split("\n")[0]
    expected = _field_type_at(schema, key, want_type=True)
    return f"config key {key!r}: {value}" + (f" (expected {expected})" if expected else "")


def _field_type_at(schema: type, dotted: str, *, want_type: bool = False) -> Any:
    """The dataclass (or, with ``want_type``, the field type name) at a dotted key, else None."""
    cls: Any = schema
    parts = [p for p in dotted.split(".") if p]
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
        if want_type and i == len(parts) - 1:
            return getattr(cls, "__name__", str(cls))
    return cls if dataclasses.is_dataclass(cls) else None


def _build(cls: type[T], values: dict, *, prefix: str) -> T:
    """Instantiate nested dataclasses bottom-up so a validation error can name its dotted key."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        field_type = hints[f.name]
        if dataclasses.is_dataclass(field_type) and isinstance(value, dict):
            value = _build(field_type, value, prefix=f"{prefix}{f.name}.")
        elif typing.get_origin(field_type) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        where = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"{where}: {err}") from None


def from_dict(schema: type[T], values: dict) -> T:
    """Build a (nested) config dataclass from plain values, e.g. JSON, where tuples came back as lists."""
    return _build(schema, values, prefix="")


def to_dict(cfg: Any) -> dict:
    """A plain, JSON/YAML-serialisable dict of a (nested) config dataclass."""
    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically, so it can be loaded back with ``load_config``."""
    from data.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as temp:
        temp.write_text(config_to_yaml(cfg))
    return path
