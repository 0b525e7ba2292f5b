"""The YAML that recipes and dotted overrides may use: plain data only (:func:`load`).

- Types: mappings, lists, strings, integers, floats, true/false, null. Any explicit tag (``!!python/object``,
  ``!!binary``, ``!!set``, ``!custom``...) is refused, and nothing is read as a date.
- Booleans and integers follow YAML 1.2's core schema, not PyYAML's YAML 1.1: only ``true``/``false`` (any case)
  are booleans, so ``yes``/``no``/``on``/``off`` stay strings (a bool field then refuses them by name, and a string
  field such as a run directory called ``on`` is not turned into ``True``); integers are decimal (``010`` is ten,
  not YAML 1.1's octal eight), ``0o17`` or ``0x1f``; YAML 1.1's ``1_000`` and base-60 ``1:30`` (= 90) stay strings.
  Floats are read as before (``launcher/config_parse.py`` also takes ``1e-4``-style strings as numbers).
- Anchors and aliases are allowed, but what they expand to is bounded (:data:`MAX_NODES` nodes), so an alias
  bomb ("billion laughs") is one error, not memory exhaustion.
- Mapping keys must be scalars given once: a list or mapping as a key, or a key given twice, is an error.

Every refusal is a :class:`PlainYAMLError` (a ``yaml.YAMLError`` with the line and column).
"""
from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import MappingStartEvent, ScalarEvent, SequenceStartEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

MAX_NODES = 100_000
"""Nodes a document may expand to, aliases counted at every use (the biggest recipe has a few hundred)."""

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_BOOL_TAG, _INT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int"


class PlainYAMLError(ComposerError):
    """The document uses something beyond plain data (a tag, an alias bomb, a non-scalar key)."""


class _PlainResolver(yaml.resolver.Resolver):
    """YAML 1.1's implicit resolvers minus booleans, integers and timestamps, plus YAML 1.2 core's."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers
                if tag not in (_BOOL_TAG, _INT_TAG, "tag:yaml.org,2002:timestamp")]
        for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()}


_PlainResolver.add_implicit_resolver(_BOOL_TAG, _BOOL, list("tTfF"))
_PlainResolver.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))


class PlainLoader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer,
                  yaml.constructor.SafeConstructor, _PlainResolver):
    """``yaml.SafeLoader`` restricted to plain data (module docstring)."""

    def __init__(self, stream):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _PlainResolver.__init__(self)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, (ScalarEvent, SequenceStartEvent, MappingStartEvent)) and event.tag not in (None, "!"):
            raise PlainYAMLError(None, None, f"the tag '{event.tag}' is not allowed (plain YAML only: no tags)",
                                 event.start_mark)
        return super().compose_node(parent, index)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode):
                raise PlainYAMLError(None, None, "a key must be a plain value (a string or number), not a "
                                     f"{'list' if isinstance(key_node, SequenceNode) else 'mapping'}",
                                     key_node.start_mark)
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConstructorError(None, None, f"key '{key}' is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
        base = 16 if digits.startswith("0x") else 8 if digits.startswith("0o") else 10
        try:
            return sign * int(digits[2:] if base != 10 else digits, base)
        except ValueError:  # over Python's 4300-digit limit for int(str)
            raise ConstructorError(None, None, f"an integer of {len(digits):,} digits is too long",
                                   node.start_mark) from None


PlainLoader.add_constructor(_INT_TAG, PlainLoader.construct_yaml_int)


def _check_size(root) -> None:
    """Raise PlainYAMLError when ``root`` expands (aliases counted at every use) to more than MAX_NODES nodes.
    Sizes are memoised per node, so this costs one visit per distinct node; a node inside itself is refused."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise PlainYAMLError(None, None, "an alias refers to a node that contains it", node.start_mark)
        open_nodes.add(key)
        if isinstance(node, MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, SequenceNode):
            total = 1 + sum(size(item) for item in node.value)
        else:
            total = 1
        open_nodes.discard(key)
        if total > MAX_NODES:
            raise PlainYAMLError(None, None, f"aliases expand to more than {MAX_NODES:,} values (an alias bomb?)",
                                 node.start_mark)
        sizes[key] = total
        return total

    size(root)


def load(text: str) -> Any:
    """``text`` as plain data (module docstring); raises ``yaml.YAMLError`` (a :class:`PlainYAMLError` for what
    plain YAML refuses) or RecursionError (nesting deeper than Python's stack)."""
    return yaml.load(text, Loader=PlainLoader)
