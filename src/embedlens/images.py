"""Opening images with one clear error per problem."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from embedlens.errors import InputError

ImageLike = str | Path | Image.Image


def load_image(source: ImageLike) -> Image.Image:
    """Open ``source`` (a path or a PIL image) as a fully decoded RGB image.

    Raises:
        InputError: The file is missing, is a directory, or is not a readable image.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot read image {path}: not a valid or complete image file ({exc})") from exc


def image_label(source: ImageLike) -> str:
    """How an image is named in results: its path, or ``"<in-memory image>"``."""
    return "<in-memory image>" if isinstance(source, Image.Image) else str(source)
