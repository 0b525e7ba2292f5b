"""Read a config dataclass tree as a person needs it: for every field its dotted key, value, type, default,
allowed range and documentation, taken from the dataclasses themselves (the docstring written under each field,
the ``Range`` in its type). Used by ``moetron config``; knows nothing of the particular tree.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Union

from moe_core.config_fields import Range


@dataclass(frozen=True)
class FieldDoc:
    key: str
    value: Any
    default: Any
    type: str
    range: str
    doc: str


@functools.lru_cache(maxsize=None)
def field_docstrings(cls: type) -> dict[str, str]:
    """The string literal written right under each field of dataclass ``cls`` (and of its bases), by name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _type_text(tp: Any) -> tuple[str, list[Range]]:
    """A short type name and the ranges declared in it (inside Optional / list too)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner, *metadata = typing.get_args(tp)
        name, ranges = _type_text(inner)
        return name, ranges + [m for m in metadata if isinstance(m, Range)]
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(tp))), []
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        parts = [_type_text(a) for a in typing.get_args(tp) if a is not type(None)]
        name = " | ".join(p[0] for p in parts)
        return (f"{name} | null" if type(None) in typing.get_args(tp) else name), [r for p in parts for r in p[1]]
    if origin is list:
        name, ranges = _type_text(typing.get_args(tp)[0])
        return f"list[{name}]", ranges
    return getattr(tp, "__name__", str(tp)), []


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def fields(obj: Any, prefix: str = "") -> Iterator[FieldDoc]:
    """Every leaf field of the dataclass instance ``obj``, depth first, in declaration order."""
    cls = type(obj)
    hints, docs = typing.get_type_hints(cls, include_extras=True), field_docstrings(cls)
    for f in dataclasses.fields(cls):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from fields(value, key + ".")
            continue
        name, ranges = _type_text(hints[f.name])
        ranges_text = list(dict.fromkeys(map(str, ranges)))  # int | list[int] share one range: say it once
        yield FieldDoc(key, value, _default(f), name, " ".join(ranges_text), docs.get(f.name, ""))


def _yaml(value: Any) -> str:
    """A value as a recipe or an override writes it (null, true, 0.5, [0, 2], text)."""
    return json.dumps(value, default=dataclasses.asdict) if not isinstance(value, str) else value  # asdict: data.paths


def describe(obj: Any, width: int = 100) -> str:
    """The resolved tree as text: ``key = value`` with type, default and range, then the field's documentation."""
    lines, section = [], None
    for fd in fields(obj):
        top = fd.key.split(".")[0]
        if top != section:
            section = top
            lines += ["" if lines else None, f"[{section}]"]
        facts = [fd.type, f"default {_yaml(fd.default)}"] + ([f"range {fd.range}"] if fd.range else [])
        changed = "" if fd.value == fd.default else "   # set by the recipe or an override"
        lines.append(f"{fd.key} = {_yaml(fd.value)}   ({', '.join(facts)}){changed}")
        lines += textwrap.wrap(fd.doc, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(line for line in lines if line is not None)
