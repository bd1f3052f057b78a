"""Images the model sees as several views (LLaVA-NeXT's base grid and tiles, InternVL's tiles and thumbnail):
probe results, their files, the pictures, the taxonomy and the report cover every view, each on its own
grid and picture, while single-view results stay as they were.

The views come from a test-only adapter over the tiny LLaVA (:class:`TwoViews`): each image's 4 x 4 grid
is reported as two views, ``"a"`` (grid rows 0-1) and ``"b"`` (rows 2-3), each 2 x 4, with its own
picture (the top and the bottom half of the picture the model saw). The model computes exactly what it
computes for one view, so every number must equal the single-view result's, relabelled by view.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import embedlens
from embedlens import InputError
from embedlens.datasets import open_dataset
from embedlens.models.base import PreparedBatch, VisualSpan
from embedlens.models.llava import LlavaAdapter
from embedlens.pictures.groups import draw_group_map, group_panels, legend_entries, map_size
from embedlens.pictures.panels import joined_size, panel_origins
from embedlens.pictures.probe import draw_top1_grid, top1_panels
from embedlens.report import write_report
from embedlens.report.browser import BrowserError, Chromium, find_chromium
from embedlens.report.encode import TokenTable, encode_probe
from embedlens.result import MultiLayerProbe, ProbeResult
from embedlens.taxonomy import ClassifiedResult, diagnose
from embedlens.taxonomy.groups import CODES
from embedlens.taxonomy.stats import StatsOptions, merge, run_stats
from embedlens.views import ViewInfo
from taxonomy_planting import PLANTED, expected_groups, plant

#: The two views of every image: name, grid, first token.
VIEWS = (("a", (2, 4), 0), ("b", (2, 4), 8))


class TwoViews(LlavaAdapter):
    """Tiny LLaVA reporting each image as two 2 x 4 views with their own pictures (test only, unregistered).

    View ``"a"`` carries the image's markers (the text positions just before and after its tokens) and
    any extra tokens (CLS under the ``"full"`` feature strategy).
    """

    def find_spans(self, inputs: Mapping) -> list[list[VisualSpan]]:
        out = []
        for sample_spans in super().find_spans(inputs):
            views = []
            for span in sample_spans:
                rows, cols = span.grid
                half = rows // 2 * cols
                common = {"sample": span.sample, "image": span.image, "global_image": span.global_image}
                around = torch.cat([span.extra_positions, span.positions])
                markers = torch.tensor([int(around.min()) - 1, int(around.max()) + 1])
                views.append(
                    VisualSpan(
                        **common,
                        positions=span.positions[:half].clone(),
                        grid=(rows // 2, cols),
                        extra_positions=span.extra_positions.clone(),
                        view="a",
                        markers=markers,
                        picture=2 * span.global_image,
                    )
                )
                views.append(
                    VisualSpan(
                        **common,
                        positions=span.positions[half:].clone(),
                        grid=(rows - rows // 2, cols),
                        view="b",
                        picture=2 * span.global_image + 1,
                    )
                )
            out.append(views)
        return out

    def encode(self, images: Sequence[Sequence[Image.Image]], texts: list[str]) -> PreparedBatch:
        batch = super().encode(images, texts)
        batch.views = [half for picture in batch.views for half in halves(picture)]
        return batch

    def vision_token_features(self, features: torch.Tensor | None, span: VisualSpan) -> torch.Tensor:
        """The image's projector input rows (extra tokens first, then the grid), split as the grid is: view
        "a" is the top half (right after the extra tokens), "b" the bottom half (the last rows)."""
        assert features is not None
        rows = features[span.global_image]
        if span.view == "a":
            extra = span.extra_positions.numel()
            return rows[extra : extra + span.num_tokens]
        return rows[rows.shape[0] - span.num_tokens :]


def halves(picture: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The top and bottom half of a picture."""
    width, height = picture.size
    return picture.crop((0, 0, width, height // 2)), picture.crop((0, height // 2, width, height))


def two_views(session: embedlens.Session) -> embedlens.Session:
    """The same loaded model behind the two-view adapter."""
    adapter = session.adapter
    return embedlens.Session(TwoViews(adapter.model, adapter.processor, adapter.source, adapter.profile))


def pixels(picture: Image.Image | None) -> np.ndarray:
    assert picture is not None
    return np.asarray(picture.convert("RGB"))


def assert_relabelled(multi: ProbeResult, single: ProbeResult) -> None:
    """``multi`` holds ``single``'s numbers, its 4 x 4 grid read as two 2 x 4 views."""
    assert len(multi) == len(single) == 16
    np.testing.assert_array_equal(multi.position, single.position)
    np.testing.assert_array_equal(multi.top_ids, single.top_ids)
    np.testing.assert_array_equal(multi.top_sims, single.top_sims)
    np.testing.assert_array_equal(multi.norm, single.norm)
    assert multi.top_tokens == single.top_tokens
    assert [(v.name, v.grid, v.start, v.count) for v in multi.views] == [(n, g, s, 8) for n, g, s in VIEWS]
    assert multi.grid == (2, 4)
    assert multi.view_index.tolist() == [0] * 8 + [1] * 8
    assert multi.index.tolist() == list(range(8)) * 2
    assert multi.row.tolist() == ([0] * 4 + [1] * 4) * 2
    assert multi.col.tolist() == list(range(4)) * 4


@pytest.fixture(scope="module")
def pair(tiny, image_path) -> tuple[ProbeResult, ProbeResult]:
    """The same image probed as one view and as two."""
    return two_views(tiny).probe(image_path, top_k=3), tiny.probe(image_path, top_k=3)


@pytest.fixture(scope="module")
def planted(tiny_dir):
    """A private tiny model with planted groups (patches 0, 5, 9, 12), behind the two-view adapter."""
    session = embedlens.load(str(tiny_dir), device="cpu")
    anchors, _ = plant(session)
    return two_views(session), anchors


class TestProbe:
    """Every view's grid tokens are probed, in sequence order, with coordinates within their own view."""

    def test_arrays_cover_every_view(self, pair):
        multi, single = pair
        assert_relabelled(multi, single)
        first, last = int(single.position.min()), int(single.position.max())
        assert multi.views[0].markers == (first - 1, last + 1) and multi.views[1].markers == ()
        top, bottom = halves(single.view)
        np.testing.assert_array_equal(pixels(multi.picture(0)), pixels(top))
        np.testing.assert_array_equal(pixels(multi.picture(1)), pixels(bottom))
        assert multi.view is multi.picture(0)

    def test_part_is_one_view_on_its_own_grid(self, pair):
        multi, single = pair
        part = multi.part(1)
        assert part.grid == (2, 4) and len(part) == 8 and len(part.views) == 1
        assert part.views[0] == ViewInfo("b", (2, 4), 0, 8)
        np.testing.assert_array_equal(part.position, single.position[8:])
        np.testing.assert_array_equal(part.top_ids, single.top_ids[8:])
        np.testing.assert_array_equal(pixels(part.view), pixels(halves(single.view)[1]))

    def test_multi_layer_probe_covers_every_view(self, tiny, image_path):
        options = {"layers": "0,2", "lens": ["embedding", "logit"], "top_k": 2}
        multi = two_views(tiny).probe(image_path, **options)
        single = tiny.probe(image_path, **options)
        assert len(multi.results) == 4 and multi.views == multi.results[3].views
        for mine, theirs in zip(multi.results, single.results, strict=True):
            assert (mine.layer, mine.lens) == (theirs.layer, theirs.lens)
            assert_relabelled(mine, theirs)

    def test_summary_names_the_views(self, pair):
        text = pair[0].summary()
        assert "grid    2 views: a 2 x 4, b 2 x 4 = 16 visual tokens at positions" in text
        assert "first 8 visual tokens (view row, col)" in text
        assert re.search(r"^  a \( 1,  3\)  ", text, re.M)
        assert "views" not in pair[1].summary()

    def test_extra_tokens_are_metadata_never_rows(self, with_cls, image_path):
        multi = two_views(with_cls).probe(image_path, top_k=2)
        single = with_cls.probe(image_path, top_k=2)
        assert_relabelled(multi, single)
        cls_position = int(single.position.min()) - 1
        assert multi.views[0].extra_positions == (cls_position,)
        assert cls_position not in multi.position.tolist()
        assert multi.to_dict()["views"][0]["extra_positions"] == [cls_position]
        assert "extra   1 visual tokens that are not grid cells" in multi.summary()

    def test_a_report_panel_shows_one_view(self, pair):
        with pytest.raises(InputError, match="one view"):
            encode_probe(MultiLayerProbe([pair[0]]), TokenTable())
        assert encode_probe(MultiLayerProbe([pair[0].part(1)]), TokenTable())["grid"] == [2, 4]

    def test_views_must_cover_the_tokens(self, pair):
        multi = pair[0]
        with pytest.raises(InputError, match="hold 12 tokens"):
            ProbeResult(**{**multi.__dict__, "views": (ViewInfo("a", (2, 4), 0, 8), ViewInfo("b", (1, 4), 8, 4))})
        with pytest.raises(InputError, match="starts at token 4"):
            ProbeResult(**{**multi.__dict__, "views": (ViewInfo("a", (2, 4), 0, 8), ViewInfo("b", (2, 4), 4, 8))})
        with pytest.raises(InputError, match="not its first view's grid"):
            ProbeResult(**{**multi.__dict__, "grid": (4, 4)})


class TestFiles:
    """Saved results keep the views; files written before views existed still load, as one view."""

    def test_single_layer_round_trip(self, pair, tmp_path):
        multi = pair[0]
        multi.save(tmp_path)
        data = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
        assert [(v["name"], v["grid"], v["start"], v["count"]) for v in data["views"]] == [
            (n, list(g), s, 8) for n, g, s in VIEWS
        ]
        assert [t["view"] for t in data["tokens"]] == [0] * 8 + [1] * 8
        frame = pd.read_parquet(tmp_path / "tokens.parquet")
        assert frame.columns[:3].tolist() == ["index", "view", "row"]
        assert frame["view"].tolist() == [0] * 8 + [1] * 8
        loaded = ProbeResult.load(tmp_path)
        assert loaded.views == multi.views
        assert_relabelled(loaded, pair[1])

    def test_multi_layer_round_trip_with_every_picture(self, tiny, image_path, tmp_path):
        multi = two_views(tiny).probe(image_path, layers="0,1", top_k=2)
        paths = multi.save(tmp_path)
        assert paths["view"] == tmp_path / "view.png" and paths["view-1"] == tmp_path / "view-1.png"
        assert json.loads((tmp_path / "result.json").read_text())["views"][1]["name"] == "b"
        assert pd.read_parquet(tmp_path / "tokens.parquet")["view"].tolist() == ([0] * 8 + [1] * 8) * 2
        loaded = MultiLayerProbe.load(tmp_path)
        assert loaded.views == multi.views
        for v in (0, 1):
            np.testing.assert_array_equal(pixels(loaded.picture(v)), pixels(multi.picture(v)))
        for mine, theirs in zip(loaded.results, multi.results, strict=True):
            np.testing.assert_array_equal(mine.top_ids, theirs.top_ids)
            assert mine.views == theirs.views

    def test_single_view_files_are_unchanged_and_load_as_one_full_view(self, pair, tmp_path):
        single = pair[1]
        single.save(tmp_path)
        data = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
        assert "views" not in data and "view" not in data["tokens"][0]
        assert "view" not in pd.read_parquet(tmp_path / "tokens.parquet").columns
        loaded = ProbeResult.load(tmp_path)
        assert loaded.views == (ViewInfo("full", (4, 4), 0, 16),)
        assert loaded.view_index.tolist() == [0] * 16

    def test_multi_layer_file_without_views_loads(self, tiny, image_path, tmp_path):
        """A header as the previous version wrote it: no ``views`` key, no ``view`` column."""
        tiny.probe(image_path, layers="0,1", top_k=2).save(tmp_path)
        header = json.loads((tmp_path / "result.json").read_text())
        assert "views" not in header
        loaded = MultiLayerProbe.load(tmp_path)
        assert loaded.views == (ViewInfo("full", (4, 4), 0, 16),) and loaded.view is not None


class TestPictures:
    """One panel per view, each drawn on that view's own picture and grid."""

    def test_top1_one_panel_per_view(self, pair):
        multi, single = pair
        panels = top1_panels(multi)
        assert len(panels) == 2
        for v, panel in enumerate(panels):
            np.testing.assert_array_equal(pixels(panel), pixels(draw_top1_grid(multi.part(v))))
        joined = draw_top1_grid(multi)
        sizes = [panel.size for panel in panels]
        assert joined.size == joined_size(sizes)
        for (x, y), panel in zip(panel_origins(sizes), panels, strict=True):
            box = joined.crop((x, y, x + panel.width, y + panel.height))
            np.testing.assert_array_equal(pixels(box), pixels(panel))
        # a single-view picture keeps its size: cols * cell by rows * cell, no title strip
        assert draw_top1_grid(single).size == (4 * 56, 4 * 56)

    def test_group_map_one_panel_per_view_one_legend(self, planted, make_image):
        session, anchors = planted
        result = session.classify(make_image(1), anchors=anchors)
        panels = group_panels(result)
        assert len(panels) == 2 and all(panel.size == (4 * 32, 2 * 32) for panel in panels)
        picture = draw_group_map(result)
        assert picture.size == map_size(result)
        assert [entry.count for entry in legend_entries(result)] == [2, 1, 1, 12]
        # patch 9 (dead) is cell (0, 1) of view b: tinted in its panel, on the bottom half's picture
        x, y = panel_origins([panel.size for panel in panels])[1]
        untinted = group_panels(result, alpha=0.0)[1]
        cell = (slice(y + 4, y + 28), slice(x + 32 + 4, x + 64 - 4))
        assert not np.array_equal(pixels(picture)[cell], pixels(untinted)[4:28, 36:60])
        np.testing.assert_array_equal(pixels(picture)[y + 4 : y + 28, x + 4 : x + 28], pixels(untinted)[4:28, 4:28])


class TestTaxonomy:
    """Every view's grid tokens are labelled and counted; extra tokens never are."""

    def test_classify_counts_every_view(self, planted, make_image):
        session, anchors = planted
        result = session.classify(make_image(1), anchors=anchors)
        assert result.group.tolist() == expected_groups()
        assert sum(result.counts.values()) == 16
        assert result.part(1).group.tolist() == expected_groups()[8:]
        assert result.part(1).counts["dead"] == 1  # patch 9
        text = result.summary()
        assert "view a (2 x 4)" in text and "view b (2 x 4)" in text

    def test_diagnose_rows_are_every_views_tokens(self, planted, tiny_dir, make_image):
        session, anchors = planted
        frames = diagnose(
            session, [make_image(1), make_image(2)], anchors=anchors, attention_layers=[1], cross_image=True
        )
        single = embedlens.load(str(tiny_dir), device="cpu")
        plant(single)
        reference = diagnose(
            single, [make_image(1), make_image(2)], anchors=anchors, attention_layers=[1], cross_image=True
        )
        for frame, other in zip(frames, reference, strict=True):
            assert frame.index.names == ["view", "index"]
            assert frame.index.tolist() == [(v, i) for v in (0, 1) for i in range(8)]
            assert frame.attrs["views"] == ["a", "b"] and "vision_norm" not in frame.attrs
            assert frame["group"].tolist() == other["group"].tolist() == expected_groups()
            for column in ("vision_norm", "projected_norm", "text_attention", "text_attention_share"):
                np.testing.assert_allclose(
                    frame[column].to_numpy(), other[column].to_numpy(), rtol=1e-9, err_msg=column
                )
            np.testing.assert_allclose(frame["cross_image_cosine"], other["cross_image_cosine"], rtol=1e-9)
            assert frame["text_attention_share"].sum() == pytest.approx(1.0)

    def test_stats_count_every_view(self, planted, image_folder, tmp_path):
        session, anchors = planted
        summary = run_stats(
            session,
            open_dataset(image_folder),
            tmp_path / "out",
            anchors=anchors,
            options=StatsOptions(bootstrap=20),
            progress=False,
        )
        data = summary.data
        assert data["tokens"] == 4 * 16 and data["groups"]["dead"]["tokens"] == 4
        tokens = pd.read_parquet(tmp_path / "out" / "tokens.parquet")
        assert tokens["view"].tolist() == ([0] * 8 + [1] * 8) * 4
        assert tokens["index"].tolist() == list(range(8)) * 8
        assert tokens["group"].tolist() == expected_groups() * 4
        heat = data["heatmap"]
        assert heat["view"] == "a" and heat["grid"] == [2, 4] and heat["images"] == 4
        assert heat["other_grids"] == {"b 2x4": 4}
        row, col = divmod(PLANTED["llm_sink"], 4)
        assert heat["fractions"]["llm_sink"][row][col] == 1.0

    def test_stats_parts_written_before_views_still_merge(self, tiny, tiny_anchor_file, image_folder, tmp_path):
        """A run interrupted under the previous version has parts without the ``view`` column."""
        dataset, options = open_dataset(image_folder), StatsOptions(bootstrap=20)
        run_stats(tiny, dataset, tmp_path / "out", anchors=tiny_anchor_file, options=options, progress=False)
        parts = sorted((tmp_path / "out" / "parts").glob("*.parquet"))
        assert parts
        for part in parts:
            pq.write_table(pq.read_table(part).drop(["view"]), part)
        merge(tmp_path / "out", dataset, options, picture=False)
        tokens = pd.read_parquet(tmp_path / "out" / "tokens.parquet")
        assert len(tokens) == 4 * 16 and tokens["view"].tolist() == [0] * 64
        assert tokens["index"].tolist() == list(range(16)) * 4


class TestReport:
    """The report draws one panel per view, each on its view's picture and grid."""

    def test_one_panel_per_view(self, planted, make_image, tmp_path):
        session, anchors = planted
        image = make_image(1)
        session.probe(image, layers="0,1", top_k=3).save(tmp_path / "multi")
        classified = session.classify(image, anchors=anchors)
        classified.save(tmp_path / "classify")
        loaded = ClassifiedResult.load(tmp_path / "classify")
        assert loaded.probe.views == classified.probe.views and loaded.group.tolist() == expected_groups()
        from embedlens.cli.probe import _view

        assert [p.name for p in _view(classified.probe, tmp_path / "classify")] == ["view.png", "view-1.png"]
        write_report([tmp_path / "multi", tmp_path / "classify"], tmp_path / "report.html")
        html = (tmp_path / "report.html").read_text(encoding="utf-8")
        block = re.search(r'<script type="application/json" id="embedlens-data">(.*?)</script>', html, re.S)
        panels = json.loads(block.group(1))["panels"]
        assert len(panels) == 4 and html.count('<div class="probe" id="panel-') == 4
        assert html.count('<h3 class="view">view a</h3><div class="probe"') == 2
        assert [p["title"].rsplit(" · ", 1)[1] for p in panels] == ["view a", "view b"] * 2
        assert all(p["grid"] == [2, 4] and p["n"] == 8 and p["image"] is not None for p in panels)
        expected = "".join(CODES[name] for name in expected_groups())
        assert [p["groups"] for p in panels[2:]] == [expected[:8], expected[8:]]

    def test_each_view_panel_shows_its_own_tokens_in_a_browser(self, pair, tmp_path):
        """Hovering cell (1, 1) of each view's panel shows that view's token there, at its own row and column."""
        try:
            find_chromium()
        except BrowserError as err:
            pytest.fail(f"the report's browser tests need Chromium: {err}")
        multi = pair[0]
        MultiLayerProbe([multi]).save(tmp_path / "multi")
        write_report([tmp_path / "multi"], tmp_path / "report.html")
        with Chromium() as browser:
            browser.open_report(tmp_path / "report.html")
            for panel in (0, 1):
                part = multi.part(panel)
                browser.hover_cell(panel, 5, part.grid)
                shown = browser.evaluate(
                    f"""(() => {{ const t = document.querySelector('#panel-{panel} .tip');
                    return {{head: t.querySelector('.tip-head')?.textContent || '',
                             tokens: [...t.querySelectorAll('.tok')].map(e => e.textContent)}}; }})()"""
                )
                assert shown["tokens"] == list(part.top_tokens[5])
                assert "row 1, col 1" in shown["head"]
                assert browser.evaluate(f"document.querySelectorAll('#panel-{panel} canvas').length") >= 1
