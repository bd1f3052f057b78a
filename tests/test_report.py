"""Multi-layer probing and the HTML report's data, without a browser.

The report is only as good as the numbers it carries: the multi-layer probe must equal single-layer
probes, its saved table must hold one row per token, layer and lens, and the page's compact encoding
must decode to exactly the stored ids (and to the scores within float32 rounding). Every output kind
of the toolkit is produced here on the tiny model and must land in the page with its provenance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from embedlens import InputError
from embedlens.analysis.alignment import AlignOptions, run_align
from embedlens.analysis.sweep import SweepOptions, run_inject_sweep
from embedlens.bench.patchbench import generate_benchmark
from embedlens.bench.runner import EvalOptions, parse_setting, run_eval
from embedlens.bench.vqa import read_questions
from embedlens.context import parse_layers
from embedlens.datasets import open_dataset
from embedlens.report import read_section, write_report
from embedlens.report.encode import TokenTable, decode_array, encode_probe, finish_id_type
from embedlens.report.synthetic import synthetic_probe
from embedlens.result import MultiLayerProbe, ProbeResult
from embedlens.taxonomy import discover_anchors
from embedlens.taxonomy.groups import CODES
from embedlens.taxonomy.stats import StatsOptions, run_stats
from helpers import random_image


class TestParseLayers:
    """The CLI spelling ``all | 0,8,16 | 0-32:4`` (and ints, lists) resolves to sorted unique layers."""

    @pytest.mark.parametrize(
        ("spec", "expected"),
        [
            ("all", tuple(range(33))),
            ("0,8,16", (0, 8, 16)),
            ("0-32:4", (0, 4, 8, 12, 16, 20, 24, 28, 32)),
            ("0-3", (0, 1, 2, 3)),
            (" 16, 0-2 ,2 ", (0, 1, 2, 16)),
            ("-1", (32,)),
            ("5-6:10", (5,)),
            (7, (7,)),
            (-2, (31,)),
            ([16, 0, 16, -1], (0, 16, 32)),
        ],
    )
    def test_spellings(self, spec, expected):
        assert parse_layers(spec, 32) == expected

    @pytest.mark.parametrize(
        ("spec", "fragment"),
        [
            ("", "cannot read"),
            ("0,,8", "cannot read"),
            ("a-b", "cannot read"),
            ("0:4", "cannot read"),
            ("8-0", "must run upwards"),
            ("0-8:0", "at least 1"),
            ("0-33", "out of range"),
            ("40", "out of range"),
            ([], "no layers"),
            (True, "must be numbers"),
        ],
    )
    def test_mistakes_are_user_errors(self, spec, fragment):
        with pytest.raises(InputError, match=fragment):
            parse_layers(spec, 32)


class TestMultiLayerProbe:
    """Several layers and both lenses from one forward pass, saved as one table."""

    def test_equals_single_layer_probes_from_one_forward(self, tiny, image_path):
        calls = []
        handle = tiny.model.register_forward_hook(lambda *_: calls.append(1))
        try:
            multi = tiny.probe(image_path, layers="0,2-4", lens=["embedding", "logit"], top_k=4)
        finally:
            handle.remove()
        assert len(calls) == 1  # layer 4 is the last: the forward runs to its end, once
        assert multi.layers == (0, 2, 3, 4) and multi.lenses == ("embedding", "logit")
        for lens in multi.lenses:
            for layer in multi.layers:
                single = tiny.probe(image_path, layer=layer, lens=lens, top_k=4)
                got = multi.get(layer, lens)
                assert np.array_equal(got.top_ids, single.top_ids)
                assert np.array_equal(got.top_sims, single.top_sims)
                assert np.array_equal(got.norm, single.norm)
                assert got.top_tokens == single.top_tokens and got.provenance.layer == layer

    def test_batch_of_images_gives_one_probe_each(self, tiny, make_image):
        probes = tiny.probe([make_image(1), make_image(2)], layers=[-1, 0])
        assert [p.layers for p in probes] == [(0, 4), (0, 4)]
        alone = tiny.probe(make_image(2), layer=4)
        assert np.array_equal(probes[1].get(4).top_ids, alone.top_ids)

    def test_save_writes_one_row_per_token_layer_and_lens(self, tiny, image_path, tmp_path):
        multi = tiny.probe(image_path, layers="all", lens=["logit", "embedding"], top_k=3)
        paths = multi.save(tmp_path)
        frame = pd.read_parquet(paths["parquet"])
        assert len(frame) == len(multi) * 5 * 2
        assert list(frame.columns[:2]) == ["lens", "layer"]
        assert frame.groupby(["lens", "layer"]).size().to_dict() == {
            (lens, layer): 16 for lens in ("embedding", "logit") for layer in range(5)
        }
        data = json.loads(paths["json"].read_text())
        assert data["layers"] == [0, 1, 2, 3, 4] and data["lenses"] == ["logit", "embedding"]
        assert paths["view"].is_file()
        back = MultiLayerProbe.load(tmp_path)
        assert back.lenses == multi.lenses and back.view is not None
        for result in multi.results:
            again = back.get(result.layer, result.lens)
            assert np.array_equal(again.top_ids, result.top_ids) and again.top_tokens == result.top_tokens
            assert np.allclose(again.top_sims, result.top_sims)

    def test_user_errors(self, tiny, image_path):
        with pytest.raises(InputError, match="either layer or layers"):
            tiny.probe(image_path, layer=2, layers="all")
        with pytest.raises(InputError, match="out of range"):
            tiny.probe(image_path, layers="0-9")
        with pytest.raises(InputError, match="several lenses need layers"):
            tiny.probe_batch([image_path], lens=["embedding", "logit"])
        with pytest.raises(InputError, match="was not probed"):
            tiny.probe(image_path, layers="0,1").get(3)


class TestEncoding:
    """The page's compact arrays decode to exactly what the results hold."""

    def test_token_table_keeps_each_id_once(self):
        table = TokenTable()
        first = table.add(np.array([[5, 9], [9, 2]]), [["a", "b"], ["b", "c"]])
        second = table.add(np.array([[2, 7]]), [["c", "d"]])
        assert table.ids == [5, 9, 2, 7] and table.pieces == ["a", "b", "c", "d"]
        assert first.tolist() == [[0, 1], [1, 2]] and second.tolist() == [[2, 3]]

    def test_probe_arrays_decode_to_the_results(self, tiny, image_path):
        multi = tiny.probe(image_path, layers="0,3", lens=["embedding", "logit"], top_k=5)
        groups = ["alive"] * 16
        groups[5] = "dead"
        table = TokenTable()
        panel = encode_probe(multi, table, groups=groups)
        finish_id_type([panel], table)
        assert panel["idType"] == "u16" and panel["groups"] == CODES["alive"] * 5 + CODES["dead"] + CODES["alive"] * 10
        for lens in multi.lenses:
            ids = decode_array(panel["data"][lens]["ids"], "u16").reshape(2, 16, 5)
            scores = decode_array(panel["data"][lens]["scores"], "f32").reshape(2, 16, 5)
            norms = decode_array(panel["data"][lens]["norms"], "f32").reshape(2, 16)
            for position, layer in enumerate(multi.layers):
                result = multi.get(layer, lens)
                assert np.array_equal(np.array(table.ids)[ids[position]], result.top_ids)
                assert [[table.pieces[i] for i in row] for row in ids[position]] == result.top_tokens
                np.testing.assert_allclose(scores[position], result.top_sims, rtol=1e-6)
                np.testing.assert_allclose(norms[position], result.norm, rtol=1e-6)

    def test_tokens_are_put_in_grid_order(self, tiny, image_path):
        result = tiny.probe(image_path, top_k=2)
        order = np.random.default_rng(0).permutation(16)
        shuffled = ProbeResult(
            **{
                **result.__dict__,
                "index": result.index[order],
                "row": result.row[order],
                "col": result.col[order],
                "position": result.position[order],
                "norm": result.norm[order],
                "top_ids": result.top_ids[order],
                "top_tokens": [result.top_tokens[i] for i in order],
                "top_sims": result.top_sims[order],
            }
        )
        table = TokenTable()
        panel = encode_probe(MultiLayerProbe([shuffled]), table)
        finish_id_type([panel], table)
        ids = decode_array(panel["data"]["embedding"]["ids"], "u16").reshape(16, 2)
        assert np.array_equal(np.array(table.ids)[ids], result.top_ids)

    def test_lost_cells_are_refused(self, tiny, image_path):
        result = tiny.probe(image_path, top_k=2)
        result.row = result.row.copy()
        result.row[3] = result.row[4]
        with pytest.raises(InputError, match="do not cover"):
            encode_probe(MultiLayerProbe([result]), TokenTable())


# --------------------------------------------------------------------------- every output kind
@pytest.fixture(scope="module")
def runs(tiny, tiny_anchor_file, tmp_path_factory) -> dict[str, Path]:
    """Every output kind of the toolkit, made on the tiny model."""
    root = tmp_path_factory.mktemp("runs")
    images = root / "images"
    images.mkdir()
    for i in range(4):
        random_image(300 + i).save(images / f"{i}.png")
    out = {"images": images}
    tiny.probe(images / "0.png", layers="all", lens=["embedding", "logit"], top_k=5).save(root / "multi")
    out["multi"] = root / "multi"
    tiny.probe(images / "1.png", top_k=3).save(root / "probe")
    out["probe"] = root / "probe"
    tiny.classify(images / "0.png", anchors=tiny_anchor_file).save(root / "classify")
    out["classify"] = root / "classify"
    found = discover_anchors(tiny, sorted(images.iterdir()), progress=False)
    out["anchors"] = found.anchors.save(root / "anchors.json")
    run_stats(
        tiny,
        open_dataset(images),
        root / "stats",
        anchors=tiny_anchor_file,
        options=StatsOptions(bootstrap=50),
        progress=False,
    )
    out["stats"] = root / "stats"
    bench = root / "bench"
    generate_benchmark(bench, tiny.adapter, per_category=1, progress=False)
    quick = EvalOptions(batch_size=4, max_new_tokens=2, bootstrap=50)
    run_eval(tiny, read_questions(bench), [parse_setting("prune:target")], root / "eval", options=quick, progress=False)
    out["eval"] = root / "eval"
    sweep = SweepOptions(layers=(0, 2), scales=(0.1,), timing_items=0, eval=quick)
    run_inject_sweep(tiny, [read_questions(bench)], root / "sweep", options=sweep, progress=False)
    out["sweep"] = root / "sweep"
    run_align(
        tiny, open_dataset(images), root / "align", options=AlignOptions(batch_size=4, lens_top_k=3), progress=False
    )
    out["align"] = root / "align"
    return out


def page_data(html: str) -> dict:
    block = re.search(r'<script type="application/json" id="embedlens-data">(.*?)</script>', html, re.S)
    return json.loads(block.group(1))


class TestReport:
    """One file with every section, its provenance, no reference to anything outside it."""

    def test_every_kind_is_recognised(self, runs):
        kinds = {
            name: read_section(runs[name]).kind
            for name in ("multi", "probe", "classify", "anchors", "stats", "eval", "sweep", "align")
        }
        assert kinds == {
            "multi": "probe",
            "probe": "probe",
            "classify": "classify",
            "anchors": "anchors",
            "stats": "stats",
            "eval": "eval",
            "sweep": "inject-sweep",
            "align": "align",
        }

    def test_page_holds_every_section_with_provenance_and_nothing_external(self, runs, tmp_path):
        order = ["align", "sweep", "eval", "stats", "anchors", "classify", "probe", "multi"]
        info = write_report([runs[name] for name in order], tmp_path / "r.html")
        html = (tmp_path / "r.html").read_text(encoding="utf-8")
        assert info.sections == ("probe", "probe", "classify", "anchors", "stats", "eval", "inject-sweep", "align")
        assert info.bytes == len(html.encode())
        sections = re.findall(r'<section class="sec" id="sec-\d+" data-kind="([^"]+)">(.*?)</section>', html, re.S)
        assert [kind for kind, _ in sections] == list(info.sections)
        for kind, body in sections:
            assert '<dl class="prov">' in body, kind
            if kind != "anchors":
                assert "<dt>model</dt>" in body, kind
        assert "default-src 'none'" in html
        assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", html)
        assert "http://" not in html and "https://" not in html
        assert html.count("<svg") >= 4
        data = page_data(html)
        assert [p["layers"] for p in data["panels"]] == [[0], [0, 1, 2, 3, 4], [0]]
        assert data["panels"][1]["lenses"] == ["embedding", "logit"]
        assert all(p["image"].startswith("data:image/") for p in data["panels"])

    def test_tables_carry_the_outputs_numbers(self, runs, tmp_path):
        write_report([runs["eval"], runs["stats"], runs["sweep"]], tmp_path / "r.html")
        html = (tmp_path / "r.html").read_text(encoding="utf-8")
        table = json.loads((runs["eval"] / "table.json").read_text())
        target = table["settings"][1]
        assert target["name"] == "prune:target"
        cell = target["categories"][table["categories"][0]]
        assert f"Δ {cell['delta'] * 100:+.1f} [" in html
        summary = json.loads((runs["stats"] / "summary.json").read_text())
        for name, group in summary["groups"].items():
            assert f"{group['fraction'] * 100:.2f} [{group['ci'][0] * 100:.2f}, {group['ci'][1] * 100:.2f}]" in html, (
                name
            )
        sweep = json.loads((runs["sweep"] / "sweep.json").read_text())
        assert all(f"<td>{row['setting']}</td>" in html for row in sweep["rows"] + sweep["scaling_rows"])

    def test_probe_without_view_uses_the_source_image(self, runs, tmp_path):
        section = read_section(runs["probe"])
        assert section.data["view"] is not None and "centre-cropped" in section.notes[0]
        moved = tmp_path / "moved"
        moved.mkdir()
        for name in ("result.json", "tokens.parquet"):
            (moved / name).write_bytes((runs["probe"] / name).read_bytes())
        data = json.loads((moved / "result.json").read_text())
        data["image"] = str(tmp_path / "gone.png")
        (moved / "result.json").write_text(json.dumps(data))
        section = read_section(moved)
        assert section.data["view"] is None and "not found" in section.notes[0]
        write_report([moved], tmp_path / "r.html")
        assert page_data((tmp_path / "r.html").read_text())["panels"][0]["image"] is None

    def test_synthetic_llava_shapes_stay_under_ten_megabytes(self, tmp_path):
        """576 tokens x 33 layers x top-10 x both lenses, every id distinct per cell (the worst case)."""
        synthetic_probe(seed=0).save(tmp_path / "synthetic")
        info = write_report([tmp_path / "synthetic"], tmp_path / "r.html")
        assert info.bytes < 10 * 2**20
        data = page_data((tmp_path / "r.html").read_text())
        assert data["panels"][0]["n"] == 576 and len(data["panels"][0]["layers"]) == 33

    def test_mistakes_are_user_errors(self, runs, tmp_path):
        with pytest.raises(InputError, match="no such output folder"):
            write_report([tmp_path / "nope"], tmp_path / "r.html")
        with pytest.raises(InputError, match="holds no EmbedLens output"):
            write_report([tmp_path], tmp_path / "r.html")
        with pytest.raises(InputError, match="at least one"):
            write_report([], tmp_path / "r.html")
        with pytest.raises(InputError, match="must be a file"):
            write_report([runs["probe"]], tmp_path)

    def test_command_writes_the_page(self, runs, tmp_path):
        from embedlens.cli import app

        args = ["report", str(runs["probe"]), str(runs["stats"]), "--out", str(tmp_path / "r.html")]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "sections: probe, stats" in result.output and (tmp_path / "r.html").is_file()
