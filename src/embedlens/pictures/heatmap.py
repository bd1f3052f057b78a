"""The dataset heatmap: for each group, where on the patch grid a dataset's tokens fall in that group.

One panel per group; each cell's colour says which fraction of the images has its token at that cell in
that group (matplotlib's viridis, :func:`embedlens.pictures.colour.fraction_colours`); cells without data
are hatched grey; a shared colour bar (0 .. 1) and a caption sit below. Drawn with PIL, so that every
cell has an exact, documented pixel position (:func:`heatmap_layout`, :func:`heatmap_cell_origin`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from embedlens.errors import InputError
from embedlens.pictures.colour import HATCH, NO_DATA, fraction_colours
from embedlens.pictures.save import save_png
from embedlens.taxonomy.groups import ALL_GROUPS

#: Hatch period in pixels (a diagonal line every ``HATCH_STEP`` pixels).
HATCH_STEP = 6
#: Heatmap layout (pixels): outer padding, panel title height, smallest panel width, colour bar
#: height and longest width, height of the bar's labels and of the caption line, font size.
HEAT_PAD = 8
TITLE_H = 18
MIN_PANEL_WIDTH = 128
BAR_H = 12
MAX_BAR_WIDTH = 256
LABEL_H = 16
CAPTION_H = 18
HEAT_FONT = 12
#: Side of the "no data" key in the caption.
KEY_SWATCH = 12
#: Smallest heatmap cell, in pixels.
MIN_HEAT_CELL = 4
#: Colour of the panel and colour bar outlines, and of all text.
OUTLINE = (90, 90, 90)
TEXT = (0, 0, 0)


def check_fractions(fractions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate heatmap input and return it as float64 arrays in the pictures' group order.

    Args:
        fractions: Group name -> fraction of images whose token at each grid cell is in that group,
            shape ``[rows, cols]`` (the same for every group), values in ``[0, 1]`` or NaN (no data).

    Raises:
        InputError: No groups, an unknown group, an array that is not 2-D and numeric, shapes that
            differ, or a value outside ``[0, 1]`` that is not NaN.
    """
    if not isinstance(fractions, Mapping) or not fractions:
        raise InputError("the heatmap needs a mapping from group names to [rows, cols] fraction arrays")
    unknown = [name for name in fractions if name not in ALL_GROUPS]
    if unknown:
        raise InputError(f"unknown group {unknown[0]!r} in the heatmap; groups are {', '.join(ALL_GROUPS)}")
    out: dict[str, np.ndarray] = {}
    for name in (g for g in ALL_GROUPS if g in fractions):
        try:
            array = np.asarray(fractions[name], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise InputError(f"{name} fractions are not numbers: {err}") from err
        if array.ndim != 2 or 0 in array.shape:
            raise InputError(f"{name} fractions must be a non-empty 2-D [rows, cols] array, got shape {array.shape}")
        if out:
            first, known = next(iter(out.items()))
            if array.shape != known.shape:
                raise InputError(
                    f"{name} fractions have shape {array.shape} but {first} has {known.shape}; groups share one grid"
                )
        bad = array[~np.isnan(array) & ((array < 0.0) | (array > 1.0))]
        if bad.size:
            raise InputError(f"{name} fractions must lie in [0, 1] (NaN = no data), found {bad.flat[0]!r}")
        out[name] = array
    return out


def heatmap_layout(shape: tuple[int, int], panels: int, *, cell: int = 24, caption: bool = False) -> dict[str, int]:
    """Pixel layout of :func:`draw_group_heatmap`.

    Args:
        shape: ``(rows, cols)`` of the grid.
        panels: Number of groups drawn.
        cell: Side of one grid cell.
        caption: Whether a caption line is drawn under the colour bar.

    Returns:
        ``panel_width = max(cols * cell, 128)``; ``width = 8 + panels * (panel_width + 8)``;
        ``grid_top = 8 + 18`` (panel titles above it); ``bar_top = grid_top + rows * cell + 8``;
        ``bar_width = min(256, width - 16)``; ``height = bar_top + 12 + 16 (+ 18 with a caption) + 8``.
    """
    rows, cols = shape
    panel_width = max(cols * cell, MIN_PANEL_WIDTH)
    width = HEAT_PAD + panels * (panel_width + HEAT_PAD)
    grid_top = HEAT_PAD + TITLE_H
    bar_top = grid_top + rows * cell + HEAT_PAD
    height = bar_top + BAR_H + LABEL_H + (CAPTION_H if caption else 0) + HEAT_PAD
    return {
        "panel_width": panel_width,
        "width": width,
        "height": height,
        "grid_top": grid_top,
        "bar_top": bar_top,
        "bar_width": min(MAX_BAR_WIDTH, width - 2 * HEAT_PAD),
    }


def heatmap_cell_origin(
    group_index: int, row: int, col: int, shape: tuple[int, int], *, cell: int = 24
) -> tuple[int, int]:
    """Top-left pixel ``(x, y)`` of grid cell ``(row, col)`` in panel ``group_index`` of the heatmap
    (panels in :data:`ALL_GROUPS` order among the groups given; each grid is centred in its panel)."""
    layout = heatmap_layout(shape, 1, cell=cell)
    left = _panel_left(group_index, layout["panel_width"]) + (layout["panel_width"] - shape[1] * cell) // 2
    return left + col * cell, layout["grid_top"] + row * cell


def panel_title(group: str, fractions: np.ndarray) -> str:
    """A heatmap panel's title: the group and the mean of its cells with data (``fractions``
    ``[rows, cols]``), e.g. ``"dead  mean 0.12"``; ``"mean n/a"`` when every cell is NaN."""
    values = np.asarray(fractions, dtype=np.float64)
    known = values[~np.isnan(values)]
    return f"{group}  mean {float(known.mean()):.2f}" if known.size else f"{group}  mean n/a"


def draw_group_heatmap(
    fractions: Mapping[str, np.ndarray], *, images: int | None = None, cell: int = 24
) -> Image.Image:
    """Draw, per group, where on the patch grid a dataset's tokens fall in that group.

    Args:
        fractions: Group name (``vit_sink``, ``llm_sink``, ``dead``, ``alive``) -> array ``[rows, cols]``,
            the fraction of images whose token at each cell is in that group, in ``[0, 1]``; NaN marks a
            cell without data. All arrays share one shape.
        images: Number of images the fractions come from, written in the caption (None: no count).
        cell: Side of one grid cell in pixels (at least 4).

    Returns:
        An RGB picture laid out by :func:`heatmap_layout`: one panel per given group, left to right in
        the order vit_sink, llm_sink, dead, alive, titled ``"<group>  mean <m>"`` (the mean over cells
        with data); each cell filled with the viridis colour of its value
        (:func:`~embedlens.pictures.colour.fraction_colour`), NaN cells :data:`NO_DATA` with
        :data:`HATCH` diagonals; below, a shared colour bar labelled 0 and 1; and a caption line
        (``"<n> images"``, and a "no data" key when a cell is NaN) when there is something to say.

    Raises:
        InputError: Bad fractions (see :func:`check_fractions`), image count or cell size.
    """
    checked = check_fractions(fractions)
    if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images <= 0):
        raise InputError(f"the image count must be a positive integer, got {images!r}")
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < MIN_HEAT_CELL:
        raise InputError(f"the heatmap cell must be an integer of at least {MIN_HEAT_CELL} pixels, got {cell!r}")
    shape = next(iter(checked.values())).shape
    has_nan = any(bool(np.isnan(array).any()) for array in checked.values())
    layout = heatmap_layout(shape, len(checked), cell=cell, caption=images is not None or has_nan)
    picture = Image.new("RGB", (layout["width"], layout["height"]), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=HEAT_FONT)
    for index, (name, array) in enumerate(checked.items()):
        _draw_panel(picture, draw, font, index, name, array, cell)
    _draw_colour_bar(picture, draw, font, layout)
    if images is not None or has_nan:
        _draw_caption(picture, draw, font, layout, images, has_nan)
    return picture


def save_group_heatmap(
    fractions: Mapping[str, np.ndarray], path: str | Path, *, images: int | None = None, cell: int = 24
) -> Path:
    """Write :func:`draw_group_heatmap` as a PNG (atomically) and return its path."""
    return save_png(draw_group_heatmap(fractions, images=images, cell=cell), path)


def _panel_left(index: int, panel_width: int) -> int:
    """Left edge of panel ``index``."""
    return HEAT_PAD + index * (panel_width + HEAT_PAD)


def _hatch_tile(cell: int) -> np.ndarray:
    """A ``cell x cell`` no-data tile, uint8 ``[cell, cell, 3]``: :data:`NO_DATA` with :data:`HATCH` on
    every ``HATCH_STEP``-th diagonal."""
    y, x = np.mgrid[0:cell, 0:cell]
    return np.where(((x + y) % HATCH_STEP == 0)[..., None], np.asarray(HATCH), np.asarray(NO_DATA)).astype(np.uint8)


def _grid_pixels(array: np.ndarray, cell: int) -> np.ndarray:
    """A panel's grid as uint8 RGB ``[rows * cell, cols * cell, 3]``: each cell its value's colour,
    NaN cells the hatch tile."""
    rows, cols = array.shape
    filled = np.repeat(np.repeat(fraction_colours(array), cell, axis=0), cell, axis=1)
    missing = np.repeat(np.repeat(np.isnan(array), cell, axis=0), cell, axis=1)
    hatch = np.tile(_hatch_tile(cell), (rows, cols, 1))
    return np.where(missing[..., None], hatch, filled)


def _draw_panel(
    picture: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.FreeTypeFont,
    index: int,
    name: str,
    array: np.ndarray,
    cell: int,
) -> None:
    """Panel ``index``: its title and its grid of cells (``array`` of shape ``[rows, cols]``)."""
    rows, cols = array.shape
    x0, y0 = heatmap_cell_origin(index, 0, 0, (rows, cols), cell=cell)
    picture.paste(Image.fromarray(_grid_pixels(array, cell), "RGB"), (x0, y0))
    left = _panel_left(index, heatmap_layout((rows, cols), 1, cell=cell)["panel_width"])
    draw.text((left, HEAT_PAD + 2), panel_title(name, array), fill=TEXT, font=font)
    draw.rectangle((x0 - 1, y0 - 1, x0 + cols * cell, y0 + rows * cell), outline=OUTLINE)


def _draw_colour_bar(
    picture: Image.Image, draw: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont, layout: dict[str, int]
) -> None:
    """The shared colour bar (0 at the left, 1 at the right) with its two labels."""
    width, top = layout["bar_width"], layout["bar_top"]
    ramp = fraction_colours(np.arange(width) / max(width - 1, 1))
    bar = np.broadcast_to(ramp[None, :, :], (BAR_H, width, 3))
    picture.paste(Image.fromarray(np.ascontiguousarray(bar), "RGB"), (HEAT_PAD, top))
    draw.rectangle((HEAT_PAD - 1, top - 1, HEAT_PAD + width, top + BAR_H), outline=OUTLINE)
    draw.text((HEAT_PAD, top + BAR_H + 2), "0", fill=TEXT, font=font)
    one = draw.textlength("1", font=font)
    draw.text((HEAT_PAD + width - one, top + BAR_H + 2), "1", fill=TEXT, font=font)


def _draw_caption(
    picture: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.FreeTypeFont,
    layout: dict[str, int],
    images: int | None,
    has_nan: bool,
) -> None:
    """The caption line: the number of images and, when some cell is NaN, a "no data" key."""
    y = layout["bar_top"] + BAR_H + LABEL_H + 2
    x = HEAT_PAD
    if images is not None:
        text = f"{images} image" if images == 1 else f"{images} images"
        draw.text((x, y), text, fill=TEXT, font=font)
        x += int(draw.textlength(text, font=font)) + 12
    if has_nan:
        picture.paste(Image.fromarray(_hatch_tile(KEY_SWATCH), "RGB"), (x, y + 1))
        draw.text((x + KEY_SWATCH + 4, y), "no data", fill=TEXT, font=font)
