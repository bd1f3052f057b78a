"""Files that ship inside the package (example images)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def example_image() -> Path:
    """Path of the bundled example photo (Grace Hopper, public domain), used when no image is given."""
    return Path(str(files("embedlens") / "assets" / "grace_hopper.jpg"))
