"""``embedlens classify``: its JSON contract, its files, its summary, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from embedlens.taxonomy import GROUPS, LLAVA15_7B_ANCHORS, Anchors, ClassifiedResult
from helpers import assert_user_error, run_cli

TOP_LEVEL_KEYS = {"model", "image", "layer", "lens", "grid", "tokens", "counts", "overlaps", "rule"}
TOKEN_KEYS = {"index", "row", "col", "position", "norm", "top_ids", "top_tokens", "top_sims", "group", "anchor_id"}


def args(tiny_dir: Path, image: Path, *extra: object) -> list[object]:
    return ["classify", image, "--model", tiny_dir, "--device", "cpu", *extra]


def rule_groups(top_ids: list[list[int]], anchors: Anchors, k: int) -> list[str]:
    """The rule, written out independently."""
    out = []
    for ids in top_ids:
        hit = [name for name in GROUPS if set(ids[:k]) & set(anchors.groups[name])]
        out.append(hit[0] if hit else "alive")
    return out


class TestJson:
    """Scripts read ``--json``: one object, the probe's schema plus a group on every token and counts."""

    @pytest.mark.parametrize("k", [None, 5])
    def test_schema(self, capsys, tiny, tiny_dir, image_path, tiny_anchor_file, k):
        extra = ["--json", "--anchors", tiny_anchor_file] + ([] if k is None else ["--top-k", k])
        code, out, err = run_cli(capsys, *args(tiny_dir, image_path, *extra))
        assert code == 0, err
        assert err == ""
        assert out.endswith("\n") and out.count("\n") == 1
        data = json.loads(out)
        assert set(data) == TOP_LEVEL_KEYS
        rows, cols = data["grid"]
        assert len(data["tokens"]) == rows * cols == 16
        expected_k = 3 if k is None else k
        anchors = Anchors.load(tiny_anchor_file)
        for token in data["tokens"]:
            assert set(token) == TOKEN_KEYS
            assert len(token["top_ids"]) == expected_k
            assert token["group"] in (*GROUPS, "alive")
        groups = [t["group"] for t in data["tokens"]]
        assert groups == rule_groups([t["top_ids"] for t in data["tokens"]], anchors, expected_k)
        assert set(data["counts"]) == {*GROUPS, "alive"}
        assert sum(data["counts"].values()) == 16
        assert data["counts"] == {g: groups.count(g) for g in data["counts"]}
        assert data["counts"]["vit_sink"] >= 1 and data["counts"]["llm_sink"] + data["counts"]["vit_sink"] >= 2
        assert set(data["overlaps"]) == {"vit_sink+llm_sink", "vit_sink+dead", "llm_sink+dead"}
        assert data["rule"]["top_k"] == expected_k
        # the same numbers as the Python API
        api = tiny.classify(image_path, anchors=anchors, top_k=k)
        assert groups == api.group.tolist()

    def test_out_directory(self, capsys, tiny_dir, image_path, tiny_anchor_file, tmp_path):
        out_dir = tmp_path / "run"
        code, out, err = run_cli(capsys, *args(tiny_dir, image_path, "--anchors", tiny_anchor_file, "--out", out_dir))
        assert code == 0, err
        assert sorted(p.name for p in out_dir.iterdir()) == ["groups.png", "result.json", "tokens.parquet"]
        with Image.open(out_dir / "groups.png") as picture:
            assert picture.format == "PNG" and picture.width >= 4 * 32
        frame = pd.read_parquet(out_dir / "tokens.parquet")
        assert {"group", "anchor_id", "is_vit_sink", "is_llm_sink", "is_dead"} <= set(frame.columns)
        saved = json.loads((out_dir / "result.json").read_text(encoding="utf-8"))
        assert [t["group"] for t in saved["tokens"]] == frame["group"].tolist()
        assert "provenance" in saved and saved["anchors"]["model"] == "tiny"
        assert ClassifiedResult.load(out_dir).group.tolist() == frame["group"].tolist()
        assert f"wrote {out_dir / 'result.json'}" in out and f"wrote {out_dir / 'groups.png'}" in out


class TestSummary:
    """Without ``--json`` a person reads counts, shares, overlaps and a map of the patch grid."""

    def test_text(self, capsys, tiny_dir, image_path, tiny_anchor_file):
        code, out, err = run_cli(capsys, *args(tiny_dir, image_path, "--anchors", tiny_anchor_file))
        assert code == 0, err
        assert err == ""
        for fragment in ("top-3 nearest input-embedding ids", "vit_sink", "alive", "overlaps", "map (S = ViT sink"):
            assert fragment in out
        lines = out.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("map ("))
        grid = [line.split() for line in lines[start + 1 : start + 5]]
        assert all(len(row) == 4 and set(row) <= set("SLD.") for row in grid)
        assert sum(cell != "." for row in grid for cell in row) >= 2


class TestErrors:
    """Bad anchors end with one line and exit code 2; cheap checks come before the model is loaded."""

    def test_no_builtin_anchors(self, capsys, tiny_dir, image_path):
        code, out, err = run_cli(capsys, *args(tiny_dir, image_path))
        assert_user_error(
            code,
            out,
            err,
            (
                f"no built-in anchors for model {tiny_dir} (built in: LLaVA-1.5-7B and embedlens-mini only); find its "
                f"anchors with `embedlens discover-anchors --model {tiny_dir} IMAGES --out anchors.json`"
            ),
        )

    def test_missing_file(self, capsys, tiny_dir, image_path, tmp_path):
        code, out, err = run_cli(capsys, *args(tiny_dir, image_path, "--anchors", tmp_path / "nope.json"))
        assert_user_error(code, out, err, "nope.json not found")

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [("{not json", "is not valid JSON"), ('{"groups": {"dead": [1]}}', "anchors lack"), ("[1, 2]", "JSON object")],
    )
    def test_malformed_file(self, capsys, tiny_dir, image_path, tmp_path, text, fragment):
        path = tmp_path / "anchors.json"
        path.write_text(text, encoding="utf-8")
        code, out, err = run_cli(capsys, *args(tiny_dir, image_path, "--anchors", path))
        assert_user_error(code, out, err, fragment)

    def test_other_vocabulary(self, capsys, tiny_dir, image_path, tmp_path):
        path = LLAVA15_7B_ANCHORS.save(tmp_path / "llava.json")
        code, out, err = run_cli(capsys, *args(tiny_dir, image_path, "--anchors", path, "--json"))
        assert_user_error(code, out, err, "anchors were made for vocabulary fe56f82c (model llava-hf/llava-1.5-7b-hf)")

    @pytest.mark.parametrize("k", [0, -2])
    def test_bad_top_k(self, capsys, tiny_dir, image_path, tiny_anchor_file, k):
        code, out, err = run_cli(capsys, *args(tiny_dir, image_path, "--anchors", tiny_anchor_file, "--top-k", k))
        assert_user_error(code, out, err, "--top-k must be a positive integer")

    def test_out_is_a_file(self, capsys, tiny_dir, image_path, tiny_anchor_file, tmp_path):
        target = tmp_path / "file"
        target.write_text("x", encoding="utf-8")
        code, out, err = run_cli(capsys, *args(tiny_dir, image_path, "--anchors", tiny_anchor_file, "--out", target))
        assert_user_error(code, out, err, "is a file")
        assert target.read_text(encoding="utf-8") == "x"
