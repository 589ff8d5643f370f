"""Turning YAML/TOML files and dotted overrides into a tree of kw-only dataclasses, and back into text.

Works for any dataclass tree whose fields are documented with `megalith.core.fields.option` (the components'
own configs, composed by `RunConfig`): field types drive the conversion, field metadata["help"] the --help
text, and each dataclass's own `__post_init__` the validation, whose ValueError is re-raised with the dotted
path. A section class may start from defaults that depend on the given values (`config_defaults(data)`: the
model section starts from its preset), and the root may list renamed keys (`RENAMED_KEYS`: old dotted key ->
message naming the new one) and refused values (`REJECTED_VALUES`: (dotted key, value) -> what to write
instead).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "format_config",
    "format_config_help",
    "load_config",
    "load_config_file",
]

T = TypeVar("T")
_MISSING = dataclasses.MISSING
_YAML_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message names the dotted field and the value."""


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a .yaml/.yml/.toml/.json file into a dict (safe loaders only)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = _toml().loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r} (use .yaml, .yml, .toml or .json)")
    except (yaml.YAMLError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    import tomli

    return tomli


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies `a.b.c=value` overrides to a nested dict (values parsed as YAML scalars/lists) and returns it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Builds dataclass `cls` from a nested mapping, converting and validating every field."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    defaults = getattr(cls, "config_defaults", None)
    if defaults is not None:
        try:
            data = {**defaults(dict(data)), **data}
        except ValueError as exc:
            raise ConfigError(f"{path or 'config'}: {exc}") from None
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {(path + '.' if path else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {where!r}{hint} (valid: {', '.join(sorted(fields))})")
    required = [n for n, f in fields.items() if f.default is _MISSING and f.default_factory is _MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{path or 'config'}: these fields must be set: {', '.join(missing)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
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
                return _convert(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans; take the spelling the choices use
            value = next((a for a in args if isinstance(a, str) and _YAML_BOOLS.get(a.lower()) is value), value)
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, path)
    if origin in (list, tuple, Sequence):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(as_float) if not isinstance(value, int) else value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {number}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: cannot convert {value!r} to {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Loads `cls` from an optional YAML/TOML/JSON file plus dotted `section.field=value` overrides."""
    data = apply_overrides(load_config_file(path) if path is not None else {}, overrides)
    where = str(path) if path is not None else "the overrides"
    _check_rejected(data, getattr(cls, "REJECTED_VALUES", {}), where)
    _check_renamed(data, getattr(cls, "RENAMED_KEYS", {}), where)
    return config_from_dict(cls, data)


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
    return node


def _check_renamed(data: Mapping[str, Any], renamed: Mapping[str, str], where: str) -> None:
    for old, message in renamed.items():
        if _lookup(data, old) is not _MISSING:
            raise ConfigError(f"config key {old!r} (in {where}) {message}")


def _check_rejected(data: Mapping[str, Any], rejected: Mapping[tuple[str, str], str], where: str) -> None:
    """`REJECTED_VALUES`: (dotted key, value) -> why that value is refused and what to write instead."""
    for (key, value), message in rejected.items():
        if _lookup(data, key) == value:
            raise ConfigError(f"{key}={value} (in {where}): {message}")


def config_to_dict(cfg: Any) -> Any:
    """The resolved tree as plain JSON/YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    return cfg


def format_config(cfg: Any) -> str:
    """The resolved tree as YAML (what --print-config shows and what is written into the run directory)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    """Writes the resolved tree as YAML (or JSON when `path` ends in .json), through a temporary file."""
    path = Path(path)
    text = json.dumps(config_to_dict(cfg), indent=2) if path.suffix == ".json" else format_config(cfg)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def format_config_help(cls: type, prefix: str = "") -> str:
    """One entry per field, recursively: dotted name, type, default and help text."""
    lines: list[str] = []
    hints = get_type_hints(cls)
    doc = (cls.__doc__ or "").strip().splitlines()
    if prefix:
        lines.append(f"\n[{prefix.rstrip('.')}] {doc[0] if doc else ''}".rstrip())
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(format_config_help(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        help_text = f.metadata.get("help", "")
        lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {default})\n      {help_text}".rstrip())
    return "\n".join(lines)
