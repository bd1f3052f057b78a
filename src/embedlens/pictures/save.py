"""Writing a picture to disk: PNG, through a temporary sibling and a rename (never half written)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from embedlens.files import atomic_path


def save_png(picture: Image.Image, path: str | Path) -> Path:
    """Write ``picture`` as a PNG at ``path`` (atomically; parent folders are created) and return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
