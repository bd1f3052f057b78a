"""The picture of a probe result: the image the model saw, its patch grid, each patch's top-1 token.

Drawn with PIL, over the image: the picture is resized so that every patch cell is at least
:data:`MIN_CELL` pixels wide, thin white lines mark the cells, and each cell carries its token's top-1
piece on a dark box. A result with several views gets one such panel per view, each on that view's
picture, side by side (:mod:`embedlens.pictures.panels`).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from embedlens.pictures.panels import Pictures, join_panels, picture_for
from embedlens.pictures.save import save_png
from embedlens.result import ProbeResult

#: Smallest drawn cell, in pixels, so that token labels stay readable on large grids.
MIN_CELL = 56
#: Colour (RGBA) of the cell lines, of the box behind a label and of the label's text.
GRID_LINE = (255, 255, 255, 110)
LABEL_BOX = (0, 0, 0, 150)
LABEL_TEXT = (255, 255, 255, 255)


def token_label(piece: str, width: int) -> str:
    """A token piece made printable (``▁`` / ``Ġ`` -> ``_``, newline -> ``\\n``, other control
    characters -> ``?``, empty -> ``''``) and cut to about ``width`` characters (``…`` marks a cut)."""
    text = piece.replace("▁", "_").replace("Ġ", "_").replace("\n", "\\n")
    text = "".join(ch if ch.isprintable() else "?" for ch in text) or "''"
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def top1_cell(result: ProbeResult, image: Image.Image | None = None) -> int:
    """Side in pixels of one patch cell of :func:`draw_top1_grid`: ``max(56, width // cols)`` of the
    picture drawn on."""
    return max(MIN_CELL, _base(result, image).width // result.grid[1])


def draw_top1_grid(result: ProbeResult, image: Pictures = None) -> Image.Image:
    """Draw the patch grid over the model's view of the image and write each cell's top-1 token.

    Args:
        result: A probe result (its views' pictures are used unless ``image`` is given).
        image: The picture to draw on, resized (bicubic) to the grid's aspect; with several views, one
            picture per view (or one for all of them).

    Returns:
        For a single-view result, an RGB picture of ``cols * cell`` by ``rows * cell`` pixels (``cell`` =
        :func:`top1_cell`); with several views, :func:`top1_panels` joined side by side under the view
        names (:func:`embedlens.pictures.panels.join_panels`).

    Raises:
        ValueError: A view has neither a given picture nor one of its own to draw on.
    """
    if len(result.views) > 1:
        return join_panels([(v.name, panel) for v, panel in zip(result.views, top1_panels(result, image), strict=True)])
    return _draw_view(result, picture_for(image, 0))


def top1_panels(result: ProbeResult, image: Pictures = None) -> list[Image.Image]:
    """One :func:`draw_top1_grid` panel per view of ``result``, each drawn on its view's picture."""
    return [_draw_view(result.part(v), picture_for(image, v)) for v in range(len(result.views))]


def _draw_view(result: ProbeResult, image: Image.Image | None) -> Image.Image:
    """The top-1 picture of a single-view result."""
    base = _base(result, image)
    rows, cols = result.grid
    cell = top1_cell(result, image)
    canvas = base.convert("RGB").resize((cols * cell, rows * cell), Image.Resampling.BICUBIC)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font_size = max(9, cell // 5)
    font = ImageFont.load_default(size=font_size)
    for r in range(rows + 1):
        draw.line([(0, r * cell), (cols * cell, r * cell)], fill=GRID_LINE, width=1)
    for c in range(cols + 1):
        draw.line([(c * cell, 0), (c * cell, rows * cell)], fill=GRID_LINE, width=1)
    chars = max(3, int(cell / (font_size * 0.6)))
    for i in range(len(result)):
        r, c = int(result.row[i]), int(result.col[i])
        text = token_label(result.top_tokens[i][0], chars)
        x, y = c * cell + 2, r * cell + cell // 2 - font_size // 2
        draw.rectangle(draw.textbbox((x, y), text, font=font), fill=LABEL_BOX)
        draw.text((x, y), text, fill=LABEL_TEXT, font=font)
    return Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")


def save_top1_grid(result: ProbeResult, path: str | Path, image: Pictures = None) -> Path:
    """Write :func:`draw_top1_grid` as a PNG (atomically) and return its path."""
    return save_png(draw_top1_grid(result, image), path)


def _base(result: ProbeResult, image: Image.Image | None) -> Image.Image:
    """The picture to draw on: ``image``, else the result's view."""
    base = image if image is not None else result.view
    if base is None:
        raise ValueError("the result carries no image to draw on; pass one")
    return base
