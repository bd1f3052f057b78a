"""Pictures of the taxonomy (embedlens.pictures): a group map over one image and a dataset heatmap, checked
pixel by pixel."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

import embedlens
from embedlens import InputError
from embedlens.pictures.colour import FRACTION_MAP, HATCH, NO_DATA, blend, fraction_colour, fraction_colours
from embedlens.pictures.groups import (
    BORDER,
    CANVAS_GREY,
    draw_group_map,
    legend_entries,
    map_cell,
    map_size,
    save_group_map,
)
from embedlens.pictures.heatmap import (
    draw_group_heatmap,
    heatmap_cell_origin,
    heatmap_layout,
    panel_title,
    save_group_heatmap,
)
from embedlens.taxonomy import ClassifiedResult
from embedlens.taxonomy.groups import ALL_GROUPS
from embedlens.taxonomy.groups import COLOURS as GROUP_COLOURS
from taxonomy_planting import OVERLAP_PATCH, PLANTED, expected_groups, plant

SOLID = (40, 200, 120)
#: Legend strip height: 6 px padding above and below, 18 px per group.
LEGEND = 2 * 6 + 4 * 18


@pytest.fixture(scope="module")
def planted(tiny_dir: Path) -> ClassifiedResult:
    """A classification of a 4 x 4 grid with known groups (see ``taxonomy_planting``)."""
    session = embedlens.load(str(tiny_dir), device="cpu")
    anchors, _ = plant(session)
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8), "RGB")
    result = session.classify(image, anchors=anchors)
    assert result.group.tolist() == expected_groups()
    return result


def solid(size: int = 100, colour: tuple[int, int, int] = SOLID) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def cell_pixels(picture: Image.Image, patch: int, cell: int, cols: int = 4) -> np.ndarray:
    """The pixels of a patch's cell inside its borders, shape ``[cell - 2, cell - 2, 3]``."""
    r, c = divmod(patch, cols)
    pixels = np.asarray(picture)
    return pixels[r * cell + 1 : (r + 1) * cell - 1, c * cell + 1 : (c + 1) * cell - 1]


def luminance(colour) -> float:
    r, g, b = (float(v) for v in colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- group map
class TestGroupMap:
    """Each planted token's cell carries its group's colour, blended as documented; alive cells do not."""

    @pytest.mark.parametrize("alpha", [0.45, 0.0, 1.0, 0.8])
    def test_planted_cells_tinted(self, planted, alpha):
        picture = draw_group_map(planted, solid(), alpha=alpha)
        cell = map_cell(planted, solid())
        assert cell == 32
        for name, patch in [*PLANTED.items(), ("vit_sink", OVERLAP_PATCH)]:
            expected = blend(SOLID, GROUP_COLOURS[name], alpha)
            pixels = cell_pixels(picture, patch, cell)
            assert (pixels == expected).all(), (name, patch)
            centre = picture.getpixel((patch % 4 * cell + cell // 2, patch // 4 * cell + cell // 2))
            assert centre == expected
        for patch in (i for i, g in enumerate(expected_groups()) if g == "alive"):
            assert (cell_pixels(picture, patch, cell) == SOLID).all()

    def test_blend_formula_and_distinct_colours(self, planted):
        assert blend((0, 100, 200), (255, 0, 100), 0.45) == (115, 55, 155)
        picture = draw_group_map(planted, solid())
        centres = {
            name: picture.getpixel((PLANTED[name] % 4 * 32 + 16, PLANTED[name] // 4 * 32 + 16)) for name in PLANTED
        }
        alive = picture.getpixel((1 * 32 + 16, 0 * 32 + 16))  # patch 1
        assert alive == SOLID
        assert len({*centres.values(), alive}) == 4

    def test_borders(self, planted):
        picture = np.asarray(draw_group_map(planted, solid()))
        for edge in (0, 32, 64, 96, 127):
            assert (picture[:128, edge] == BORDER).all()
            assert (picture[edge, :128] == BORDER).all()

    def test_grey_canvas_without_a_view(self, planted):
        bare = dataclasses.replace(planted, probe=dataclasses.replace(planted.probe, view=None))
        picture = draw_group_map(bare)
        assert picture.size == map_size(bare) == (140, 4 * 32 + LEGEND)
        assert (cell_pixels(picture, 1, 32) == CANVAS_GREY).all()
        vit = PLANTED["vit_sink"]
        assert (cell_pixels(picture, vit, 32) == blend(CANVAS_GREY, GROUP_COLOURS["vit_sink"], 0.45)).all()

    def test_default_image_is_the_view(self, planted):
        assert planted.probe.view is not None
        by_default = np.asarray(draw_group_map(planted))
        explicit = np.asarray(draw_group_map(planted, planted.probe.view))
        np.testing.assert_array_equal(by_default, explicit)

    @pytest.mark.parametrize(("width", "size"), [(100, (140, 128 + LEGEND)), (336, (336, 336 + LEGEND))])
    def test_size(self, planted, width, size):
        image = solid(width)
        assert draw_group_map(planted, image).size == map_size(planted, image) == size

    def test_legend(self, planted):
        entries = legend_entries(planted)
        assert [e.group for e in entries] == list(ALL_GROUPS)
        assert [e.text for e in entries] == [f"{g} {planted.counts[g]}" for g in ALL_GROUPS]
        assert [e.text for e in entries] == ["vit_sink 2", "llm_sink 1", "dead 1", "alive 12"]
        assert sum(e.count for e in entries) == len(planted)
        # every painted group's swatch is drawn in its pure colour in the strip below the grid
        strip = np.asarray(draw_group_map(planted, solid()))[128:]
        for name in PLANTED:
            assert (strip == GROUP_COLOURS[name]).all(axis=-1).sum() >= 100, name

    @pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "0.5", True])
    def test_bad_alpha(self, planted, alpha):
        with pytest.raises(InputError, match="alpha"):
            draw_group_map(planted, alpha=alpha)

    def test_save_atomic(self, planted, tmp_path):
        path = save_group_map(planted, tmp_path / "out" / "map.png", solid())
        assert path == tmp_path / "out" / "map.png"
        with Image.open(path) as written:
            assert written.format == "PNG"
            np.testing.assert_array_equal(
                np.asarray(written.convert("RGB")), np.asarray(draw_group_map(planted, solid()))
            )
        assert no_temp_files(path.parent)

    def test_failed_save_keeps_old_file(self, planted, tmp_path, monkeypatch):
        path = tmp_path / "map.png"
        path.write_bytes(b"old")

        def broken_save(self, fp, *args, **kwargs):
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError("disk full")

        monkeypatch.setattr(Image.Image, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            save_group_map(planted, path)
        assert path.read_bytes() == b"old"
        assert no_temp_files(tmp_path)


# --------------------------------------------------------------------------- heatmap
def centre(picture: Image.Image, index: int, row: int, col: int, shape, cell: int = 24):
    x, y = heatmap_cell_origin(index, row, col, shape, cell=cell)
    return picture.getpixel((x + cell // 2, y + cell // 2))


class TestHeatmap:
    """Cell colours follow the value monotonically; NaN is hatched grey; layout and inputs as documented."""

    def test_monotone_cells(self):
        values = np.linspace(0.0, 1.0, 12).reshape(3, 4)
        picture = draw_group_heatmap({"dead": values})
        colours = [centre(picture, 0, r, c, values.shape) for r in range(3) for c in range(4)]
        assert colours == [fraction_colour(v) for v in values.ravel()]
        lum = [luminance(c) for c in colours]
        assert all(b > a for a, b in itertools.pairwise(lum))
        x, y = heatmap_cell_origin(0, 1, 2, values.shape)
        block = np.asarray(picture)[y : y + 24, x : x + 24]
        assert (block == fraction_colour(values[1, 2])).all()

    def test_scale(self):
        coarse = [luminance(fraction_colour(v)) for v in np.linspace(0, 1, 101)]
        assert all(b > a for a, b in itertools.pairwise(coarse))
        # finer steps can only dip by one channel's 8-bit rounding
        fine = [luminance(fraction_colour(v)) for v in np.linspace(0, 1, 1001)]
        assert all(b > a - 0.75 for a, b in itertools.pairwise(fine))
        assert fraction_colour(float("nan")) == NO_DATA

    @pytest.mark.parametrize("value", [0.0, 0.1, 0.25, 0.5, 0.73, 0.999, 1.0])
    def test_colours_are_matplotlib_viridis(self, value):
        """Fractions are painted with matplotlib's viridis map, rounded to 8 bits per channel."""
        r, g, b, _ = matplotlib.colormaps["viridis"](value)
        assert FRACTION_MAP == "viridis"
        assert fraction_colour(value) == (round(r * 255), round(g * 255), round(b * 255))

    def test_colours_of_an_array(self):
        """The array form gives every element the colour of its scalar; NaN is NO_DATA; shape ``[*S, 3]``."""
        values = np.array([[0.0, np.nan, 0.5], [1.0, 0.2, np.nan]])
        colours = fraction_colours(values)
        assert colours.shape == (2, 3, 3) and colours.dtype == np.uint8
        for index in np.ndindex(values.shape):
            assert tuple(int(v) for v in colours[index]) == fraction_colour(float(values[index]))
        assert tuple(colours[0, 1]) == NO_DATA and fraction_colour(0.0) != fraction_colour(1.0)

    def test_nan_hatched(self):
        values = np.full((2, 3), 0.5)
        values[1, 1] = np.nan
        picture = draw_group_heatmap({"alive": values, "vit_sink": np.zeros((2, 3))})
        pixels = np.asarray(picture)
        for index in (0, 1):
            for r in range(2):
                for c in range(3):
                    x, y = heatmap_cell_origin(index, r, c, values.shape)
                    block = pixels[y : y + 24, x : x + 24].reshape(-1, 3)
                    found = {tuple(int(v) for v in p) for p in block}
                    if index == 1 and (r, c) == (1, 1):
                        assert found == {NO_DATA, HATCH}
                    else:
                        assert found.isdisjoint({NO_DATA, HATCH})

    def test_panel_order_and_titles(self):
        fractions = {"alive": np.full((2, 2), 0.75), "vit_sink": np.full((2, 2), 0.25)}
        picture = draw_group_heatmap(fractions)
        assert centre(picture, 0, 0, 0, (2, 2)) == fraction_colour(0.25)
        assert centre(picture, 1, 1, 1, (2, 2)) == fraction_colour(0.75)
        half = np.array([[0.0, 1.0], [np.nan, 0.5]])
        assert panel_title("dead", half) == "dead  mean 0.50"
        assert panel_title("dead", np.full((2, 2), np.nan)) == "dead  mean n/a"

    def test_layout(self):
        layout = heatmap_layout((6, 8), 4, cell=24, caption=True)
        assert layout["panel_width"] == 192 and layout["width"] == 8 + 4 * 200
        assert layout["height"] == 8 + 18 + 6 * 24 + 8 + 12 + 16 + 18 + 8
        rng = np.random.default_rng(0)
        fractions = {g: rng.random((6, 8)) for g in ALL_GROUPS}
        assert draw_group_heatmap(fractions, images=10).size == (808, 232)
        assert draw_group_heatmap(fractions).size == (808, 232 - 18)  # no caption line
        assert draw_group_heatmap({"dead": np.zeros((2, 2))}, cell=8).size == (8 + 128 + 8, 26 + 16 + 8 + 12 + 16 + 8)

    def test_colour_bar(self):
        picture = draw_group_heatmap({"dead": np.zeros((2, 2))})
        layout = heatmap_layout((2, 2), 1)
        y = layout["bar_top"] + 6
        assert picture.getpixel((8, y)) == fraction_colour(0.0)
        assert picture.getpixel((8 + layout["bar_width"] - 1, y)) == fraction_colour(1.0)

    def test_caption_written(self):
        fractions = {"dead": np.zeros((2, 2))}
        picture = np.asarray(draw_group_heatmap(fractions, images=37))
        caption = picture[-18 - 8 : -8]
        assert (caption.sum(axis=-1) < 200).any()  # dark text in the caption line

    @pytest.mark.parametrize(
        ("fractions", "match"),
        [
            ({}, "mapping"),
            ({"sinks": np.zeros((2, 2))}, "unknown group 'sinks'"),
            ({"dead": np.zeros(4)}, "2-D"),
            ({"dead": np.zeros((2, 2, 1))}, "2-D"),
            ({"dead": np.zeros((0, 3))}, "2-D"),
            ({"dead": np.zeros((2, 2)), "alive": np.zeros((2, 3))}, "share one grid"),
            ({"dead": np.array([[0.5, 1.5]])}, r"\[0, 1\]"),
            ({"dead": np.array([[-0.1, 0.5]])}, r"\[0, 1\]"),
            ({"dead": np.array([[np.inf, 0.5]])}, r"\[0, 1\]"),
            ({"dead": [["a", "b"]]}, "not numbers"),
        ],
    )
    def test_bad_fractions(self, fractions, match):
        with pytest.raises(InputError, match=match) as info:
            draw_group_heatmap(fractions)
        assert "\n" not in str(info.value)

    @pytest.mark.parametrize(
        ("kwargs", "match"), [({"images": 0}, "image count"), ({"images": True}, "image count"), ({"cell": 2}, "cell")]
    )
    def test_bad_options(self, kwargs, match):
        with pytest.raises(InputError, match=match):
            draw_group_heatmap({"dead": np.zeros((2, 2))}, **kwargs)

    def test_save_atomic(self, tmp_path):
        fractions = {"dead": np.array([[0.0, 0.5], [1.0, np.nan]])}
        path = save_group_heatmap(fractions, tmp_path / "heat.png", images=4, cell=10)
        with Image.open(path) as written:
            assert written.format == "PNG"
            np.testing.assert_array_equal(
                np.asarray(written.convert("RGB")), np.asarray(draw_group_heatmap(fractions, images=4, cell=10))
            )
        assert no_temp_files(tmp_path)
        with pytest.raises(InputError):
            save_group_heatmap({"dead": np.zeros(3)}, tmp_path / "bad.png")
        assert not (tmp_path / "bad.png").exists() and no_temp_files(tmp_path)
