"""The top-1 token picture of a probe and the matplotlib plots (embedlens.pictures.probe / .plots)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedlens.pictures import plots
from embedlens.pictures.colour import DEFAULT_LINE, LINE_STYLES, line_style
from embedlens.pictures.plots import plot_alignment, plot_sweep
from embedlens.pictures.probe import MIN_CELL, draw_top1_grid, save_top1_grid, token_label, top1_cell
from embedlens.result import ProbeResult


@pytest.fixture(scope="module")
def probed(tiny) -> ProbeResult:
    """The tiny model's probe of a black 56 x 56 picture (a 4 x 4 grid)."""
    return tiny.probe(Image.new("RGB", (56, 56), (0, 0, 0)), top_k=3)


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


class TestTop1Picture:
    """Each patch cell carries its top-1 token; cells are big enough to read; the file is written atomically."""

    @pytest.mark.parametrize(
        ("piece", "width", "label"),
        [("▁cat", 8, "_cat"), ("Ġdog", 8, "_dog"), ("a\nb", 8, "a\\nb"), ("\x01x", 8, "?x"), ("", 8, "''"),
         ("elephant", 5, "elep…"), ("elephant", 8, "elephant")],
    )  # fmt: skip
    def test_token_label(self, piece, width, label):
        assert token_label(piece, width) == label

    def test_size_follows_the_grid(self, probed):
        assert probed.grid == (4, 4) and top1_cell(probed) == MIN_CELL  # 56 px / 4 columns is below the minimum
        assert draw_top1_grid(probed).size == (4 * MIN_CELL, 4 * MIN_CELL)
        wide = Image.new("RGB", (400, 300), (0, 0, 0))
        assert top1_cell(probed, wide) == 100 and draw_top1_grid(probed, wide).size == (400, 400)

    def test_grid_lines_and_labels_over_the_image(self, probed):
        """On a black picture: every cell edge is a grey line, and every cell holds white label text."""
        pixels = np.asarray(draw_top1_grid(probed)).astype(int)
        cell = MIN_CELL
        for edge in range(0, 4 * cell, cell):
            assert (pixels[cell // 4, edge] == 110).all() and (pixels[edge, cell - 3] == 110).all()
        for row in range(4):
            for col in range(4):
                label_band = pixels[row * cell + 1 : (row + 1) * cell, col * cell + 1 : (col + 1) * cell]
                assert (label_band.min(axis=-1) > 200).any(), (row, col)  # white text in every cell
        assert (pixels[1 : cell // 4, 1 : cell - 1] == 0).all()  # above the label the picture is untouched

    def test_needs_an_image(self, probed):
        with pytest.raises(ValueError, match="no image"):
            draw_top1_grid(dataclasses.replace(probed, view=None))

    def test_save_atomic(self, probed, tmp_path):
        path = save_top1_grid(probed, tmp_path / "out" / "top1.png")
        assert path == tmp_path / "out" / "top1.png"
        with Image.open(path) as written:
            assert written.format == "PNG"
            np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(draw_top1_grid(probed)))
        assert no_temp_files(path.parent)


# --------------------------------------------------------------------------- plots
def alignment_table() -> tuple[list[dict], dict]:
    rng = np.random.default_rng(0)
    measures = ("norm_mean", "best_cos", "norm_w1", "direction_distance", "readable_embedding", "readable_logit")
    rows = [
        {"group": group, "layer": layer, **{m: float(rng.random() + 0.5) for m in measures}, "cross_layer_cos": 0.5}
        for group in ("visual", "alive", "dead", "text", "prompt")
        for layer in range(4)
    ]
    groups = {"alive": {"norm_matched_layer": 2, "norm_layer0": 1.0}, "visual": {"norm_matched_layer": None}}
    return rows, {"model": "tiny", "images": 3, "focus_group": "alive", "groups": groups}


def sweep_table() -> list[dict]:
    inject = [
        {"kind": "inject", "layer": k, "scores": {"d": 0.5}, "relaxed": {"d": 0.6}, "flops_ratio": 1 - k / 8}
        for k in range(3)
    ]
    baseline = {"kind": "baseline", "setting": "baseline", "scores": {"d": 0.7}, "flops_ratio": 1.0}
    return [*inject, baseline, {"kind": "skip", "setting": "skip:visual@0", "scores": {"d": 0.4}, "flops_ratio": 0.9}]


class TestPlots:
    """The plots are written as PNGs where the analyses say, without pyplot state left behind."""

    def test_alignment_plots(self, tmp_path):
        rows, summary = alignment_table()
        written = plot_alignment(rows, summary, tmp_path)
        assert [p.name for p in written] == ["norms.png", "alignment.png", "readability.png"]
        for path in written:
            with Image.open(path) as picture:
                assert picture.format == "PNG" and picture.width > picture.height > 300
        assert no_temp_files(tmp_path)

    def test_sweep_plot(self, tmp_path):
        path = plot_sweep(sweep_table(), tmp_path, title="sweep")
        assert path == tmp_path / "sweep.png"
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.width > 2 * picture.height
        assert no_temp_files(tmp_path)

    def test_line_styles(self):
        assert line_style("text") == LINE_STYLES["text"] == ("#000000", "--")
        assert line_style("a group of its own") == DEFAULT_LINE
        assert len({colour for colour, _ in LINE_STYLES.values()}) == len(LINE_STYLES)

    def test_no_import_cycle_and_no_pyplot(self):
        """The plots import neither the analyses they draw (the old plots <-> alignment cycle) nor pyplot
        (no global backend switch at import)."""
        tree = ast.parse(Path(plots.__file__).read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "embedlens.taxonomy.groups" in imported
        assert not [name for name in imported if name.startswith("embedlens.analysis") or "pyplot" in name]
