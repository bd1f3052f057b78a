"""Drawing primitives with exact pixel bounding boxes: shapes and a named colour table (glyphs:
:mod:`embedlens.synth.glyphs`).

Every primitive works in two steps: build an anti-aliased coverage mask (PIL mode ``"L"``, 0 = untouched,
255 = fully covered), then paint a solid colour through it with :func:`paint_mask`. Because coverage
outside the geometry is exactly zero (shapes are drawn at :data:`SUPERSAMPLE` x and box-filtered
down), the bounding box of the non-zero mask pixels is the exact
set of pixels that can change. Boxes follow the PIL convention ``(left, top, right, bottom)`` with
``right``/``bottom`` exclusive, so ``right - left`` is the width in pixels.

The primitives work from about 8 px upwards, which matters for benchmarks that place one small target
inside a single 14 px vision patch (see :func:`patch_box` and :func:`patches_covered`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

#: ``(left, top, right, bottom)`` in pixels, right/bottom exclusive (PIL convention).
BBox = tuple[int, int, int, int]
#: An 8-bit RGB triple.
RGB = tuple[int, int, int]
#: Paints full coverage (255) of one object kind into a canvas of the given width and height.
Painter = Callable[[ImageDraw.ImageDraw, float, float], None]

#: Shapes are rasterised at this multiple of their final size and box-filtered down (anti-aliasing).
SUPERSAMPLE = 4

#: The eight object colours: common single English words, far apart in RGB and in hue.
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 35),
    "green": (35, 160, 60),
    "blue": (30, 80, 225),
    "yellow": (245, 215, 30),
    "orange": (245, 130, 20),
    "purple": (135, 45, 185),
    "pink": (245, 125, 195),
    "brown": (125, 75, 35),
}
#: Colour names in a fixed order (the answer space of colour questions).
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


def jitter_colour(name: str, rng: np.random.Generator, amount: int = 12) -> RGB:
    """Return the RGB anchor of colour ``name`` with independent uniform jitter of ``±amount`` per channel.

    Args:
        name: A key of :data:`COLOURS`.
        rng: Random generator.
        amount: Maximum absolute change per channel; 12 keeps every colour clearly nameable.

    Returns:
        The jittered colour, clipped to 0..255.
    """
    base = np.array(COLOURS[name], dtype=np.int64)
    shift = rng.integers(-amount, amount + 1, size=3)
    r, g, b = (int(v) for v in np.clip(base + shift, 0, 255))
    return r, g, b


# --------------------------------------------------------------------------- generic mask handling
def paint_mask(image: Image.Image, mask: Image.Image, xy: tuple[int, int], colour: RGB) -> BBox:
    """Alpha-blend a solid ``colour`` into ``image`` through ``mask`` placed with its top-left at ``xy``.

    Args:
        image: RGB image, modified in place.
        mask: Coverage mask, mode ``"L"``.
        xy: Where the mask's top-left pixel lands; may be partly outside the image (it is clipped).
        colour: Fill colour.

    Returns:
        The tight box of the pixels the mask covers, clipped to the image.

    Raises:
        ValueError: The mask is empty or lies entirely outside the image.
    """
    inner = mask.getbbox()
    if inner is None:
        raise ValueError("empty mask: nothing to draw")
    x, y = xy
    image.paste(Image.new("RGB", mask.size, colour), (x, y), mask)
    left, top = max(inner[0] + x, 0), max(inner[1] + y, 0)
    right, bottom = min(inner[2] + x, image.width), min(inner[3] + y, image.height)
    if right <= left or bottom <= top:
        raise ValueError(f"mask placed at {xy} lies outside the {image.width}x{image.height} image")
    return left, top, right, bottom


def _rasterise(painter: Painter, width: int, height: int) -> Image.Image:
    """Run ``painter`` on a supersampled canvas and box-filter it to ``width`` x ``height``."""
    if width < 1 or height < 1:
        raise ValueError(f"box must be at least 1x1 pixel, got {width}x{height}")
    big = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    painter(ImageDraw.Draw(big), float(big.width), float(big.height))
    return big.resize((width, height), Image.Resampling.BOX)


def _polygon(draw: ImageDraw.ImageDraw, w: float, h: float, points: Sequence[tuple[float, float]]) -> None:
    """Fill a polygon given in unit coordinates, stretched so its own extent fills the canvas."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    scaled = [((px - x0) / (x1 - x0) * w, (py - y0) / (y1 - y0) * h) for px, py in points]
    draw.polygon(scaled, fill=255)


def _star_points(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    """Vertices of an ``n``-pointed star pointing up, inner radius ``inner`` (outer radius 1)."""
    points = []
    for k in range(2 * n):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / n
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


# --------------------------------------------------------------------------- painters (unit geometry)
def _paint_circle(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a filled circle (an ellipse on a canvas that is not square)."""
    d.ellipse((0, 0, w - 1, h - 1), fill=255)


def _paint_square(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a filled square (a rectangle on a canvas that is not square)."""
    d.rectangle((0, 0, w - 1, h - 1), fill=255)


def _paint_triangle(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw an upward-pointing isosceles triangle."""
    _polygon(d, w, h, [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)])


def _paint_star(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a five-pointed star pointing up."""
    _polygon(d, w, h, _star_points(5, 0.45))


def _paint_cross(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a bold plus-shaped (Greek) cross."""
    t = 0.32  # arm half-width as a fraction of the box: a bold plus sign (Greek cross)
    a, b = 0.5 - t / 2, 0.5 + t / 2
    _polygon(
        d,
        w,
        h,
        [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)],
    )


def _paint_heart(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a heart."""
    ts = np.linspace(0.0, 2 * math.pi, 120, endpoint=False)
    xs = 16 * np.sin(ts) ** 3
    ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    _polygon(d, w, h, list(zip(xs.tolist(), ys.tolist(), strict=True)))


def _paint_diamond(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a diamond (rhombus standing on a corner)."""
    _polygon(d, w, h, [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)])


def _paint_arrow(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw an arrow pointing right."""
    _polygon(d, w, h, [(0, 0.32), (0.5, 0.32), (0.5, 0), (1, 0.5), (0.5, 1), (0.5, 0.68), (0, 0.68)])


def _paint_ring(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a ring (annulus)."""
    d.ellipse((0, 0, w - 1, h - 1), fill=255)
    t = 0.24  # ring thickness as a fraction of the box
    d.ellipse((w * t, h * t, w * (1 - t) - 1, h * (1 - t) - 1), fill=0)


def _paint_crescent(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a crescent moon opening to the right."""
    # A disc of diameter D with an equal disc shifted right by 0.45 D cut out; the remaining crescent spans
    # x in [0, 0.725 D] (where the two circles cross), so D is chosen to make that span the full width.
    shift = 0.45
    disc_w = w / (0.5 + shift / 2)
    d.ellipse((0, 0, disc_w - 1, h - 1), fill=255)
    d.ellipse((shift * disc_w, -0.06 * h, (1 + shift) * disc_w - 1, 1.06 * h - 1), fill=0)


def _paint_hexagon(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a regular hexagon with flat top and bottom."""
    _polygon(d, w, h, [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)])


def _paint_house(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a house silhouette (roof, walls, door and window cut out)."""
    roof = 0.42
    d.polygon([(w / 2, 0), (w, h * roof), (0, h * roof)], fill=255)
    d.rectangle((w * 0.12, h * roof - 1, w * 0.88 - 1, h - 1), fill=255)
    d.rectangle((w * 0.42, h * 0.68, w * 0.58 - 1, h - 1), fill=0)  # door
    d.rectangle((w * 0.2, h * 0.52, w * 0.34 - 1, h * 0.64), fill=0)  # window


def _paint_tree(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a fir tree silhouette."""
    # A fir tree: three stacked triangles and a trunk.
    for top, bottom, half in ((0.0, 0.38, 0.3), (0.16, 0.6, 0.4), (0.34, 0.82, 0.5)):
        d.polygon([(w / 2, h * top), (w * (0.5 + half), h * bottom), (w * (0.5 - half), h * bottom)], fill=255)
    d.rectangle((w * 0.42, h * 0.8, w * 0.58 - 1, h - 1), fill=255)


def _paint_sun(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a sun: a disc with eight triangular rays."""
    cx, cy = w / 2, h / 2
    core = 0.3
    d.ellipse((cx - core * w, cy - core * h, cx + core * w - 1, cy + core * h - 1), fill=255)
    for k in range(8):
        angle = k * math.pi / 4
        spread = math.pi / 16
        tip = (cx + 0.5 * w * math.cos(angle), cy + 0.5 * h * math.sin(angle))
        base1 = (cx + 0.34 * w * math.cos(angle - spread), cy + 0.34 * h * math.sin(angle - spread))
        base2 = (cx + 0.34 * w * math.cos(angle + spread), cy + 0.34 * h * math.sin(angle + spread))
        d.polygon([tip, base1, base2], fill=255)


def _paint_car(d: ImageDraw.ImageDraw, w: float, h: float) -> None:
    """Draw a car seen from the side, facing right."""
    # Side view, facing right: cabin, body, two wheels; windows cut out.
    d.polygon([(w * 0.22, h * 0.38), (w * 0.32, h * 0.02), (w * 0.66, h * 0.02), (w * 0.8, h * 0.38)], fill=255)
    d.rounded_rectangle((0, h * 0.32, w - 1, h * 0.78), radius=min(w, h) * 0.12, fill=255)
    d.polygon([(w * 0.3, h * 0.34), (w * 0.36, h * 0.1), (w * 0.47, h * 0.1), (w * 0.47, h * 0.34)], fill=0)
    d.polygon([(w * 0.51, h * 0.34), (w * 0.51, h * 0.1), (w * 0.63, h * 0.1), (w * 0.73, h * 0.34)], fill=0)
    r = h * 0.22
    for cx in (w * 0.24, w * 0.76):
        d.ellipse((cx - r, h - 2 * r, cx + r - 1, h - 1), fill=255)


#: Every drawable object kind and its painter. The first five are the training shapes.
PAINTERS: dict[str, Painter] = {
    "circle": _paint_circle,
    "square": _paint_square,
    "triangle": _paint_triangle,
    "star": _paint_star,
    "cross": _paint_cross,
    "heart": _paint_heart,
    "diamond": _paint_diamond,
    "arrow": _paint_arrow,
    "ring": _paint_ring,
    "crescent": _paint_crescent,
    "hexagon": _paint_hexagon,
    "house": _paint_house,
    "tree": _paint_tree,
    "sun": _paint_sun,
    "car": _paint_car,
}
#: The five basic shapes used by the question-answer scenes.
BASIC_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
#: All object kinds :func:`draw_shape` knows.
SHAPE_KINDS: tuple[str, ...] = tuple(PAINTERS)
#: Width / height ratio at which a kind looks natural (1.0 when absent).
NATURAL_ASPECT: dict[str, float] = {"car": 1.7, "arrow": 1.5, "crescent": 0.7, "tree": 0.8}


def shape_mask(kind: str, width: int, height: int | None = None) -> Image.Image:
    """Anti-aliased coverage mask of object ``kind`` filling a ``width`` x ``height`` box.

    Args:
        kind: One of :data:`SHAPE_KINDS`.
        width: Box width in pixels (>= 1).
        height: Box height in pixels; defaults to ``width``.

    Returns:
        A mode ``"L"`` image of exactly ``width`` x ``height`` pixels.

    Raises:
        KeyError: Unknown kind.
        ValueError: Box smaller than one pixel.
    """
    if kind not in PAINTERS:
        raise KeyError(f"unknown shape kind {kind!r}; known: {', '.join(SHAPE_KINDS)}")
    return _rasterise(PAINTERS[kind], width, width if height is None else height)


def draw_shape(image: Image.Image, kind: str, box: BBox, colour: RGB) -> BBox:
    """Draw object ``kind`` in ``colour`` so that it fills ``box``.

    Args:
        image: RGB image, modified in place.
        kind: One of :data:`SHAPE_KINDS`.
        box: ``(left, top, right, bottom)``, right/bottom exclusive.
        colour: Fill colour.

    Returns:
        The exact box of the changed pixels (inside ``box``; equal to it for most kinds).
    """
    left, top, right, bottom = box
    return paint_mask(image, shape_mask(kind, right - left, bottom - top), (left, top), colour)


# --------------------------------------------------------------------------- vision-patch helpers
def patch_box(row: int, col: int, patch_size: int = 14) -> BBox:
    """The pixel box of vision patch ``(row, col)`` on a grid of ``patch_size`` px patches."""
    return col * patch_size, row * patch_size, (col + 1) * patch_size, (row + 1) * patch_size


def patches_covered(bbox: BBox, patch_size: int = 14) -> list[tuple[int, int]]:
    """Every ``(row, col)`` patch that shares at least one pixel with ``bbox`` (row-major order)."""
    left, top, right, bottom = bbox
    rows = range(top // patch_size, (bottom - 1) // patch_size + 1)
    cols = range(left // patch_size, (right - 1) // patch_size + 1)
    return [(r, c) for r in rows for c in cols]
