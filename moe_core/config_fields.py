"""Allowed ranges of config fields, declared once next to each field and readable by machines.

    from typing import Annotated
    from moe_core.config_fields import NonNegativeInt, Range

    @dataclass
    class OptimConfig:
        beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9    # then the field's docstring, as always
        warmup_steps: NonNegativeInt = 10

A :class:`Range` rides on the field's type as ``typing.Annotated`` metadata, so it composes with the rest of the
type: ``Optional[PositiveInt]`` (None or >= 1), ``list[NonNegativeInt]`` (every item >= 0). The run-config parser
(``launcher/config.py``) checks it for every field of every section when a recipe, an override or a stored config is
read, and rejects a violation with one line naming the key, the value and the range. Tools read the same metadata:
``typing.get_type_hints(Cls, include_extras=True)[name].__metadata__``.

:func:`check_ranges` checks the same declarations on a dataclass built in code (not parsed), e.g. by
``LLEPConfig.validate``.

Floats are always finite: ``nan`` and ``inf`` are outside every range. Cross-field rules (``min_lr <= lr``,
``top_k <= num_experts``, divisibility) are not ranges; they live in each section's ``validate()`` (and, for rules
that span packages, in ``launcher.config.validate``).
This module imports nothing of ours, so every config module can use it without breaking the layering.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Optional, Union

Number = Union[int, float]


@dataclass(frozen=True)
class Range:
    """Closed (``ge``/``le``) or open (``gt``/``lt``) bounds; a missing bound is unbounded (but finite)."""

    ge: Optional[Number] = None
    gt: Optional[Number] = None
    le: Optional[Number] = None
    lt: Optional[Number] = None

    def __post_init__(self) -> None:
        if (self.ge is not None and self.gt is not None) or (self.le is not None and self.lt is not None):
            raise TypeError(f"{self!r}: give at most one lower (ge/gt) and one upper (le/lt) bound")

    def contains(self, value: Number) -> bool:
        """True when ``value`` is finite and within the bounds (``nan`` fails every comparison)."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        """Interval notation: ``[1, inf)``, ``(0, inf)``, ``[0, 1)``, ``(0, 1]``."""
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else "(-inf"
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else "inf)"
        return f"{low}, {high}"


PositiveInt = Annotated[int, Range(ge=1)]
"""An integer >= 1: counts, sizes, intervals that must happen."""
NonNegativeInt = Annotated[int, Range(ge=0)]
"""An integer >= 0: counts and intervals where 0 means none / never / off."""
PositiveFloat = Annotated[float, Range(gt=0)]
"""A finite number > 0."""
NonNegativeFloat = Annotated[float, Range(ge=0)]
"""A finite number >= 0: coefficients and rates where 0 turns the term off."""


def _ranges(tp: Any) -> list[Range]:
    """The ranges declared in a field type (inside Optional / Union / list too)."""
    if typing.get_origin(tp) is Annotated:
        inner, *metadata = typing.get_args(tp)
        return _ranges(inner) + [m for m in metadata if isinstance(m, Range)]
    return [r for arg in typing.get_args(tp) for r in _ranges(arg)]


@functools.lru_cache(maxsize=None)
def _field_ranges(cls: type) -> tuple[tuple[str, tuple[Range, ...]], ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple((f.name, tuple(_ranges(hints[f.name]))) for f in dataclasses.fields(cls))


def check_ranges(obj: Any, path: str) -> None:
    """Raise ValueError ``"<path>.<field>: <value> is outside the allowed range <range>"`` for the first number
    field of dataclass ``obj`` (not its nested sections) outside its declared :class:`Range`; None passes."""
    for name, ranges in _field_ranges(type(obj)):
        value = getattr(obj, name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            for allowed in ranges:
                if not allowed.contains(v):
                    raise ValueError(f"{path}.{name}: {v!r} is outside the allowed range {allowed}")
