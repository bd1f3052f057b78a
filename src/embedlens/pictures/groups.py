"""The group map of one image: every visual token's patch cell tinted in its group's colour.

Drawn with PIL over the picture the model saw (or a grey canvas): vit_sink, llm_sink and dead cells are
blended with their group's colour (:data:`embedlens.taxonomy.groups.COLOURS`, Okabe-Ito: vermillion,
blue, bluish green), alive cells are left as they are, thin white lines mark the cells, and a legend
strip below gives each group's swatch and token count. A result with several views gets one grid panel
per view, each on that view's picture, side by side above one legend (:mod:`embedlens.pictures.panels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from embedlens.errors import InputError
from embedlens.pictures.colour import RGB
from embedlens.pictures.panels import Pictures, join_panels, joined_size, picture_for
from embedlens.pictures.save import save_png
from embedlens.taxonomy.groups import ALL_GROUPS, COLOURS, GROUPS

if TYPE_CHECKING:
    from embedlens.taxonomy.result import ClassifiedResult

#: Groups whose cells :func:`draw_group_map` tints (alive tokens show the image unchanged).
PAINTED: tuple[str, ...] = GROUPS

#: Canvas colour of a group map drawn without an image.
CANVAS_GREY: RGB = (128, 128, 128)
#: Colour of the one-pixel cell borders of a group map.
BORDER: RGB = (255, 255, 255)
#: Smallest cell of a group map, in pixels.
MIN_MAP_CELL = 32
#: Smallest width of a group map, so that the legend is readable on small grids.
MIN_MAP_WIDTH = 140
#: Legend strip layout: padding, one line per group, swatch side, font size (pixels).
LEGEND_PAD = 6
LEGEND_LINE = 18
LEGEND_SWATCH = 12
LEGEND_FONT = 12


@dataclass(frozen=True)
class LegendEntry:
    """One line of a group map's legend.

    Attributes:
        group: The group's name.
        colour: Its swatch colour.
        count: Tokens of the image in the group.
    """

    group: str
    colour: RGB
    count: int

    @property
    def text(self) -> str:
        """The legend's text, e.g. ``"vit_sink 3"``."""
        return f"{self.group} {self.count}"


def legend_entries(result: ClassifiedResult) -> list[LegendEntry]:
    """The legend of :func:`draw_group_map`: one entry per group (vit_sink, llm_sink, dead, alive)."""
    counts = result.counts
    return [LegendEntry(name, COLOURS[name], int(counts.get(name, 0))) for name in ALL_GROUPS]


def map_cell(result: ClassifiedResult, image: Image.Image | None = None) -> int:
    """Side in pixels of one patch cell of :func:`draw_group_map` (of a single-view result, or of one
    view's :meth:`~embedlens.taxonomy.result.ClassifiedResult.part`): ``max(32, width // cols)`` of the
    picture drawn on (32 on the grey canvas)."""
    base = _map_base(result, image)
    cols = result.probe.grid[1]
    return MIN_MAP_CELL if base is None else max(MIN_MAP_CELL, base.width // cols)


def map_size(result: ClassifiedResult, image: Pictures = None) -> tuple[int, int]:
    """``(width, height)`` of :func:`draw_group_map`'s picture: the grid is ``cols * cell`` by
    ``rows * cell`` pixels (:func:`map_cell`), the width at least 140, plus the legend strip below.
    With several views, the grids' panels side by side (:func:`~embedlens.pictures.panels.joined_size`)
    take the grid's place."""
    if len(result.probe.views) > 1:
        sizes = []
        for v in range(len(result.probe.views)):
            part = result.part(v)
            cell = map_cell(part, picture_for(image, v))
            sizes.append((part.probe.grid[1] * cell, part.probe.grid[0] * cell))
        width, height = joined_size(sizes)
        return max(width, MIN_MAP_WIDTH), height + legend_height()
    rows, cols = result.probe.grid
    cell = map_cell(result, picture_for(image, 0))
    return max(cols * cell, MIN_MAP_WIDTH), rows * cell + legend_height()


def legend_height() -> int:
    """Height in pixels of the legend strip: padding above and below, one line per group."""
    return 2 * LEGEND_PAD + len(ALL_GROUPS) * LEGEND_LINE


def draw_group_map(result: ClassifiedResult, image: Pictures = None, *, alpha: float = 0.45) -> Image.Image:
    """Tint every visual token's patch cell in its group's colour over the model's view of the image.

    Args:
        result: A classification (its probe's ``grid``, ``row`` and ``col`` place the tokens).
        image: The picture to draw on, resized (bicubic) to the grid's ``cols * cell`` by
            ``rows * cell`` pixels; None uses the picture the model saw (the probe's ``view``) when the
            result carries it, else a grey canvas (:data:`CANVAS_GREY`). With several views, one
            picture per view (or one for all); each view is drawn on its own picture.
        alpha: Opacity of the tint: a pixel of a vit_sink, llm_sink or dead cell becomes
            ``round((1 - alpha) * pixel + alpha * colour)`` (see :func:`embedlens.pictures.colour.blend`);
            alive cells are unchanged.

    Returns:
        An RGB picture of :func:`map_size`: the grid at the top left, one-pixel :data:`BORDER` lines on
        the cell edges, and a white legend strip below (:func:`legend_entries`: a swatch and
        ``"<group> <count>"`` per group, counting every view's tokens). With several views, the grid's
        place holds :func:`group_panels` side by side under the view names.

    Raises:
        InputError: ``alpha`` is not a number in ``[0, 1]``, or the result's tokens do not fit its grid.
    """
    panels = group_panels(result, image, alpha=alpha)
    grids = panels[0] if len(panels) == 1 else join_panels(list(zip(_names(result), panels, strict=True)))
    width, height = map_size(result, image)
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    picture.paste(grids, (0, 0))
    _draw_legend(ImageDraw.Draw(picture), legend_entries(result), top=grids.height)
    return picture


def group_panels(result: ClassifiedResult, image: Pictures = None, *, alpha: float = 0.45) -> list[Image.Image]:
    """One tinted grid per view of ``result`` (without the legend), each on its view's picture (see
    :func:`draw_group_map`), of ``cols * cell`` by ``rows * cell`` pixels.

    Raises:
        InputError: ``alpha`` is not a number in ``[0, 1]``, or a view's tokens do not fit its grid.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if len(result.probe.views) == 1:
        return [_view_grid(result, picture_for(image, 0), float(alpha))]
    return [_view_grid(result.part(v), picture_for(image, v), float(alpha)) for v in range(len(result.probe.views))]


def _names(result: ClassifiedResult) -> list[str]:
    return [view.name for view in result.probe.views]


def _view_grid(result: ClassifiedResult, image: Image.Image | None, alpha: float) -> Image.Image:
    """The tinted grid of a single-view result, with its cell borders."""
    rows, cols = _checked_grid(result)
    cell = map_cell(result, image)
    pixels = _map_pixels(_map_base(result, image), rows * cell, cols * cell)
    for i, group in enumerate(result.group):
        if group in PAINTED:
            r, c = int(result.probe.row[i]), int(result.probe.col[i])
            block = pixels[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
            block[...] = (1.0 - alpha) * block + alpha * np.asarray(COLOURS[str(group)], dtype=np.float64)
    grid = Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")
    _draw_borders(ImageDraw.Draw(grid), rows, cols, cell)
    return grid


def save_group_map(result: ClassifiedResult, path: str | Path, image: Pictures = None) -> Path:
    """Write :func:`draw_group_map` as a PNG (atomically) and return its path."""
    return save_png(draw_group_map(result, image), path)


def _map_base(result: ClassifiedResult, image: Image.Image | None) -> Image.Image | None:
    """The picture a group map is drawn on: ``image``, else the probe's view, else None (grey)."""
    return image if image is not None else result.probe.view


def _checked_grid(result: ClassifiedResult) -> tuple[int, int]:
    """The probe's ``(rows, cols)``, checked against its tokens' rows and columns."""
    rows, cols = (int(v) for v in result.probe.grid)
    row, col = np.asarray(result.probe.row), np.asarray(result.probe.col)
    if rows <= 0 or cols <= 0 or len(result) > rows * cols:
        raise InputError(f"the result's grid {rows} x {cols} cannot hold its {len(result)} tokens")
    if len(result) and (row.min() < 0 or row.max() >= rows or col.min() < 0 or col.max() >= cols):
        raise InputError(f"the result's token rows / columns fall outside its {rows} x {cols} grid")
    return rows, cols


def _map_pixels(base: Image.Image | None, height: int, width: int) -> np.ndarray:
    """The map's background as float64 RGB, shape ``[height, width, 3]``."""
    if base is None:
        return np.broadcast_to(np.asarray(CANVAS_GREY, dtype=np.float64), (height, width, 3)).copy()
    resized = base.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float64).copy()


def _draw_borders(draw: ImageDraw.ImageDraw, rows: int, cols: int, cell: int) -> None:
    """One-pixel lines on every cell edge (the last ones on the grid's last pixel row / column)."""
    right, bottom = cols * cell - 1, rows * cell - 1
    for r in range(rows + 1):
        y = min(r * cell, bottom)
        draw.line([(0, y), (right, y)], fill=BORDER, width=1)
    for c in range(cols + 1):
        x = min(c * cell, right)
        draw.line([(x, 0), (x, bottom)], fill=BORDER, width=1)


def _draw_legend(draw: ImageDraw.ImageDraw, entries: list[LegendEntry], *, top: int) -> None:
    """A swatch (outlined) and the entry's text per line, starting ``LEGEND_PAD`` below ``top``."""
    font = ImageFont.load_default(size=LEGEND_FONT)
    for i, entry in enumerate(entries):
        y = top + LEGEND_PAD + i * LEGEND_LINE
        swatch = (LEGEND_PAD, y + 2, LEGEND_PAD + LEGEND_SWATCH - 1, y + 1 + LEGEND_SWATCH)
        draw.rectangle(swatch, fill=entry.colour, outline=(90, 90, 90))
        draw.text((LEGEND_PAD + LEGEND_SWATCH + 6, y + 1), entry.text, fill=(0, 0, 0), font=font)
