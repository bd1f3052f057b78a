"""Checks of option values, declared once on a dataclass field and shared by the library and the CLI.

A field declared with :func:`option` carries its check; :func:`check_fields` (called from the
dataclass's ``__post_init__``) refuses a bad value with one :class:`~embedlens.errors.InputError`
that names the option as the command line spells it (``batch-size must be a positive integer, got 0``).
The command line parses its numbers with the same :class:`Bound` objects (:mod:`embedlens.cli.options`),
so a value the CLI accepts is one the library accepts.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Options:
    ...     batch_size: int = option(4, POSITIVE_INT)
    ...     def __post_init__(self) -> None:
    ...         check_fields(self)
    >>> Options(0)
    Traceback (most recent call last):
    ...
    embedlens.errors.InputError: batch-size must be a positive integer, got 0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from embedlens.errors import InputError

#: The key of a field's metadata that holds its :class:`Check`.
CHECK_KEY = "embedlens.check"


class Check(Protocol):
    """Anything that says what is wrong with a value (None: nothing)."""

    def problem(self, value: object) -> str | None:
        """``"must be ..., got ..."``, or None for a good value."""


@dataclass(frozen=True)
class Bound:
    """Numbers of one kind from ``low`` up to ``high``; NaN and infinities are refused.

    Attributes:
        kind: ``int`` (booleans refused) or ``float`` (integers accepted).
        low: The lower bound.
        wording: How a message names the allowed values, e.g. ``"a positive integer"``.
        inclusive: Whether ``low`` itself is allowed.
        high: The upper bound, if any.
        high_inclusive: Whether ``high`` itself is allowed.
    """

    kind: type
    low: float
    wording: str
    inclusive: bool = False
    high: float | None = None
    high_inclusive: bool = True

    def problem(self, value: object) -> str | None:
        """What is wrong with ``value`` as a Python value (no parsing of text), or None."""
        kinds = (int, float) if self.kind is float else (self.kind,)
        number = not isinstance(value, bool) and isinstance(value, kinds)
        return None if number and self._inside(value) else f"must be {self.wording}, got {value!r}"

    def parse(self, text: object) -> Any:
        """``text`` (a command-line value, or a number) as a number of :attr:`kind`.

        Raises:
            ValueError: ``"must be ..., got ..."`` when it is not one, or is out of bounds.
        """
        if isinstance(text, self.kind) and not isinstance(text, bool):
            number = text
        else:
            try:
                number = self.kind(str(text).strip())
            except ValueError:
                raise ValueError(f"must be {self.wording}, got {text!r}") from None
        if not self._inside(number):
            raise ValueError(f"must be {self.wording}, got {text}")
        return number

    def _inside(self, number: Any) -> bool:
        if not math.isfinite(number):
            return False
        above_low = number > self.low or (self.inclusive and number == self.low)
        if self.high is None:
            return above_low
        return above_low and (number < self.high or (self.high_inclusive and number == self.high))


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of strings."""

    values: tuple[str, ...]

    def problem(self, value: object) -> str | None:
        """What is wrong with ``value``, or None when it is one of :attr:`values`."""
        if value in self.values:
            return None
        return f"must be one of {', '.join(self.values)}, got {value!r}"


@dataclass(frozen=True)
class Each:
    """A sequence whose every item passes ``item``."""

    item: Check

    def problem(self, value: object) -> str | None:
        """The first item's problem, or None."""
        if not isinstance(value, Sequence) or isinstance(value, str):
            return f"must be a sequence, got {value!r}"
        return next(filter(None, map(self.item.problem, value)), None)


POSITIVE_INT = Bound(int, 0, "a positive integer")
NON_NEGATIVE_INT = Bound(int, 0, "0 or a positive integer", inclusive=True)
INTEGER = Bound(int, -math.inf, "an integer")
POSITIVE_FLOAT = Bound(float, 0.0, "a positive finite number")
NON_NEGATIVE_FLOAT = Bound(float, 0.0, "0 or a positive finite number", inclusive=True)
FINITE = Bound(float, -math.inf, "a finite number")
#: A share of a whole: above 0, at most 1.
FRACTION = Bound(float, 0.0, "a number in (0, 1]", high=1.0)
#: A probability: 0 to 1, both included.
PROBABILITY = Bound(float, 0.0, "a number in [0, 1]", inclusive=True, high=1.0)
#: A confidence level: strictly between 0 and 1.
CONFIDENCE = Bound(float, 0.0, "between 0 and 1", high=1.0, high_inclusive=False)


def option(default: Any, check: Check) -> Any:
    """A dataclass field with ``default`` whose values :func:`check_fields` checks with ``check``;
    a field whose default is None also accepts None."""
    return dataclasses.field(default=default, metadata={CHECK_KEY: check})


def check_fields(instance: Any) -> None:
    """Check every field of the dataclass ``instance`` declared with :func:`option`.

    Raises:
        InputError: The first bad value, named as the command line spells its option.
    """
    for spec in dataclasses.fields(instance):
        check = spec.metadata.get(CHECK_KEY)
        value = getattr(instance, spec.name)
        if check is None or (value is None and spec.default is None):
            continue
        problem = check.problem(value)
        if problem is not None:
            raise InputError(f"{spec.name.replace('_', '-')} {problem}")
