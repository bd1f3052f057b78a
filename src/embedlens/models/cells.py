"""Pixel arithmetic behind the adapters' benchmark geometry (:meth:`ModelAdapter.benchmark_size` and
:meth:`ModelAdapter.cell_pixels`): which picture an image processor makes, and the processed pixels
behind each cell of a view's token grid."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from embedlens.errors import InputError

#: The probe image whose processed size is an image processor's picture size (any size would do for a
#: processor that resizes every image to one picture).
PROBE_SIZE = (640, 480)


def processed_picture_size(image_processor: Any) -> tuple[int, int]:
    """``(width, height)`` of the picture ``image_processor`` makes of a :data:`PROBE_SIZE` probe: the
    last two sides of its ``pixel_values`` (``[N, 3, H, W]``, or ``[N, tiles, 3, H, W]``)."""
    probe = Image.new("RGB", PROBE_SIZE, (128, 128, 128))
    pixels = image_processor(images=[probe], return_tensors="pt")["pixel_values"]
    if pixels.ndim < 4:
        raise InputError(f"the image processor's pixel values {tuple(pixels.shape)} are not pictures [..., 3, H, W]")
    height, width = (int(v) for v in pixels.shape[-2:])
    return width, height


def grid_cells(
    picture: torch.Tensor, grid: tuple[int, int], what: str = "the picture", cell: int | None = None
) -> torch.Tensor:
    """The pixels of ``picture`` ``[C, H, W]`` behind each cell of a ``(rows, cols)`` grid of equal cells.

    Args:
        picture: One processed picture ``[C, H, W]``.
        grid: ``(rows, cols)``.
        what: How messages name the picture.
        cell: The cells' side in pixels when the grid starts at the top left and leaves a strip of less
            than a cell unseen at the right and bottom (a patch convolution over a side that is not a whole
            number of patches, e.g. SigLIP's 27 patches of 14 px on 384 px); None: the grid divides the
            picture exactly.

    Returns:
        ``[rows * cols, C * (H / rows) * (W / cols)]``, row-major over the grid.

    Raises:
        InputError: ``picture`` is not ``[C, H, W]`` or the grid does not cut it into such cells.
    """
    rows, cols = grid
    if picture.ndim == 3 and cell is not None:
        spare = (picture.shape[1] - rows * cell, picture.shape[2] - cols * cell)
        if all(0 <= extra < cell for extra in spare):
            picture = picture[:, : rows * cell, : cols * cell]
    if picture.ndim != 3 or rows <= 0 or cols <= 0 or picture.shape[1] % rows or picture.shape[2] % cols:
        raise InputError(
            f"{what} {tuple(picture.shape)} is not a [3, H, W] picture cut into {rows} x {cols} equal cells"
        )
    channels, height, width = picture.shape
    cells = picture.reshape(channels, rows, height // rows, cols, width // cols)
    return cells.permute(1, 3, 0, 2, 4).reshape(rows * cols, -1)


def square_side(factor: int, low: int, high: int, largest: int = 448) -> int:
    """The side of a square picture that a processor resizing to multiples of ``factor`` pixels within a
    budget of ``low .. high`` pixels leaves as it is: the largest multiple of ``factor`` up to ``largest``
    whose area is in the budget, or else the smallest one above ``largest``.

    Raises:
        InputError: No square side fits the budget.
    """
    sides = [side for side in range(factor, max(largest, int(high**0.5)) + 1, factor) if low <= side * side <= high]
    small = [side for side in sides if side <= largest]
    if small:
        return small[-1]
    if sides:
        return sides[0]
    raise InputError(f"no square picture of a multiple of {factor} px fits the processor's {low}..{high} pixel budget")
