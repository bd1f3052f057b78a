"""Glyphs with exact pixel bounding boxes: letters and words in fonts bundled with matplotlib.

Text is rendered large with PIL's anti-aliased rasteriser and box-filtered down, so coverage outside the
ink is exactly zero and the returned box is the exact set of pixels that can change (see
:mod:`embedlens.synth.draw`, whose :func:`~embedlens.synth.draw.paint_mask` paints the masks).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont

from embedlens.synth.draw import RGB, BBox, paint_mask

_FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"

#: Font name -> TrueType file bundled with matplotlib (DejaVu: Bitstream Vera licence; STIX: SIL OFL;
#: Computer Modern: BaKoMa). All of them render A-Z, a-z and 0-9.
FONTS: dict[str, str] = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "sans-oblique": "DejaVuSans-Oblique.ttf",
    "sans-bold-oblique": "DejaVuSans-BoldOblique.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-bold": "DejaVuSerif-Bold.ttf",
    "serif-italic": "DejaVuSerif-Italic.ttf",
    "serif-bold-italic": "DejaVuSerif-BoldItalic.ttf",
    "mono": "DejaVuSansMono.ttf",
    "mono-bold": "DejaVuSansMono-Bold.ttf",
    "mono-oblique": "DejaVuSansMono-Oblique.ttf",
    "stix": "STIXGeneral.ttf",
    "stix-bold": "STIXGeneralBol.ttf",
    "stix-italic": "STIXGeneralItalic.ttf",
    "stix-bold-italic": "STIXGeneralBolIta.ttf",
    "cm-roman": "cmr10.ttf",
    "cm-sans": "cmss10.ttf",
    "cm-typewriter": "cmtt10.ttf",
    "cm-bold": "cmb10.ttf",
}
#: Font names in a fixed order.
FONT_NAMES: tuple[str, ...] = tuple(FONTS)
#: The letters of glyph questions.
LETTERS: tuple[str, ...] = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")

#: Text is rendered at an em size of this times a power of two (at least 4x the wanted size), then
#: box-filtered down to the requested size.
_MIN_MASTER_EM = 64
#: Em size of the master rendering that :func:`draw_text_in_box` measures proportions on.
_MASTER_EM = 256


def font_path(name: str) -> Path:
    """Path of the TrueType file behind font ``name`` (a key of :data:`FONTS`).

    Raises:
        KeyError: Unknown font name.
        FileNotFoundError: matplotlib's bundled font is missing.
    """
    if name not in FONTS:
        raise KeyError(f"unknown font {name!r}; known: {', '.join(FONT_NAMES)}")
    path = _FONT_DIR / FONTS[name]
    if not path.is_file():
        raise FileNotFoundError(f"font file not found: {path}")
    return path


@lru_cache(maxsize=64)
def _truetype(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(name)), size)


@lru_cache(maxsize=256)
def _master_mask(text: str, font: str, em: int) -> Image.Image:
    """Tight coverage mask of ``text`` rendered at ``em`` px with PIL's anti-aliased rasteriser."""
    face = _truetype(font, em)
    left, top, right, bottom = face.getbbox(text)
    pad = 4
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=255, font=face)
    inner = canvas.getbbox()
    if inner is None:
        raise ValueError(f"text {text!r} renders no pixels in font {font!r}")
    return canvas.crop(inner)


def text_mask(
    text: str, font: str = "sans-bold", *, height: float | None = None, font_size: float | None = None
) -> Image.Image:
    """Tight anti-aliased coverage mask of ``text``.

    Exactly one of ``height`` and ``font_size`` sets the scale.

    Args:
        text: Characters to render (one line).
        font: A key of :data:`FONTS`.
        height: Wanted height of the tight ink box in pixels (for a capital letter: its cap height).
        font_size: Wanted em size in pixels (ink height then depends on the letters, as in print).

    Returns:
        A mode ``"L"`` image whose first/last rows and columns all contain ink (it is its own tight box).

    Raises:
        ValueError: Neither or both scales given, a non-positive scale, or text with no ink.
    """
    if (height is None) == (font_size is None):
        raise ValueError("give exactly one of height and font_size")
    wanted = height if height is not None else font_size
    assert wanted is not None
    if wanted <= 0:
        raise ValueError(f"text scale must be positive, got {wanted}")
    needed = 4 * wanted * (1.5 if height is not None else 1.0)  # >= 4x oversampling of the ink
    em = _MIN_MASTER_EM * 2 ** max(0, math.ceil(math.log2(needed / _MIN_MASTER_EM)))  # powers of two: cache hits
    master = _master_mask(text, font, em)
    scale = height / master.height if height is not None else font_size / em  # type: ignore[operator]
    size = (max(1, round(master.width * scale)), max(1, round(master.height * scale)))
    small = master.resize(size, Image.Resampling.BOX)
    inner = small.getbbox()
    return small if inner is None or inner == (0, 0, *small.size) else small.crop(inner)


def draw_text(
    image: Image.Image,
    text: str,
    xy: tuple[int, int],
    colour: RGB,
    *,
    font: str = "sans-bold",
    height: float | None = None,
    font_size: float | None = None,
) -> BBox:
    """Draw ``text`` with the top-left corner of its tight ink box at ``xy``.

    Args:
        image: RGB image, modified in place.
        text: Characters to render.
        xy: Top-left corner of the ink box.
        colour: Text colour.
        font: A key of :data:`FONTS`.
        height: Ink-box height in pixels (see :func:`text_mask`).
        font_size: Em size in pixels (see :func:`text_mask`).

    Returns:
        The exact box of the changed pixels.
    """
    return paint_mask(image, text_mask(text, font, height=height, font_size=font_size), xy, colour)


def draw_text_in_box(image: Image.Image, text: str, box: BBox, colour: RGB, *, font: str = "sans-bold") -> BBox:
    """Draw ``text`` as large as fits inside ``box``, centred in it.

    Args:
        image: RGB image, modified in place.
        text: Characters to render.
        box: ``(left, top, right, bottom)`` the ink must stay inside.
        colour: Text colour.
        font: A key of :data:`FONTS`.

    Returns:
        The exact box of the changed pixels (inside ``box``).
    """
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    master = _master_mask(text, font, _MASTER_EM)
    target = min(height, width * master.height / master.width)
    mask = text_mask(text, font, height=target)
    while mask.width > width or mask.height > height:  # rounding can overshoot by a pixel
        target -= 0.5
        mask = text_mask(text, font, height=target)
    xy = (left + (width - mask.width) // 2, top + (height - mask.height) // 2)
    return paint_mask(image, mask, xy, colour)
