"""Dataclass configs loaded from YAML, with unknown keys rejected.

Every config in bevperc is a plain ``@dataclass`` tree. A reader finds what a field does
by following imports to the dataclass that declares it; there is no registry and no
string-to-class indirection.

    cfg = load_config(Config, "configs/demo.yaml", overrides=["train.epochs=3"])

Rules:
  * a YAML key that is not a field of the dataclass raises ``ConfigError`` naming the
    file, the dotted key and the valid keys;
  * values are type-checked against the annotations (int, float, bool, str, Optional,
    list/tuple of those, nested dataclasses, dicts);
  * ``overrides`` are ``dotted.key=value`` strings, the value parsed as YAML;
  * numbers are read the YAML 1.2 way: ``1e-3`` and ``1e9`` are floats (PyYAML's YAML 1.1
    rules make them strings), in files and overrides alike;
  * a renamed field keeps its old spelling as an alias: ``field(..., metadata={"aliases": ["old"]})``.
    ``old`` is read as the field in files, mappings and overrides (an override in either spelling
    replaces the file's value in either spelling); one mapping that gives both spellings raises
    ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not match the config dataclasses."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats without a dot (``1e-3``, ``-2E+5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to annotation ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, args[i] if args else Any, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, f"{where}.<key>"): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _aliases(cls: type) -> dict[str, str]:
    """``{old spelling: field name}`` of dataclass ``cls`` (``metadata={"aliases": [...]}`` of its fields)."""
    return {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("aliases", ())}


def _with_field_names(cls: type, data: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """``data`` with the old spellings of ``cls``'s fields renamed to the fields; both given is an error."""
    aliases = {old: name for old, name in _aliases(cls).items() if old in data}
    for old, name in aliases.items():
        if name in data:
            raise ConfigError(f"{where or '<root>'}: both {old!r} (the old spelling) and {name!r} are given "
                              f"for {cls.__name__}.{name}; keep only {name!r}")
    return {aliases.get(key, key): value for key, value in data.items()} if aliases else data


def _build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    data = _with_field_names(cls, data, where)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or '<root>'}: unknown key(s) {unknown} for {cls.__name__}; "
            f"valid keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or '<root>'}: {err}") from err


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Build dataclass ``cls`` from a nested mapping; errors name ``source``."""
    try:
        return _build(cls, data or {}, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def check_literal_fields(instance: Any) -> None:
    """Raise ``ValueError`` naming ``Class.field`` and the allowed values when a ``Literal``-annotated
    field of the dataclass ``instance`` holds another value.

    For configs built in Python (call it from ``__post_init__``); :func:`from_dict` checks the same
    while loading, before the dataclass is built.
    """
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Literal and getattr(instance, f.name) not in typing.get_args(tp):
            raise ValueError(f"{type(instance).__name__}.{f.name}: expected one of {list(typing.get_args(tp))}, "
                             f"got {getattr(instance, f.name)!r}")


def to_dict(cfg: Any) -> dict:
    """Nested plain-dict view of a config dataclass (for saving with a run)."""
    return dataclasses.asdict(cfg)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass of annotation ``tp`` (itself, or the one in an ``Optional``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        return next((arg for arg in typing.get_args(tp) if dataclasses.is_dataclass(arg)), None)
    return None


def _set_dotted(cls: type, data: dict, dotted: str, value: Any) -> None:
    """Set ``data[k1][k2]... = value`` for the override ``k1.k2...=value``, reading each key of a
    dataclass level in its field name: an old spelling, in the override or in ``data``, becomes the
    field's name, so either spelling of an override replaces either spelling of the file."""
    keys = dotted.split(".")
    node, level = data, cls
    for depth, key in enumerate(keys):
        if level is not None:
            aliases = _aliases(level)
            key = aliases.get(key, key)
            for old, name in aliases.items():
                if name == key and old in node and key not in node:
                    node[key] = node.pop(old)
            level = _dataclass_in(typing.get_type_hints(level).get(key))
        if depth == len(keys) - 1:
            node[key] = value
            return
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus overrides.

    Overrides are ``"section.field=value"``; the value is parsed as YAML so
    ``train.lr=1e-3`` gives a float and ``model.depth_bins=[1,60,1]`` a list.
    """
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = safe_load_yaml(path.read_text()) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a text file ({err})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = safe_load_yaml(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(cls, data, key.strip(), value)
    if overrides:
        source = f"{source} (+overrides)"
    return from_dict(cls, data, source)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML (atomically) so a run records exactly what it used."""
    from bevperc.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
