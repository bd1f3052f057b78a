"""The benchmark geometry of every family, read through its adapter (``benchmark_size``, ``cell_pixels``):
one changed pixel shows up in exactly its cell of every view; the views of the real checkpoints' shapes
(LLaVA-NeXT's stitched tiles, OneVision's 384 px SigLIP tiles) show the same pixels in the same cells;
Qwen's square stays unresized within the pixel budget; layouts without one shared grid are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from embedlens import InputError
from embedlens.bench.patchbench import make_item
from embedlens.bench.patchgeom import PatchGeometry, processor_adapter, view_changes
from embedlens.models.base import ModelAdapter
from embedlens.models.cells import grid_cells, square_side
from families import FAMILIES, Family
from helpers import assert_pixel_changes_its_cell, weightless_geometry
from tiny_llava_next import TinyAnyres, build_llava_next, build_llava_onevision

#: The families whose geometry differs: one of each adapter, the tiled ones at a size that tiles.
GEOMETRY_FAMILIES = [f for f in FAMILIES if f.name in {"llava", "internvl", "gemma3", "qwen2_vl", "qwen2_5_vl",
                                                       "qwen3_vl", "llava-next", "llava-onevision"}]  # fmt: skip


def weightless(family: Family, root: Path) -> ModelAdapter:
    """``family``'s tiny checkpoint read as ``make-patchbench`` reads it: config and processor only."""
    return weightless_geometry(family.build(root / family.name))[0]


@pytest.fixture(scope="module", params=GEOMETRY_FAMILIES, ids=str)
def family_adapter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelAdapter:
    return weightless(request.param, tmp_path_factory.mktemp("families"))


class TestEveryFamily:
    def test_no_weights(self, family_adapter: ModelAdapter):
        assert all(p.device.type == "meta" for p in family_adapter.model.parameters())
        assert family_adapter.device == torch.device("cpu")

    def test_one_pixel_changes_its_cell_in_every_view(self, family_adapter: ModelAdapter):
        geometry = PatchGeometry.from_adapter(family_adapter)
        assert geometry.cells > 1 and len(geometry.views) >= 1
        corners = {0, geometry.cols - 1, geometry.cells - geometry.cols, geometry.cells - 1, geometry.cols + 1}
        assert_pixel_changes_its_cell(family_adapter, geometry, tuple(sorted(corners)))

    def test_an_item_verifies(self, family_adapter: ModelAdapter):
        """Each target box of a count item (3 shapes where the grid has room), painted over alone, changes
        its own cell in every view."""
        geometry = PatchGeometry.from_adapter(family_adapter)
        item, image = make_item("count", 2, geometry, family_adapter)
        assert image.size == (geometry.width, geometry.height)
        assert len(item.target_patches) == item.extra["count"] == (3 if geometry.rows > 2 else 1)
        for cell, box in zip(item.target_patches, item.target_boxes, strict=True):
            painted = image.copy()
            painted.paste((3, 250, 7), tuple(box))
            assert view_changes(family_adapter, geometry, image, painted) == [[cell]] * len(geometry.views)


class TestGeometryOfEachFamily:
    """What each family draws at: its processor's picture, Qwen's square and cells of merged patches."""

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("llava", (56, 56, 14, 4, 4, ("full",))),
            ("internvl", (56, 56, 28, 2, 2, ("tile-0",))),  # one tile, so no thumbnail
            ("gemma3", (112, 112, 28, 4, 4, ("full",))),
            ("qwen2_vl", (140, 140, 28, 5, 5, ("full",))),  # 28 px merged cells, 140^2 within 160^2 pixels
            ("qwen3_vl", (160, 160, 32, 5, 5, ("full",))),
            ("llava-next", (56, 56, 14, 4, 4, ("base", "tiles"))),
        ],
    )
    def test_geometry(self, name: str, expected: tuple, tmp_path: Path):
        (family,) = [f for f in FAMILIES if f.name == name]
        geometry = PatchGeometry.from_adapter(weightless(family, tmp_path))
        assert (
            geometry.width,
            geometry.height,
            geometry.patch,
            geometry.rows,
            geometry.cols,
            geometry.views,
        ) == expected

    def test_square_side(self):
        assert square_side(28, 56 * 56, 28 * 28 * 1280) == 448  # Qwen2-VL's defaults: 16 x 16 tokens
        assert square_side(32, 65536, 16777216) == 448  # Qwen3-VL's: 14 x 14 tokens
        assert square_side(28, 28 * 28, 160 * 160) == 140
        assert square_side(28, 500 * 500, 10**6) == 504  # nothing up to 448 fits: the smallest that does
        with pytest.raises(InputError, match="no square picture"):
            square_side(28, 10, 20)

    def test_grid_cells(self):
        picture = torch.arange(3 * 4 * 6).reshape(3, 4, 6)
        cells = grid_cells(picture, (2, 3))
        assert cells.shape == (6, 3 * 2 * 2) and torch.equal(cells[4], picture[:, 2:4, 2:4].flatten())
        with pytest.raises(InputError, match="equal cells"):
            grid_cells(picture, (3, 3))
        # a strip of less than a cell past the grid is left out only when the cell side is given
        wide = torch.zeros(3, 5, 7)
        assert grid_cells(wide, (1, 2), cell=3).shape == (2, 3 * 3 * 3)
        for cell in (None, 2):
            with pytest.raises(InputError, match="equal cells"):
                grid_cells(wide, (1, 2), cell=cell)


class TestRealShapedAnyres:
    """At the real checkpoints' picture sizes a square tile-sized image gives both views the same grid and
    the same pixels cell by cell: LLaVA-NeXT (336 px, no 1 x 1 pinpoint) through its stitched, unpadded
    1 x 2 tiles; OneVision (384 px SigLIP, 27 patches of 14 px, a 6 px strip unseen) through its one tile."""

    @pytest.mark.parametrize(
        ("build", "spec", "grid"),
        [
            (build_llava_next, TinyAnyres(tile=336, pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336))), 24),
            (build_llava_onevision, TinyAnyres(tile=384, pinpoints=((384, 384), (384, 768), (768, 768))), 27),
        ],
    )
    def test_views_show_the_same_cells(self, build, spec: TinyAnyres, grid: int):
        model, processor = build(spec)
        adapter = processor_adapter(model.config, processor)
        geometry = PatchGeometry.from_adapter(adapter)
        assert (geometry.width, geometry.patch, geometry.rows, geometry.views) == (
            spec.tile,
            14,
            grid,
            ("base", "tiles"),
        )
        image = Image.effect_noise((spec.tile, spec.tile), 60).convert("RGB")
        base, tiles = adapter.cell_pixels(adapter.prepare([[image]], ["q"]))[0]
        assert base.shape == tiles.shape == (grid * grid, 3 * 14 * 14)
        assert torch.equal(base, tiles)
        item, _ = make_item("object", 0, geometry, adapter)
        assert len(item.target_patches) == 1


def test_views_on_different_grids_are_refused():
    """A LLaVA-NeXT whose only layout is 2 x 2 tiles shows a 56 px image as a 4 x 4 base and an 8 x 8 tiles
    grid: no cell of one is a cell of the other, so no benchmark."""
    model, processor = build_llava_next(TinyAnyres(pinpoints=((112, 112),)))
    adapter = processor_adapter(model.config, processor)
    with pytest.raises(
        InputError, match=r"views share one grid; llava_next lays out a 56x56 image as base 4x4 \+ tiles 8x8"
    ):
        PatchGeometry.from_adapter(adapter)
