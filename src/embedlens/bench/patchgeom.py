"""Where the patch-compression benchmark may draw: the cells of a model's visual-token grid, in pixels.

The geometry is the model's, read through its adapter (so it holds for every family): the picture size
the family draws at (:meth:`~embedlens.models.base.ModelAdapter.benchmark_size`), prepared once to find
its views and their token grid; each cell is a square of pixels of that picture. The verification runs
the family's own preparation on an image with and without a target and compares the processed pixels
behind every cell of every view (:meth:`~embedlens.models.base.ModelAdapter.cell_pixels`).

Only the processor and the config are needed: :func:`processor_adapter` builds the adapter over a
model made on the meta device (no weights read or allocated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from embedlens.errors import InputError
from embedlens.synth.draw import BBox

if TYPE_CHECKING:
    from embedlens.models.base import ModelAdapter

#: The question asked beside the pictures while reading the geometry (its text does not matter).
PROBE_PROMPT = "What is in the image?"
#: The blank picture's colour.
GREY = (128, 128, 128)


@dataclass(frozen=True)
class PatchGeometry:
    """The picture a model's vision tower sees and the grid of its visual tokens.

    Attributes:
        width: Width in pixels of the images to draw (what the processor keeps as it is).
        height: Height in pixels.
        patch: Side in pixels of one visual token's cell (a vision patch, or the patches a token merges).
        rows: Cell rows; ``cols``: cell columns.
        views: The views every image is laid out as (one span each, all on this grid), in sequence order.
    """

    width: int
    height: int
    patch: int
    rows: int
    cols: int
    views: tuple[str, ...] = ("full",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "views", tuple(self.views))  # a list when read back from meta.json

    @classmethod
    def from_adapter(cls, adapter: ModelAdapter) -> PatchGeometry:
        """Prepare a blank picture of the family's :meth:`benchmark_size` and read its views' grid.

        Raises:
            InputError: The views do not share one grid, the grid does not cut the picture into equal
                square cells (from the top left; a strip of less than a cell may stay unseen at the right
                and bottom), or the family cannot show the cells' pixels.
        """
        width, height = adapter.benchmark_size()
        blank = Image.new("RGB", (width, height), GREY)
        batch = adapter.prepare([[blank]], [PROBE_PROMPT])
        spans = batch.spans[0]
        layout = " + ".join(f"{span.view} {span.grid[0]}x{span.grid[1]}" for span in spans)
        if not spans or len({span.grid for span in spans}) != 1:
            raise InputError(
                f"make-patchbench needs a picture whose views share one grid; {adapter.family} lays out a "
                f"{width}x{height} image as {layout or 'no visual tokens'}"
            )
        rows, cols = spans[0].grid
        side = width // cols
        if side == 0 or height // rows != side or width - cols * side >= side or height - rows * side >= side:
            raise InputError(
                f"the {rows}x{cols} token grid of {adapter.family}'s {width}x{height} picture does not cut it into "
                "equal square cells"
            )
        adapter.cell_pixels(batch)  # the family shows every view's cells this way (or says why not)
        return cls(width, height, side, rows, cols, tuple(span.view for span in spans))

    @property
    def cells(self) -> int:
        """Number of cells."""
        return self.rows * self.cols

    def cell_box(self, cell: int, margin: int = 1) -> BBox:
        """Pixel box of cell ``cell`` (row-major), shrunk by ``margin`` on every side."""
        row, col = divmod(cell, self.cols)
        p = self.patch
        return col * p + margin, row * p + margin, (col + 1) * p - margin, (row + 1) * p - margin


def view_changes(
    adapter: ModelAdapter, geometry: PatchGeometry, before: Image.Image, after: Image.Image
) -> list[list[int]]:
    """Per view (in sequence order), the cells whose processed pixel values differ between two images.

    Raises:
        InputError: The images are not laid out as ``geometry`` says (other views or grids).
    """
    batch = adapter.prepare([[before], [after]], [PROBE_PROMPT, PROBE_PROMPT])
    for spans in batch.spans:
        grid = (geometry.rows, geometry.cols)
        if tuple(s.view for s in spans) != geometry.views or any(s.grid != grid for s in spans):
            raise InputError(f"{adapter.family} laid the image out differently from the benchmark's geometry")
    old, new = adapter.cell_pixels(batch)
    return [torch.nonzero((a != b).any(dim=1)).flatten().tolist() for a, b in zip(old, new, strict=True)]


def changed_cells(adapter: ModelAdapter, geometry: PatchGeometry, before: Image.Image, after: Image.Image) -> list[int]:
    """Cells whose processed pixel values differ in any view between two images (what the model sees
    change), sorted."""
    return sorted({cell for cells in view_changes(adapter, geometry, before, after) for cell in cells})


def processor_adapter(config: Any, processor: Any, source: str = "") -> ModelAdapter:
    """The family's adapter over a model built on the meta device from ``config`` (no weights are read or
    allocated) and the real ``processor``: enough to prepare inputs, find spans and read cell pixels,
    which stay on the CPU in float32. Nothing that runs the model works with it.

    Raises:
        UnsupportedModelError: No adapter handles the config's model type.
    """
    import embedlens.models.loading  # noqa: F401  (registers every family)
    from embedlens.models.registry import adapter_class_for

    family = adapter_class_for(config)
    with torch.device("meta"):
        model = family.model_class()._from_config(config, dtype=torch.float32)
    on_cpu = type(f"{family.__name__}Inputs", (family,), {"device": property(lambda self: torch.device("cpu"))})
    return on_cpu(model.eval(), processor, source=source)
