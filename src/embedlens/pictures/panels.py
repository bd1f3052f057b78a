"""One panel per view: the pictures of an image's views side by side, each titled with its view's name.

Families that show the model one image as several views (see :mod:`embedlens.views`) get one panel per
view, drawn on that view's own picture and grid; :func:`join_panels` lays them out left to right, top
aligned, :data:`PANEL_GAP` pixels apart, under a :data:`PANEL_TITLE` pixel strip with the view's name.
A single-view result is drawn as before, without a title.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from embedlens.pictures.colour import RGB

#: Gap between two panels, height of the title strip above them and its font size (pixels).
PANEL_GAP = 8
PANEL_TITLE = 16
PANEL_FONT = 12
#: Background of the gaps and the title strip, and the title's colour.
PANEL_BACKGROUND: RGB = (255, 255, 255)
PANEL_TEXT: RGB = (0, 0, 0)

#: What a caller may pass as the picture(s) to draw on: one for every view, one per view, or None.
Pictures = Image.Image | Sequence[Image.Image | None] | None


def picture_for(image: Pictures, view: int) -> Image.Image | None:
    """The picture given for view ``view``: ``image`` itself when one picture is given, else its entry."""
    if image is None or isinstance(image, Image.Image):
        return image
    return image[view] if view < len(image) else None


def panel_origins(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Top-left pixel ``(x, y)`` of each panel of :func:`join_panels`, given each panel's ``(width, height)``:
    ``x`` runs left to right with :data:`PANEL_GAP` between panels, ``y`` is :data:`PANEL_TITLE`."""
    out, x = [], 0
    for width, _ in sizes:
        out.append((x, PANEL_TITLE))
        x += width + PANEL_GAP
    return out


def joined_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``(width, height)`` of :func:`join_panels`: the panels' widths plus the gaps, the tallest panel
    plus the title strip."""
    width = sum(w for w, _ in sizes) + PANEL_GAP * max(len(sizes) - 1, 0)
    return width, PANEL_TITLE + max((h for _, h in sizes), default=0)


def join_panels(panels: Sequence[tuple[str, Image.Image]]) -> Image.Image:
    """``(title, picture)`` panels side by side (see the module docs), as one RGB picture of
    :func:`joined_size`."""
    sizes = [picture.size for _, picture in panels]
    joined = Image.new("RGB", joined_size(sizes), PANEL_BACKGROUND)
    draw = ImageDraw.Draw(joined)
    font = ImageFont.load_default(size=PANEL_FONT)
    for (title, picture), (x, y) in zip(panels, panel_origins(sizes), strict=True):
        joined.paste(picture.convert("RGB"), (x, y))
        draw.text((x + 2, 1), title, fill=PANEL_TEXT, font=font)
    return joined
