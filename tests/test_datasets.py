"""Reading dataset folders and JSONL files: order, keys, prompts, malformed lines, shards."""

from __future__ import annotations

import json

import pytest

from embedlens import InputError
from embedlens.datasets import open_dataset


def touch(path, content: bytes = b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


class TestFolder:
    def test_sorted_recursive_images_only(self, tmp_path):
        for name in ["b.png", "a.JPG", "sub/c.jpeg", "notes.txt", ".hidden.png", ".cache/d.png", "sub/e.webp"]:
            touch(tmp_path / name)
        dataset = open_dataset(tmp_path)
        assert [item.key for item in dataset.items] == ["a.JPG", "b.png", "sub/c.jpeg", "sub/e.webp"]
        assert [item.index for item in dataset.items] == [0, 1, 2, 3]
        assert dataset.items[2].image == tmp_path / "sub" / "c.jpeg"
        assert all(item.prompt is None for item in dataset.items)
        assert dataset.malformed == []

    def test_empty_folder(self, tmp_path):
        touch(tmp_path / "readme.txt")
        with pytest.raises(InputError, match="has no images"):
            open_dataset(tmp_path)

    def test_missing_and_wrong_kind(self, tmp_path):
        with pytest.raises(InputError, match="dataset not found"):
            open_dataset(tmp_path / "nope")
        with pytest.raises(InputError, match=r"folder of images or a \.jsonl"):
            open_dataset(touch(tmp_path / "list.csv"))


class TestJsonl:
    def test_paths_prompts_and_malformed_lines(self, tmp_path):
        absolute = touch(tmp_path / "elsewhere" / "z.png")
        lines = [
            json.dumps({"image": "imgs/a.png", "prompt": "What is it?"}),
            "",
            json.dumps({"image": str(absolute)}),
            "{not json",
            json.dumps(["imgs/a.png"]),
            json.dumps({"prompt": "no image"}),
            json.dumps({"image": "imgs/b.png", "prompt": 3}),
            json.dumps({"image": "imgs/a.png", "prompt": "Again?"}),
        ]
        source = tmp_path / "data.jsonl"
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
        dataset = open_dataset(source)
        assert [(i.index, i.key, i.prompt) for i in dataset.items] == [
            (0, "line 1", "What is it?"),
            (1, "line 3", None),
            (2, "line 8", "Again?"),
        ]
        assert dataset.items[0].image == tmp_path / "imgs" / "a.png"
        assert dataset.items[1].image == absolute
        assert [m.split(":")[0] for m in dataset.malformed] == ["line 4", "line 5", "line 6", "line 7"]
        assert "not valid JSON" in dataset.malformed[0] and '"prompt" must be a string' in dataset.malformed[3]

    def test_only_malformed_lines(self, tmp_path):
        source = tmp_path / "data.jsonl"
        source.write_text("oops\n\n", encoding="utf-8")
        with pytest.raises(InputError, match=r"has no images; 1 malformed line\(s\), first: line 1"):
            open_dataset(source)

    def test_not_utf8(self, tmp_path):
        source = touch(tmp_path / "data.jsonl", b"\xff\xfe\x00bad")
        with pytest.raises(InputError, match="not UTF-8"):
            open_dataset(source)


class TestReliability:
    """Datasets are written by other tools and sit next to results; none of that may change what a run
    reads."""

    def test_utf8_bom(self, tmp_path):
        touch(tmp_path / "a.png")
        source = tmp_path / "data.jsonl"
        source.write_text("\ufeff" + json.dumps({"image": "a.png"}) + "\n", encoding="utf-8")
        assert [item.key for item in open_dataset(source).items] == ["line 1"]

    def test_run_folders_inside_the_dataset_are_not_scanned(self, tmp_path):
        touch(tmp_path / "a.png")
        touch(tmp_path / "out" / "heatmap.png")
        touch(tmp_path / "out" / "run.json", b"{}")
        touch(tmp_path / "busy" / "x.png")
        touch(tmp_path / "busy" / "run.lock", b"{}")
        touch(tmp_path / "mine" / "y.png")
        touch(tmp_path / "sub" / "b.png")
        dataset = open_dataset(tmp_path, exclude=[tmp_path / "mine"])
        assert [item.key for item in dataset.items] == ["a.png", "sub/b.png"]

    def test_fingerprint_is_the_same_however_addressed(self, tmp_path, monkeypatch):
        touch(tmp_path / "ds" / "a.png")
        (tmp_path / "link").symlink_to(tmp_path / "ds")
        monkeypatch.chdir(tmp_path)
        prints = {open_dataset(p).fingerprint() for p in ("ds", tmp_path / "ds", "link", "./ds/")}
        assert len(prints) == 1
        touch(tmp_path / "ds" / "b.png")
        assert open_dataset("ds").fingerprint() not in prints

    def test_placeholder_rows_listed_with_their_lines(self, tmp_path):
        rows = [
            {"image": "a.png", "prompt": "<image> hi"},
            "bad",
            {"image": "b.png"},
            {"image": "c.png", "prompt": "ok"},
        ]
        source = tmp_path / "d.jsonl"
        source.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows), encoding="utf-8")
        dataset = open_dataset(source).without_placeholder("<image>")
        assert [(i.index, i.key) for i in dataset.items] == [(0, "line 3"), (1, "line 4")]
        assert [m.split(":")[0] for m in dataset.malformed] == ["line 1", "line 2"]
        assert "image placeholder '<image>'" in dataset.malformed[0]
        plain = open_dataset(source)
        assert plain.without_placeholder("<image>").items != plain.items and plain.without_placeholder("<x>") is plain


class TestShard:
    @pytest.mark.parametrize("size", [0, 1, 5, 7])
    @pytest.mark.parametrize("world", [1, 2, 3])
    def test_contiguous_cover(self, tmp_path, size, world):
        for i in range(size):
            touch(tmp_path / f"{i:02d}.png")
        touch(tmp_path / "keep.png")  # never empty
        dataset = open_dataset(tmp_path)
        shares = [dataset.shard(rank, world) for rank in range(world)]
        assert [item for share in shares for item in share] == dataset.items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1

    def test_bad_rank(self, tmp_path):
        touch(tmp_path / "a.png")
        with pytest.raises(InputError, match="rank 2 is outside a world of 2"):
            open_dataset(tmp_path).shard(2, 2)
