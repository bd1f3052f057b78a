"""``embedlens discover-anchors``: writes the anchors that the API finds, readable by ``--anchors``."""

from __future__ import annotations

import pytest

from embedlens.taxonomy import Anchors, DiscoveryConfig, discover_anchors
from helpers import assert_user_error, run_cli


def discover_args(tiny_dir, dataset, out, *extra):
    return ["discover-anchors", dataset, "--model", tiny_dir, "--out", out, "--device", "cpu", "--no-progress", *extra]


class TestRun:
    def test_same_as_api_and_usable(self, capsys, tiny, tiny_dir, image_folder, tmp_path):
        out = tmp_path / "anchors.json"
        code, text, err = run_cli(capsys, *discover_args(tiny_dir, image_folder, out, "--min-fraction", 0.25))
        assert code == 0, err
        written = Anchors.load(out)
        images = [image_folder / f"{i}.png" for i in range(4)] + [image_folder / "9.png"]
        expected = discover_anchors(tiny, images, config=DiscoveryConfig(min_image_fraction=0.25), progress=False)
        assert written.groups == expected.anchors.groups
        assert written.evidence["images"] == 4 and written.evidence["skipped_images"] == 1
        assert [c["id"] for c in written.evidence["candidates"]] == [c.id for c in expected.candidates]
        assert "images   4 used, 1 skipped" in text and f"wrote {out}" in text
        assert f"skipped  {image_folder / '9.png'}" in text
        # the file is accepted by classify on the same model
        code, _, err = run_cli(capsys, "classify", images[0], "--model", tiny_dir, "--anchors", out, "--json")
        assert code == 0, err


class TestErrors:
    def test_out_is_a_directory(self, capsys, tiny_dir, image_folder, tmp_path):
        code, out, err = run_cli(capsys, *discover_args(tiny_dir, image_folder, tmp_path))
        assert_user_error(code, out, err, "must be a file path")

    def test_empty_dataset(self, capsys, tiny_dir, tmp_path):
        (tmp_path / "empty").mkdir()
        code, out, err = run_cli(capsys, *discover_args(tiny_dir, tmp_path / "empty", tmp_path / "a.json"))
        assert_user_error(code, out, err, "has no images")

    @pytest.mark.parametrize(("option", "value"), [("--min-fraction", 1.5), ("--top-k", 0), ("--batch-size", 0)])
    def test_bad_numbers(self, capsys, tiny_dir, image_folder, tmp_path, option, value):
        code, out, err = run_cli(capsys, *discover_args(tiny_dir, image_folder, tmp_path / "a.json", option, value))
        assert code == 2 and out == "" and len(err.splitlines()) == 1, err
        assert not (tmp_path / "a.json").exists()
