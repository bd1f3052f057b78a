"""Plain helpers shared by several test modules (fixtures live in ``conftest.py``).

Import them as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from embedlens.cli import main


def random_image(seed: int, width: int = 56, height: int = 56) -> Image.Image:
    """A reproducible RGB noise image of ``width`` x ``height`` pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run ``embedlens`` in process with ``args`` (turned into strings): ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, out: str, err: str, fragment: str = "") -> None:
    """Exit code 2, nothing on stdout, exactly one line on stderr naming the problem (containing
    ``fragment``), no traceback."""
    assert code == 2, (code, out, err)
    assert out == ""
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("embedlens: error: "), err
    assert fragment in err, err
