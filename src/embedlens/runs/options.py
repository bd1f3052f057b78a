"""Checks shared by the options of every run (``StatsOptions``, ``EvalOptions``, ``AlignOptions``)."""

from __future__ import annotations

from embedlens.errors import InputError


def check_options(options: object, positive: tuple[str, ...], *, confidence: bool = False) -> None:
    """Refuse options whose ``positive`` fields are not positive integers, or (with ``confidence``) whose
    ``confidence`` is not strictly between 0 and 1; the message names the command-line option."""
    for name in positive:
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    level = getattr(options, "confidence", None) if confidence else 0.5
    if not isinstance(level, (int, float)) or not 0 < level < 1:
        raise InputError(f"confidence must be between 0 and 1, got {level!r}")
