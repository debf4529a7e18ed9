"""YAML or a dict -> a frozen dataclass, checked: the parsing every config section uses.

``from_dict`` / ``load_as`` reject unknown keys, wrong types and impossible values with a
``ConfigError`` whose text names the dotted field and what would be valid. A section may give
short forms through a ``shorthand(data, path)`` static method (``topology: ring``), and a field
whose class its value names through ``field(metadata={"section": choose})`` (``task: {kind: ...}``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml


class ConfigError(ValueError):
    """A bad config value: ``field`` is the dotted path, ``message`` what would be valid."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message = field, message

    def __reduce__(self):  # crosses process boundaries (raised in a Ray actor, shown here)
        return type(self), (self.field, self.message)

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.message)


def require(ok: bool, name: str, message: str) -> None:
    """Raise ``ConfigError(name, message)`` unless ``ok``: the check every section's
    ``__post_init__`` makes, tasks' sections included."""
    if not ok:
        raise ConfigError(name, message)


def load_as(cls: type, source: str | Path | Mapping[str, Any],
            overrides: list[str] | None = None) -> Any:
    """Read a YAML file (safe loader) or a mapping, apply ``key.path=value`` overrides, and
    validate into the dataclass ``cls``.

    Raises:
        ConfigError: naming the field (or the file) and what would be valid.
    """
    data = read_yaml(source) if isinstance(source, (str, Path)) else dict(source)
    for item in overrides or []:
        data = apply_override(data, item)
    return from_dict(cls, data)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (YAML lets the last
    win silently, so a duplicated ``lora:`` section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with file-level errors as ConfigError (``FILE:LINE`` where
    YAML says where)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "no such config file")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(where, f"not valid YAML ({what})") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must hold a YAML mapping of config keys")
    return data


def apply_override(data: dict[str, Any], item: str) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b.c=value`` set; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError("--set", f"expected key.path=value, got {item!r}")
    value = yaml.safe_load(raw) if raw else None
    out = dict(data)
    node = out
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and part in ("topology", "mixing", "task"):
            child = {"name" if part == "topology" else ("scheme" if part == "mixing" else "kind"): child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a section; cannot set a key under it")
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value
    return out


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and types; errors name the field."""
    shorthand = getattr(cls, "shorthand", None)
    if shorthand is not None:  # a section's short forms, e.g. ``topology: ring``
        data = shorthand(data, path)
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(_join(path, str(key)), f"unknown key; valid: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], _join(path, name), cls, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise (e.under(path) if path else e) from None


def _coerce(value: Any, tp: Any, path: str, owner: type, name: str) -> Any:
    section = _field(owner, name).metadata.get("section")
    if section is not None:  # a section whose class the value names, e.g. ``task: {kind: clip}``
        return from_dict(section(value, path), {"kind": value} if isinstance(value, str)
                         else value, path)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path, owner, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"got {value!r}; valid: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(path, f"expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]", owner, name) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list, dict) or tp is Any:
        if origin is list and not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {value!r}")
        if origin is dict and not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return value
    return _scalar(value, tp, path)


def _field(owner: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(owner) if f.name == name)


def _scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {path} has unsupported type {tp!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}")


def require_name(value: str | None, field: str) -> None:
    """A run's or sweep's name becomes one folder: one safe path component (letters, digits and
    ``_ . = + -``, not starting with a dot or dash), never a path that could leave its parent."""
    require(value is None or (isinstance(value, str) and NAME.fullmatch(value) is not None),
            field, f"{value!r} is not a name: use letters, digits and _ . = + - (no '/', no "
            "leading '.' or '-', at most 128 characters)")


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """The first dotted key where two plain config dicts differ, as ``key: old -> new``."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path}: {a!r} -> {b!r}"
