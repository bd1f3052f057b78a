"""Pictures of the sink / dead / alive taxonomy: one image's group map and a dataset heatmap.

* :func:`draw_group_map`: the picture the model saw, with every visual token's patch cell tinted in its
  group's colour, thin cell borders, and a legend strip below with each group's token count.
* :func:`draw_group_heatmap`: for each group, a panel of the patch grid where each cell's colour says
  which fraction of a dataset's images has its token at that cell in that group, with a shared colour
  bar (0 .. 1) and a caption.

Colours come from the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies):
ViT sinks vermillion, LLM sinks blue, dead tokens bluish green; alive cells are left unpainted. The
heatmap uses viridis, whose lightness grows monotonically with the value. Only PIL is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from embedlens.errors import InputError
from embedlens.paths import atomic_path
from embedlens.taxonomy.groups import ALL_GROUPS, GROUPS
from embedlens.taxonomy.groups import COLOURS as GROUP_COLOURS
from embedlens.taxonomy.result import ClassifiedResult

__all__ = [
    "ALL_GROUPS",
    "CANVAS_GREY",
    "GROUP_COLOURS",
    "HATCH",
    "NO_DATA",
    "LegendEntry",
    "blend",
    "check_fractions",
    "draw_group_heatmap",
    "draw_group_map",
    "fraction_colour",
    "heatmap_cell_origin",
    "heatmap_layout",
    "legend_entries",
    "map_cell",
    "map_size",
    "panel_title",
    "save_group_heatmap",
    "save_group_map",
]

RGB = tuple[int, int, int]

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

#: Heatmap colour of a cell without data (NaN), and of the hatch lines drawn over it.
NO_DATA: RGB = (210, 210, 210)
HATCH: RGB = (150, 150, 150)
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
#: Smallest heatmap cell, in pixels.
MIN_HEAT_CELL = 4

#: viridis at 0, 0.1, ..., 1 (matplotlib's values, rounded); colours in between are interpolated linearly.
_VIRIDIS = np.array(
    [
        (68, 1, 84),
        (72, 36, 117),
        (65, 68, 135),
        (53, 95, 141),
        (42, 120, 142),
        (33, 145, 140),
        (34, 168, 132),
        (68, 191, 112),
        (122, 209, 81),
        (189, 223, 38),
        (253, 231, 37),
    ],
    dtype=np.float64,
)


# --------------------------------------------------------------------------- group map
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
    return [LegendEntry(name, GROUP_COLOURS[name], int(counts.get(name, 0))) for name in ALL_GROUPS]


def blend(base: RGB, colour: RGB, alpha: float) -> RGB:
    """The tint :func:`draw_group_map` gives a pixel: ``round((1 - alpha) * base + alpha * colour)`` per channel."""
    mixed = (1.0 - alpha) * np.asarray(base, dtype=np.float64) + alpha * np.asarray(colour, dtype=np.float64)
    r, g, b = (int(v) for v in np.rint(mixed))
    return r, g, b


def map_cell(result: ClassifiedResult, image: Image.Image | None = None) -> int:
    """Side in pixels of one patch cell of :func:`draw_group_map`: ``max(32, width // cols)`` of the
    picture drawn on (32 on the grey canvas)."""
    base = _map_base(result, image)
    cols = result.probe.grid[1]
    return MIN_MAP_CELL if base is None else max(MIN_MAP_CELL, base.width // cols)


def map_size(result: ClassifiedResult, image: Image.Image | None = None) -> tuple[int, int]:
    """``(width, height)`` of :func:`draw_group_map`'s picture: the grid is ``cols * cell`` by
    ``rows * cell`` pixels (:func:`map_cell`), the width at least 140, plus the legend strip below."""
    rows, cols = result.probe.grid
    cell = map_cell(result, image)
    return max(cols * cell, MIN_MAP_WIDTH), rows * cell + _legend_height()


def draw_group_map(result: ClassifiedResult, image: Image.Image | None = None, *, alpha: float = 0.45) -> Image.Image:
    """Tint every visual token's patch cell in its group's colour over the model's view of the image.

    Args:
        result: A classification (its probe's ``grid``, ``row`` and ``col`` place the tokens).
        image: The picture to draw on, resized (bicubic) to the grid's ``cols * cell`` by
            ``rows * cell`` pixels; None uses the picture the model saw (the probe's ``view``) when the
            result carries it, else a grey canvas (:data:`CANVAS_GREY`).
        alpha: Opacity of the tint: a pixel of a vit_sink, llm_sink or dead cell becomes
            ``round((1 - alpha) * pixel + alpha * colour)`` (see :func:`blend`); alive cells are unchanged.

    Returns:
        An RGB picture of :func:`map_size`: the grid at the top left, one-pixel :data:`BORDER` lines on
        the cell edges, and a white legend strip below (:func:`legend_entries`: a swatch and
        ``"<group> <count>"`` per group).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    rows, cols = _checked_grid(result)
    cell = map_cell(result, image)
    width, height = map_size(result, image)
    pixels = _map_pixels(_map_base(result, image), rows * cell, cols * cell)
    for i, group in enumerate(result.group):
        if group in PAINTED:
            r, c = int(result.probe.row[i]), int(result.probe.col[i])
            block = pixels[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
            block[...] = (1.0 - alpha) * block + alpha * np.asarray(GROUP_COLOURS[str(group)], dtype=np.float64)
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    picture.paste(Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB"), (0, 0))
    draw = ImageDraw.Draw(picture)
    _draw_borders(draw, rows, cols, cell)
    _draw_legend(draw, legend_entries(result), top=rows * cell)
    return picture


def save_group_map(result: ClassifiedResult, path: str | Path, image: Image.Image | None = None) -> Path:
    """Write :func:`draw_group_map` as a PNG (atomically) and return its path."""
    return _save_png(draw_group_map(result, image), path)


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


def _legend_height() -> int:
    return 2 * LEGEND_PAD + len(ALL_GROUPS) * LEGEND_LINE


def _draw_legend(draw: ImageDraw.ImageDraw, entries: list[LegendEntry], *, top: int) -> None:
    """A swatch (outlined) and the entry's text per line, starting ``LEGEND_PAD`` below ``top``."""
    font = ImageFont.load_default(size=LEGEND_FONT)
    for i, entry in enumerate(entries):
        y = top + LEGEND_PAD + i * LEGEND_LINE
        swatch = (LEGEND_PAD, y + 2, LEGEND_PAD + LEGEND_SWATCH - 1, y + 1 + LEGEND_SWATCH)
        draw.rectangle(swatch, fill=entry.colour, outline=(90, 90, 90))
        draw.text((LEGEND_PAD + LEGEND_SWATCH + 6, y + 1), entry.text, fill=(0, 0, 0), font=font)


# --------------------------------------------------------------------------- dataset heatmap
def fraction_colour(value: float) -> RGB:
    """The heatmap colour of a fraction in ``[0, 1]`` (viridis, dark to light); :data:`NO_DATA` for NaN."""
    if np.isnan(value):
        return NO_DATA
    position = min(max(float(value), 0.0), 1.0) * (len(_VIRIDIS) - 1)
    low = min(int(position), len(_VIRIDIS) - 2)
    mixed = _VIRIDIS[low] + (position - low) * (_VIRIDIS[low + 1] - _VIRIDIS[low])
    r, g, b = (int(v) for v in np.rint(mixed))
    return r, g, b


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


def _panel_left(index: int, panel_width: int) -> int:
    """Left edge of panel ``index``."""
    return HEAT_PAD + index * (panel_width + HEAT_PAD)


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
        with data); each cell filled with :func:`fraction_colour` of its value, NaN cells
        :data:`NO_DATA` with :data:`HATCH` diagonals; below, a shared colour bar labelled 0 and 1; and
        a caption line (``"<n> images"``, and a "no data" key when a cell is NaN) when there is
        something to say.

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
    return _save_png(draw_group_heatmap(fractions, images=images, cell=cell), path)


def panel_title(group: str, fractions: np.ndarray) -> str:
    """A heatmap panel's title: the group and the mean of its cells with data (``fractions``
    ``[rows, cols]``), e.g. ``"dead  mean 0.12"``; ``"mean n/a"`` when every cell is NaN."""
    values = np.asarray(fractions, dtype=np.float64)
    known = values[~np.isnan(values)]
    return f"{group}  mean {float(known.mean()):.2f}" if known.size else f"{group}  mean n/a"


def _hatch_tile(cell: int) -> Image.Image:
    """A ``cell x cell`` no-data tile: :data:`NO_DATA` with :data:`HATCH` on every ``HATCH_STEP``-th diagonal."""
    y, x = np.mgrid[0:cell, 0:cell]
    tile = np.where(((x + y) % HATCH_STEP == 0)[..., None], np.asarray(HATCH), np.asarray(NO_DATA))
    return Image.fromarray(tile.astype(np.uint8), "RGB")


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
    hatch = _hatch_tile(cell)
    for r in range(rows):
        for c in range(cols):
            x, y = heatmap_cell_origin(index, r, c, (rows, cols), cell=cell)
            if np.isnan(array[r, c]):
                picture.paste(hatch, (x, y))
            else:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fraction_colour(float(array[r, c])))
    x0, y0 = heatmap_cell_origin(index, 0, 0, (rows, cols), cell=cell)
    left = _panel_left(index, heatmap_layout((rows, cols), 1, cell=cell)["panel_width"])
    draw.text((left, HEAT_PAD + 2), panel_title(name, array), fill=(0, 0, 0), font=font)
    draw.rectangle((x0 - 1, y0 - 1, x0 + cols * cell, y0 + rows * cell), outline=(90, 90, 90))


def _draw_colour_bar(
    picture: Image.Image, draw: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont, layout: dict[str, int]
) -> None:
    """The shared colour bar (0 at the left, 1 at the right) with its two labels."""
    width, top = layout["bar_width"], layout["bar_top"]
    ramp = np.array([fraction_colour(x / max(width - 1, 1)) for x in range(width)], dtype=np.uint8)
    bar = np.broadcast_to(ramp[None, :, :], (BAR_H, width, 3))
    picture.paste(Image.fromarray(np.ascontiguousarray(bar), "RGB"), (HEAT_PAD, top))
    draw.rectangle((HEAT_PAD - 1, top - 1, HEAT_PAD + width, top + BAR_H), outline=(90, 90, 90))
    draw.text((HEAT_PAD, top + BAR_H + 2), "0", fill=(0, 0, 0), font=font)
    one = draw.textlength("1", font=font)
    draw.text((HEAT_PAD + width - one, top + BAR_H + 2), "1", fill=(0, 0, 0), font=font)


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
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
        x += int(draw.textlength(text, font=font)) + 12
    if has_nan:
        picture.paste(_hatch_tile(LEGEND_SWATCH), (x, y + 1))
        draw.text((x + LEGEND_SWATCH + 4, y), "no data", fill=(0, 0, 0), font=font)


def _save_png(picture: Image.Image, path: str | Path) -> Path:
    """Write ``picture`` as a PNG through a temporary sibling and a rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
