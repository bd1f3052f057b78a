"""Opening images: every mode PIL reads becomes the RGB picture it shows, or one clear error.

Conventions (shared by every command and the Python API):

- **Modes.** 8-bit modes (1, L, P, RGB, CMYK, YCbCr, LAB, HSV, ...) use PIL's own conversion.
  Wider single-channel modes are scaled by their value range, not clipped: ``I;16`` (and ``I;16B``,
  ``I;16L``, ``I;16N``) maps 0..65535 to 0..255; ``I`` (32-bit integers) does the same when its
  largest value is at most 65535 (how 16-bit PNGs and TIFFs arrive), otherwise it is stretched so its
  largest value becomes 255; negative values count as 0. ``F`` (32-bit floats) is taken as 0..1 when
  its largest finite value is at most 1, otherwise as 0..255 and clipped there; NaN counts as 0.
- **Transparency.** Images with alpha (RGBA, LA, PA, premultiplied RGBa/La) or a transparent colour
  (palette or tRNS) are composited onto white (:data:`BACKGROUND`).
- **Orientation and frames.** The EXIF orientation is applied; an animated file (GIF, WebP, APNG) or
  a multi-page one gives its first frame (an in-memory image gives the frame it is on).
- **Size.** A file of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (about 89 megapixels unless you
  change it) is refused before it is decoded, as a possible decompression bomb, except a JPEG, which is
  decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``, the decoder's own cheap down-sampling) to fit.
- **Files.** Only regular files are opened: a FIFO, device or socket is refused without reading, so
  nothing can hang on it.

Every refusal is an :class:`~embedlens.errors.InputError`, so dataset commands skip and list the image.
"""

from __future__ import annotations

import math
import stat
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

from embedlens.errors import InputError

ImageLike = str | Path | Image.Image

#: The colour transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)

#: Errors PIL's decoders raise on a damaged or truncated file.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error)
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_EXIF_ORIENTATION = 0x0112
#: Headers whose PIL reader can be built directly, to learn the size (and draft a JPEG) of an image
#: ``Image.open`` refused as a decompression bomb.
_HEADER_READERS = (
    (b"\xff\xd8\xff", JpegImagePlugin.JpegImageFile),
    (b"\x89PNG\r\n\x1a\n", PngImagePlugin.PngImageFile),
)


def load_image(source: ImageLike) -> Image.Image:
    """Open ``source`` (a path or a PIL image) as a fully decoded RGB image (see the module's conventions).

    Raises:
        InputError: The file is missing, a directory or another non-regular file (FIFO, device,
            socket), cannot be opened, is not a readable image, or is over the pixel limit.
    """
    if isinstance(source, Image.Image):
        try:
            return to_rgb(_upright(source))
        except _DECODE_ERRORS as exc:
            raise InputError(f"cannot read image {image_label(source)}: {exc}") from exc
    path = Path(source).expanduser()
    _check_regular_file(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot open image {path}: {exc.strerror or exc}") from exc
    with handle:
        try:
            with _open(handle, path) as image:
                _fit_pixel_limit(image, path)
                image.load()
                return to_rgb(_upright(image))
        except _DECODE_ERRORS as exc:
            raise InputError(f"cannot read image {path}: not a valid or complete image file ({exc})") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image of ``image`` in any PIL mode: wide modes scaled, transparency composited on white."""
    if image.width * image.height == 0:
        raise InputError(f"image has no pixels ({image.width} x {image.height})")
    transparent = image.info.get("transparency")
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        image = _scale_wide(image, transparent)
    elif image.mode == "La":
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or transparent is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _scale_wide(image: Image.Image, transparent: object) -> Image.Image:
    """An ``I;16*``, ``I`` or ``F`` image as ``L`` (``LA`` if a transparent value is set), by its range."""
    values = np.asarray(image)
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        top = float(finite.max()) if finite.size else 0.0
        scaled = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=np.inf, neginf=0.0)
        scaled = scaled * 255.0 if top <= 1.0 else scaled
    else:
        wide = np.clip(values.astype(np.float64), 0.0, None)
        top = float(wide.max())
        scaled = wide / 257.0 if image.mode in _SIXTEEN_BIT or top <= 65535 else wide * (255.0 / top)
    gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    if isinstance(transparent, int | float) and not isinstance(transparent, bool):
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
        gray = Image.merge("LA", (gray, alpha))
    return gray


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (itself when there is nothing to turn)."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _check_regular_file(path: Path) -> None:
    """Refuse a missing path, a directory and anything but a regular file, without opening it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot open image {path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode):
        raise InputError(f"expected an image file, got a directory: {path}")
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO (named pipe)"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a special file"
        )
        raise InputError(f"expected an image file, got {kind}: {path}")


def _open(handle: BinaryIO, path: Path) -> Image.Image:
    """``Image.open`` with PIL's decompression-bomb warning silenced (the limit is checked by
    :func:`_fit_pixel_limit`); a JPEG or PNG over PIL's hard limit is opened by its reader directly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(handle)
        except Image.DecompressionBombError as exc:
            handle.seek(0)
            head = handle.read(8)
            handle.seek(0)
            for magic, reader in _HEADER_READERS:
                if head.startswith(magic):
                    return reader(handle)
            raise InputError(f"image {path} is too large to decode safely: {exc}") from exc


def _fit_pixel_limit(image: Image.Image, path: Path) -> None:
    """Draft a JPEG down to ``PIL.Image.MAX_IMAGE_PIXELS`` pixels; refuse any other image over it."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is None or width * height <= limit:
        return
    if image.format in ("JPEG", "MPO"):
        scale = next((s for s in (2, 4, 8) if math.ceil(width / s) * math.ceil(height / s) <= limit), None)
        if scale is not None:
            image.draft(None, (max(1, width // scale), max(1, height // scale)))
            if image.width * image.height <= limit:
                return
    raise InputError(
        f"image {path} is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels), over the limit of "
        f"{limit / 1e6:.0f} megapixels (PIL.Image.MAX_IMAGE_PIXELS); refused as a possible decompression bomb"
    )


def image_label(source: ImageLike) -> str:
    """How an image is named in results: its path, or ``"<in-memory image>"``."""
    return "<in-memory image>" if isinstance(source, Image.Image) else str(source)
