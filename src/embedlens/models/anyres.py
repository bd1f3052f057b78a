"""Shared view logic of the "anyres" LLaVA families (LLaVA-NeXT and LLaVA-OneVision).

Both lay out one image's visual tokens as two views, in this order (read from ``pack_image_features``
in ``transformers``' modeling files, and the processors' token counts):

* ``"base"``: the whole image resized to one tile, ``side x side`` tokens (``side`` = the vision
  tower's ``image_size // patch_size``) in the projector's order;
* ``"tiles"``: the image resized and padded to the best of the config's ``image_grid_pinpoints``
  and cut into ``tile_rows x tile_cols`` tiles, whose token grids are stitched into one
  ``(tile_rows * side) x (tile_cols * side)`` grid, unpadded back to the image's aspect ratio
  (whole rows or columns of padding dropped, as many on each side), for OneVision downsampled
  (bilinear) when larger than ``anyres_max_<n>`` tiles allow, and read row by row with the learned
  ``image_newline`` vector after every row. Those newline slots are the view's extra positions; the
  stitching reorders the projector's rows, so grid cells do not follow its order.

An image OneVision does not tile (each image of a sample with several) has the base view only, with
one newline slot after it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.nn import functional

from embedlens.errors import EmbedLensError, InputError
from embedlens.models.base import ModelAdapter, PreparedBatch, VisualSpan
from embedlens.models.cells import grid_cells
from embedlens.models.llava import LlavaAdapter


@dataclass(frozen=True)
class AnyresImage:
    """How one image's visual tokens are laid out.

    Attributes:
        side: Rows (= columns) of the base view's grid.
        tiles: ``(rows, cols)`` of the tiles view's grid as present in the sequence (after unpadding
            and downsampling; each row followed by a newline slot), or None for an image that is not
            tiled (base view + one newline slot).
        layout: ``(tile_rows, tile_cols)``: how many tiles the image was cut into (``(0, 0)`` untiled).
        area: ``(top, left, rows, cols)``: the unpadded part of the stitched tile grid, in patches
            (before any downsampling), or None when unknown (images known from features alone).
    """

    side: int
    tiles: tuple[int, int] | None
    layout: tuple[int, int] = (0, 0)
    area: tuple[int, int, int, int] | None = None

    @property
    def tokens(self) -> int:
        """Image-token positions the image occupies."""
        if self.tiles is None:
            return self.side * self.side + 1
        rows, cols = self.tiles
        return self.side * self.side + rows * (cols + 1)

    @property
    def patches(self) -> int | None:
        """Rows of ``pixel_values`` (and of the projector's input) the image takes: the base image and
        its tiles; None when unknown (a tiled image known from its features alone)."""
        if self.tiles is None:
            return 1
        return 1 + self.layout[0] * self.layout[1] if self.area is not None else None

    @property
    def has_tiles_view(self) -> bool:
        """Whether the image has a tiles view with grid cells (see :meth:`spans`)."""
        return self.tiles is not None and self.tiles[0] * self.tiles[1] > 0

    def spans(
        self, run: torch.Tensor, sample: int, image: int, global_image: int, picture: int, first_patch: int
    ) -> list[AnyresSpan]:
        """The image's views as spans, given ``run``, its ``[tokens]`` image-token positions in order;
        view ``k`` shows picture ``picture + k``; ``first_patch`` is the image's first row of
        ``pixel_values`` (-1: unknown).

        An untiled image's newline slot is an extra position of its base view; so are the newline
        slots of a tiles grid that unpadding left without cells (an image so far from every tile
        layout's aspect that no whole row, or column, of patches shows it), which gets no tiles view.
        """
        cells = self.side * self.side
        base = (self.side, self.side)
        about = {"anyres": self, "first_patch": first_patch}
        if not self.has_tiles_view:
            return [
                AnyresSpan(
                    sample, image, global_image, run[:cells], base, run[cells:], "base", picture=picture, **about
                )
            ]
        rows, cols = self.tiles
        grid = run[cells:].view(rows, cols + 1)
        tiles = (grid[:, :cols].flatten(), (rows, cols), grid[:, cols])
        return [
            AnyresSpan(sample, image, global_image, run[:cells], base, run[:0], "base", picture=picture, **about),
            AnyresSpan(sample, image, global_image, *tiles, "tiles", picture=picture + 1, **about),
        ]


@dataclass
class AnyresSpan(VisualSpan):
    """A view of an anyres image, knowing the image's layout (to find each cell's vision features).

    Attributes:
        anyres: The image's layout, or None.
        first_patch: The image's first row of ``pixel_values`` and of the projector's input (-1: unknown).
    """

    anyres: AnyresImage | None = None
    first_patch: int = -1


def unpadded_area(image_size: tuple[int, int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """The part of a ``rows x cols`` stitched tile grid that shows the image rather than padding.

    The processor resizes an ``(height, width)`` image to fit the tiles and pads the rest evenly on
    both sides; the model drops the same number of whole rows (or columns) on each side, rounding the
    image's extent in patches to 7 decimals, then to the nearest integer.

    Returns:
        ``(top, left, rows, cols)`` in patches.
    """
    height, width = image_size
    if width / height > cols / rows:
        extent = int(round(height * (cols / width), 7))
        pad = (rows - extent) // 2
        return pad, 0, rows - 2 * pad, cols
    extent = int(round(width * (rows / height), 7))
    pad = (cols - extent) // 2
    return 0, pad, rows, cols - 2 * pad


def downsampled(rows: int, cols: int, side: int, max_tiles: int | None) -> tuple[int, int]:
    """OneVision's cap on the tiles view: a ``rows x cols`` grid over ``1.1**2 * max_tiles`` base
    grids' worth of cells shrinks by ``r = sqrt(rows * cols / (max_tiles * side**2))`` to
    ``(floor(rows / r), floor(cols / r))``. Unchanged when ``max_tiles`` is None (LLaVA-NeXT)."""
    if max_tiles is None:
        return rows, cols
    ratio = math.sqrt(rows * cols / (max_tiles * side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


class AnyresAdapter(LlavaAdapter):
    """LLaVA-NeXT-style layout: per image a ``"base"`` view and a ``"tiles"`` view with newline slots.

    Subclasses name the family, the model class and, where they differ, which images are tiled
    (:meth:`tiled`), the tile cap (:meth:`max_tiles`) and how images go to the processor
    (:meth:`processor_images`).
    """

    # ----------------------------------------------------------------- family hooks
    def max_tiles(self) -> int | None:
        """The ``anyres_max_<n>`` cap on the tiles view, or None when the family has none."""
        return None

    def tiled(self, inputs: Mapping[str, Any], count: int) -> list[bool]:
        """Whether each of ``count`` images (batch order) is tiled, from the model inputs."""
        return [True] * count

    def processor_images(self, images: Sequence[Sequence[Image.Image]]) -> Any:
        """What the processor gets as ``images`` for a batch (see :attr:`images_per_sample`), never padded to
        a square as LLaVA-1.5's profile may: the tiles follow the image's own aspect ratio."""
        return ModelAdapter.processor_images(self, images)

    # ----------------------------------------------------------------- geometry
    @property
    def tile_size(self) -> int:
        """Side of the base image and of each tile, in pixels (the vision tower's ``image_size``)."""
        return int(self.model.config.vision_config.image_size)

    @property
    def side(self) -> int:
        """Rows (= columns) of one tile's token grid."""
        return self.tile_size // self.patch_size

    @property
    def image_newline(self) -> torch.Tensor:
        """The learned vector of the newline slots, ``[d]``."""
        return self.model.model.image_newline

    def layout(self, image_size: Sequence[int]) -> AnyresImage:
        """The token layout of a tiled image of ``(height, width)`` pixels (``image_sizes`` row)."""
        height, width = (int(v) for v in image_size)
        if height <= 0 or width <= 0:
            raise InputError(f"image size {height} x {width} is not a valid image size")
        pinpoints = [list(p) for p in self.model.config.image_grid_pinpoints]
        from transformers.image_processing_utils import select_best_resolution  # slow to import: here

        best_height, best_width = select_best_resolution((height, width), pinpoints)
        tile_rows, tile_cols = best_height // self.tile_size, best_width // self.tile_size
        area = unpadded_area((height, width), tile_rows * self.side, tile_cols * self.side)
        tiles = downsampled(area[2], area[3], self.side, self.max_tiles())
        return AnyresImage(self.side, tiles, (tile_rows, tile_cols), area)

    def image_layouts(self, inputs: Mapping[str, Any]) -> list[AnyresImage]:
        """The layout of every image in a batch of model inputs (empty when there are none).

        From ``image_sizes`` and the grid pinpoints when the inputs hold ``pixel_values``; inside
        ``generate``, whose first forward gets the packed features (``mm_encoder_outputs``) without
        the sizes, from where the newline slots sit among each image's features.
        """
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None and pixel_values.shape[0] > 0:
            sizes = inputs.get("image_sizes")
            if sizes is None:
                raise InputError(
                    f"{self.family} inputs need image_sizes beside pixel_values (the processor returns both)"
                )
            sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]
            if len(sizes) != pixel_values.shape[0]:
                raise InputError(f"{len(sizes)} image sizes for {pixel_values.shape[0]} images")
            tiled = self.tiled(inputs, len(sizes))
            return [
                self.layout(size) if tile else AnyresImage(self.side, None)
                for size, tile in zip(sizes, tiled, strict=True)
            ]
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            return []
        return [self._layout_of_features(features) for features in encoded.pooler_output]

    def _layout_of_features(self, features: torch.Tensor) -> AnyresImage:
        """An image's layout from its packed features ``[tokens, d]``: base cells, then rows ending in
        the newline vector (a single newline for an untiled image, only newlines for a tiles grid
        without columns)."""
        cells = self.side * self.side
        rest = features[cells:]
        if rest.shape[0] == 0:
            return AnyresImage(self.side, (0, 0))
        flags = (rest == self.image_newline.to(rest.device, rest.dtype)).all(dim=-1).cpu()
        if bool(flags.all()):
            return AnyresImage(self.side, None if flags.numel() == 1 else (flags.numel(), 0))
        cols = int(flags.int().argmax())
        if cols > 0 and rest.shape[0] % (cols + 1) == 0:
            expected = torch.zeros(rest.shape[0] // (cols + 1), cols + 1, dtype=torch.bool)
            expected[:, cols] = True
            if torch.equal(flags, expected.flatten()):
                return AnyresImage(self.side, (expected.shape[0], cols))
        raise InputError(f"cannot tell the tile grid of an image with {features.shape[0]} visual tokens")

    def image_grids(self, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        """``(rows, cols)`` of every image's base view (its whole picture at one tile's size)."""
        return [(layout.side, layout.side) for layout in self.image_layouts(inputs)]

    # ----------------------------------------------------------------- vision features
    def vision_passes(self, span: VisualSpan) -> list[int]:
        """One tower pass over a full tile (``side * side`` patches plus any class token) for the base view
        and for each tile of the tiles view; an image known from its features alone counts the fewest
        tiles that hold its tiles grid."""
        layout = getattr(span, "anyres", None)
        side = layout.side if layout is not None else span.grid[0]
        per_pass = side * side + self.class_tokens
        if span.view != "tiles":
            return [per_pass]
        tiles = layout.layout[0] * layout.layout[1] if layout is not None else 0
        return [per_pass] * (tiles or max(1, -(-span.num_tokens // (side * side))))

    def vision_token_features(self, features: torch.Tensor | None, span: VisualSpan) -> torch.Tensor:
        """What the projector received for each grid cell of ``span``.

        The base view's cells are the base image's patches in order. A tiles cell ``(r, c)`` is patch
        ``(top + r, left + c)`` of the stitched tile grid: patch ``((top + r) % side, (left + c) % side)``
        of tile ``((top + r) // side, (left + c) // side)``. Where OneVision downsampled the tiles
        view, the model interpolated the projector's outputs; here the vision features are
        interpolated the same way (bilinear, to the view's grid), the nearest equivalent, as the
        projector is not linear.

        Args:
            features: The projector's input, one row per base image or tile (``pixel_values`` rows,
                images in batch order): ``[N_patches, side * side, d_vision]``.
            span: One view of one image, as this adapter's ``find_spans`` gave it from ``image_sizes``.

        Returns:
            ``[rows * cols, d_vision]``, row-major over the view's grid.

        Raises:
            EmbedLensError: The features were not captured, or do not hold the span's image.
        """
        if features is None:
            raise EmbedLensError("the projector's input was not captured")
        layout = getattr(span, "anyres", None)
        first = int(getattr(span, "first_patch", -1))
        cells = self.side * self.side
        if layout is None or layout.patches is None or first < 0:
            raise EmbedLensError(f"the {self.family} span does not say which patches it shows (spans from prepare do)")
        if features.ndim != 3 or features.shape[1] != cells or first + layout.patches > features.shape[0]:
            raise EmbedLensError(
                f"the projector received {tuple(features.shape)}, which does not hold image {span.global_image} "
                f"({layout.patches} patches of {cells} tokens from row {first})"
            )
        if span.view == "base":
            return features[first]
        tile_rows, tile_cols = layout.layout
        side, dim = self.side, features.shape[-1]
        tiles = features[first + 1 : first + 1 + tile_rows * tile_cols].reshape(tile_rows, tile_cols, side, side, dim)
        grid = tiles.permute(0, 2, 1, 3, 4).reshape(tile_rows * side, tile_cols * side, dim)
        top, left, rows, cols = layout.area
        grid = grid[top : top + rows, left : left + cols]
        if (rows, cols) != span.grid:
            moved = grid.permute(2, 0, 1)[None]
            grid = functional.interpolate(moved, size=span.grid, mode="bilinear")[0].permute(1, 2, 0)
        return grid.reshape(-1, dim)

    # ----------------------------------------------------------------- inputs
    def view_pictures(self, encoded: Mapping[str, Any]) -> list[Image.Image]:
        """Each image's view pictures in span order: the base image, then (tiled images) the stitched
        tiles cropped to the unpadded area, so that patch ``(r, c)`` of the tiles grid (before any
        downsampling) is the picture's ``(r, c)``-th ``patch_size`` square."""
        pixel_values = encoded.get("pixel_values")
        if pixel_values is None:
            return []
        pictures = []
        for tiles, layout in zip(pixel_values, self.image_layouts(encoded), strict=True):
            pictures.append(self.picture(tiles[0]))
            if layout.has_tiles_view and layout.area is not None:
                pictures.append(self.picture(self._tiles_pixels(tiles, layout)))
        return pictures

    def _tiles_pixels(self, tiles: torch.Tensor, layout: AnyresImage) -> torch.Tensor:
        """The tiles of one image (``pixel_values`` row ``[patches, 3, S, S]``: base image first) stitched
        and cropped to the unpadded area: ``[3, rows * patch, cols * patch]``."""
        tile_rows, tile_cols = layout.layout
        size, patch = self.tile_size, self.patch_size
        stitched = tiles[1 : 1 + tile_rows * tile_cols].reshape(tile_rows, tile_cols, 3, size, size)
        stitched = stitched.permute(2, 0, 3, 1, 4).reshape(3, tile_rows * size, tile_cols * size)
        top, left, rows, cols = layout.area
        return stitched[:, top * patch : (top + rows) * patch, left * patch : (left + cols) * patch]

    def cell_pixels(self, batch: PreparedBatch) -> list[list[torch.Tensor]]:
        """The processed pixels behind each grid cell of each view, ``[rows * cols, 3 * patch * patch]``: the
        base view's from the base image (``pixel_values`` ``[N_images, patches, 3, S, S]``, patch 0; a strip
        of less than a patch past the last whole patch is unseen), the tiles view's from the stitched tiles
        cropped to the unpadded area (as its picture is made).

        Raises:
            InputError: A tiles view that OneVision downsampled (its cells are no longer pixel squares), or
                pixel values that do not hold the span's image.
        """
        pixels = batch.inputs.get("pixel_values")
        out = []
        for row in batch.spans:
            cells = []
            for span in row:
                layout = getattr(span, "anyres", None)
                if pixels is None or pixels.ndim != 5 or layout is None or span.global_image >= pixels.shape[0]:
                    raise InputError(f"the {self.family} pixel values do not hold image {span.global_image}'s views")
                tiles = pixels[span.global_image]
                if span.view == "base":
                    cells.append(grid_cells(tiles[0], span.grid, "the base view", self.patch_size))
                    continue
                area = layout.area
                if area is None or (area[2], area[3]) != span.grid:
                    raise InputError(
                        f"the tiles view's {span.grid[0]}x{span.grid[1]} grid is downsampled from the tiles' "
                        f"patches ({'unknown' if area is None else f'{area[2]}x{area[3]}'}), so its cells are not "
                        "pixel squares"
                    )
                cells.append(grid_cells(self._tiles_pixels(tiles, layout), span.grid, "the tiles view"))
            out.append(cells)
        return out

    def find_spans(self, inputs: Mapping[str, Any]) -> list[list[VisualSpan]]:
        input_ids: torch.Tensor = inputs["input_ids"]
        layouts = self.image_layouts(inputs)
        spans: list[list[VisualSpan]] = []
        next_image = picture = first_patch = 0
        for sample, row in enumerate(input_ids.cpu()):
            positions = torch.nonzero(row == self.image_token_id).flatten()
            sample_spans: list[VisualSpan] = []
            offset = image = 0
            while offset < positions.numel():
                if next_image >= len(layouts):
                    raise InputError(
                        f"sample {sample} has more image tokens than the images given ({len(layouts)} in the batch)"
                    )
                layout = layouts[next_image]
                run = positions[offset : offset + layout.tokens]
                if run.numel() != layout.tokens:
                    raise InputError(
                        f"sample {sample}: expected {layout.tokens} image tokens for image {image}, found {run.numel()}"
                    )
                views = layout.spans(run.clone(), sample, image, next_image, picture, first_patch)
                sample_spans += views
                picture += len(views)
                first_patch = first_patch + layout.patches if first_patch >= 0 and layout.patches else -1
                offset += layout.tokens
                image += 1
                next_image += 1
            spans.append(sample_spans)
        if next_image != len(layouts):
            raise InputError(f"{len(layouts)} images given but only {next_image} placed in the text")
        return spans
