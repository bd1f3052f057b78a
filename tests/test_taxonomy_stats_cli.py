"""``embedlens stats``: the files it writes, its summary, and one-line errors for bad datasets."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers import assert_user_error, run_cli


def stats_args(tiny_dir, dataset, out, anchors, *extra):
    return ["stats", dataset, "--model", tiny_dir, "--out", out, "--anchors", anchors, "--device", "cpu", *extra]


class TestRun:
    def test_files_and_summary(self, capsys, tiny, tiny_dir, image_folder, tiny_anchor_file, tmp_path):
        out = tmp_path / "out"
        code, text, err = run_cli(capsys, *stats_args(tiny_dir, image_folder, out, tiny_anchor_file, "--no-progress"))
        assert code == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["images"] == {
            "total": 5,
            "used": 4,
            "skipped": 1,
            "skipped_list": [summary["images"]["skipped_list"][0]],
        }
        assert summary["images"]["skipped_list"][0]["key"] == "9.png"
        tokens = pd.read_parquet(out / "tokens.parquet")
        probes = [tiny.probe(image_folder / f"{i}.png", top_k=3) for i in range(4)]
        assert [list(ids) for ids in tokens["top_ids"]] == [ids.tolist() for p in probes for ids in p.top_ids]
        for name, entry in summary["groups"].items():
            assert entry["tokens"] == int((tokens["group"] == name).sum())
            assert f"  {name:<9} {entry['tokens']:>9}  {entry['fraction']:>6.1%}" in text
        assert "skipped 1 unreadable image(s):\n  9.png: cannot read image" in text
        for name in ("tokens.parquet", "images.parquet", "summary.json", "heatmap.png"):
            assert f"wrote {out / name}" in text

        # same command again: everything is done, nothing is recomputed, same summary
        code, _, err = run_cli(capsys, *stats_args(tiny_dir, image_folder, out, tiny_anchor_file, "--no-progress"))
        assert code == 0, err
        assert json.loads((out / "summary.json").read_text()) == summary

    def test_malformed_jsonl_lines_warned(self, capsys, tiny_dir, tiny_anchor_file, tmp_path, make_image):
        make_image(0).save(tmp_path / "a.png")
        (tmp_path / "d.jsonl").write_text('{"image": "a.png"}\nnope\n{"image": 3}\n', encoding="utf-8")
        args = stats_args(tiny_dir, tmp_path / "d.jsonl", tmp_path / "out", tiny_anchor_file, "--no-progress")
        code, _, err = run_cli(capsys, *args)
        assert code == 0
        assert err.splitlines() == [
            f"embedlens: warning: {tmp_path / 'd.jsonl'}: 2 malformed line(s) skipped: "
            'line 2: not valid JSON (Expecting value); line 3: no "image" path'
        ]


class TestErrors:
    def test_empty_dataset(self, capsys, tiny_dir, tiny_anchor_file, tmp_path):
        (tmp_path / "empty").mkdir()
        code, out, err = run_cli(capsys, *stats_args(tiny_dir, tmp_path / "empty", tmp_path / "o", tiny_anchor_file))
        assert_user_error(code, out, err, "has no images")

    def test_missing_dataset(self, capsys, tiny_dir, tiny_anchor_file, tmp_path):
        code, out, err = run_cli(capsys, *stats_args(tiny_dir, tmp_path / "nope", tmp_path / "o", tiny_anchor_file))
        assert_user_error(code, out, err, "dataset not found")

    def test_no_anchors_for_the_model(self, capsys, tiny_dir, image_folder, tmp_path):
        code, out, err = run_cli(capsys, "stats", image_folder, "--model", tiny_dir, "--out", tmp_path / "o")
        assert_user_error(code, out, err, "no built-in anchors")

    def test_nothing_readable(self, capsys, tiny_dir, tiny_anchor_file, tmp_path):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "x.png").write_bytes(b"no")
        args = stats_args(tiny_dir, tmp_path / "bad", tmp_path / "o", tiny_anchor_file, "--no-progress")
        code, out, err = run_cli(capsys, *args)
        assert_user_error(code, out, err, "none of the 1 images")

    def test_settings_changed(self, capsys, tiny_dir, image_folder, tiny_anchor_file, tmp_path):
        out = tmp_path / "out"
        assert run_cli(capsys, *stats_args(tiny_dir, image_folder, out, tiny_anchor_file, "--no-progress"))[0] == 0
        code, text, err = run_cli(capsys, *stats_args(tiny_dir, image_folder, out, tiny_anchor_file, "-k", "2"))
        assert_user_error(code, text, err, "pass --restart")

    @pytest.mark.parametrize("option", ["--batch-size", "--bootstrap"])
    def test_bad_numbers(self, capsys, tiny_dir, image_folder, tiny_anchor_file, tmp_path, option):
        args = stats_args(tiny_dir, image_folder, tmp_path / "o", tiny_anchor_file, option, 0)
        code, out, err = run_cli(capsys, *args)
        assert_user_error(code, out, err, "must be a positive integer")
