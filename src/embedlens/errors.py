"""Errors a user can cause.

Every problem that comes from the user's input (a bad path, an unreadable image, an unknown model
family, a layer out of range, ...) is raised as an :class:`EmbedLensError`. The command line turns it
into one line on stderr and exit code 2; Python callers can catch it like any exception.
"""

from __future__ import annotations


class EmbedLensError(Exception):
    """A problem with the user's input, reported as one clear line (CLI exit code 2)."""


class UnsupportedModelError(EmbedLensError):
    """The model (directory, hub id or class) is not one EmbedLens has an adapter for."""


class InputError(EmbedLensError):
    """An image, prompt or argument that cannot be used."""
