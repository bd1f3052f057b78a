"""Pictures of probe results: the image the model saw, its patch grid, each patch's top-1 token."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from embedlens.paths import atomic_path
from embedlens.result import ProbeResult

#: Smallest drawn cell, in pixels, so that token labels stay readable on large grids.
MIN_CELL = 56


def _label(piece: str, width: int) -> str:
    """A token piece made printable and cut to about ``width`` characters."""
    text = piece.replace("▁", "_").replace("Ġ", "_").replace("\n", "\\n")
    text = "".join(ch if ch.isprintable() else "?" for ch in text) or "''"
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def draw_top1_grid(result: ProbeResult, image: Image.Image | None = None) -> Image.Image:
    """Draw the patch grid over the model's view of the image and write each cell's top-1 token.

    Args:
        result: A probe result (its ``view`` is used unless ``image`` is given).
        image: The picture to draw on; it is resized to the grid's aspect.
    """
    base = image if image is not None else result.view
    if base is None:
        raise ValueError("the result carries no image to draw on; pass one")
    rows, cols = result.grid
    cell = max(MIN_CELL, base.width // cols)
    canvas = base.convert("RGB").resize((cols * cell, rows * cell), Image.Resampling.BICUBIC)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font_size = max(9, cell // 5)
    font = ImageFont.load_default(size=font_size)
    for r in range(rows + 1):
        draw.line([(0, r * cell), (cols * cell, r * cell)], fill=(255, 255, 255, 110), width=1)
    for c in range(cols + 1):
        draw.line([(c * cell, 0), (c * cell, rows * cell)], fill=(255, 255, 255, 110), width=1)
    chars = max(3, int(cell / (font_size * 0.6)))
    for i in range(len(result)):
        r, c = int(result.row[i]), int(result.col[i])
        text = _label(result.top_tokens[i][0], chars)
        x, y = c * cell + 2, r * cell + cell // 2 - font_size // 2
        box = draw.textbbox((x, y), text, font=font)
        draw.rectangle(box, fill=(0, 0, 0, 150))
        draw.text((x, y), text, fill=(255, 255, 255, 255), font=font)
    return Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")


def save_top1_grid(result: ProbeResult, path: str | Path, image: Image.Image | None = None) -> Path:
    """Write :func:`draw_top1_grid` as a PNG (atomically) and return its path."""
    path = Path(path)
    picture = draw_top1_grid(result, image)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
