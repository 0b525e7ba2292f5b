"""Reading a config dataclass tree from YAML recipes and dotted overrides: types and declared ranges checked field
by field, every error one line naming the key path (:class:`ConfigError`). Knows nothing of the particular tree
(``launcher/config.py`` composes it).
"""
from __future__ import annotations

import dataclasses
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from launcher import config_yaml
from launcher.errors import MoetronError
from moe_core.config_fields import Range


class ConfigError(MoetronError):
    """A recipe or override is invalid. The message is one line naming the key path."""

    kind = "config"


_INT64 = Range(ge=-(1 << 63), lt=1 << 63)  # every config integer ends up in a C int64 somewhere
_FLOAT_TEXT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|infinity|nan)", re.IGNORECASE)
"""Float spellings YAML 1.1 leaves as strings (1e-4, 1E-4, +1e3, 1.0e4, nan): read as numbers, so every float
field takes what people write. Ranges then reject nan/inf (:mod:`moe_core.config_fields`)."""


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 80, 80, 8, 8, 3


def _show(value: Any) -> str:
    """``repr(value)`` cut to a readable length: an error line quotes what was given, never a whole huge value."""
    return _REPR.repr(value)


class _RangeError(ConfigError):
    """The value has the field's type but is outside its declared range."""


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}


def _type_name(tp: Any) -> str:
    """How an error line names a field type: "an integer", "a list", ..."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is list:
        return "a list"
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return _TYPE_NAMES.get(tp) or getattr(tp, "__name__", None) or str(tp)


def _number(value: Any, path: str) -> float:
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{path}: expected a number, got {_show(value)}")
    try:
        return float(value)
    except OverflowError:
        raise _RangeError(f"{path}: {value} is too large for a float") from None


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert ``value`` to type ``tp`` (and its declared :class:`Range`); raise ConfigError naming ``path``
    if it does not fit."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *metadata = typing.get_args(tp)
        value = _coerce(value, inner, path)
        for allowed in metadata:
            if isinstance(allowed, Range) and not allowed.contains(value):
                raise _RangeError(f"{path}: {_show(value)} is outside the allowed range {allowed}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except _RangeError:
                raise  # the value has this member's type but not its range: that is what to report
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {' or '.join(map(_type_name, args))}, got {_show(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: must be one of {list(choices)}, got {_show(value)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {_show(value)}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {_show(value)}")
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
        if not _INT64.contains(value):
            raise _RangeError(f"{path}: {_show(value)} does not fit in 64 bits")
        return value
    if tp is float:
        return _number(value, path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {_show(value)}")
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")  # a bug in this file, not in the recipe


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)  # extras: keep each field's Annotated Range


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """An instance of dataclass ``cls`` from a raw mapping (``path``: its key path in error lines)."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown key '{full}' (valid keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _parse_scalar(text: str, key: str) -> Any:
    """CLI values are plain YAML (``launcher/config_yaml.py``): 8, 0.5, 1e-4, true, null, [1,2], {a: 1}, 'abc'.
    Text that is not YAML at all is taken as a string; what plain YAML refuses (a tag, an alias bomb, a list as a
    key) is an error."""
    try:
        return config_yaml.load(text)
    except config_yaml.PlainYAMLError as e:
        raise ConfigError(f"override '{key}': {_yaml_problem(e)}") from None
    except (yaml.YAMLError, RecursionError):
        return text


def _merge(node: dict, key: str, value: Any) -> None:
    """Set ``node[key] = value``, except that a mapping given for a section merges into it key by key (recursively):
    ``model={hidden_size: 64}`` changes one field and keeps the recipe's others."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for sub_key, sub_value in value.items():
            _merge(node[key], sub_key, sub_value)
    else:
        node[key] = value


def apply_override(raw: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override to the raw (dict) tree in place; a mapping value merges into the section
    it names (:func:`_merge`)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key.path=value (e.g. moe.num_experts=8)")
    key, text = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override '{override}': '{key}' is not a key path (e.g. moe.num_experts=8)")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    _merge(node, parts[-1], _parse_scalar(text, key))


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def read_recipe(recipe: str | Path) -> dict:
    """The raw section tree of a YAML recipe; any unreadable, non-text or non-YAML file is one ConfigError."""
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' not found (pass a YAML file, e.g. recipes/smoke_cpu.yaml)")
    try:
        text = path.read_bytes().decode("utf-8")
        raw = config_yaml.load(text)
    except OSError as e:
        raise ConfigError(f"recipe '{path}' cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe '{path}' is not a text file (byte {e.start} is not UTF-8): pass a YAML "
                          "recipe, e.g. recipes/smoke_cpu.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"recipe '{path}' is nested too deeply to be a recipe") from None
    if raw is None:
        raise ConfigError(f"recipe '{path}' is empty: a recipe is one complete YAML file (see recipes/smoke_cpu.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of sections (model:, moe:, ...)")
    return raw
