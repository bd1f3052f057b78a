"""The patch-compression benchmark generator: every target verified, independently, to lie in exactly its
recorded patches of the picture the model sees; determinism; the content of each category; bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from embedlens import InputError
from embedlens.bench.patchbench import (
    BENCH_FORMAT,
    CATEGORIES,
    COUNT_RANGE,
    DIGITS,
    QUESTIONS,
    PatchGeometry,
    changed_cells,
    generate_benchmark,
    make_item,
)
from embedlens.bench.patchgeom import processor_adapter
from embedlens.models.base import ModelAdapter
from embedlens.models.tiny import TinySpec, build_tiny_llava
from embedlens.synth.draw import BASIC_SHAPES, COLOUR_NAMES, COLOURS, SHAPE_KINDS
from embedlens.synth.glyphs import LETTERS

PATCH = 14
#: Image size -> items per category. 224 px gets enough items for the content checks.
SIZES = {336: 5, 224: 24}
#: A flat colour painted over target boxes (checked to differ from what the box holds).
FLAT = (3, 250, 7)


def llava(size: int, image_processor: Any = None) -> ModelAdapter:
    """A tiny LLaVA's adapter with ``size`` px pictures (patch 14), over a model on the meta device as
    ``make-patchbench`` builds it; ``image_processor`` replaces its image processor when given."""
    model, processor = build_tiny_llava(TinySpec(image_size=size))
    if image_processor is not None:
        processor.image_processor = image_processor
    return processor_adapter(model.config, processor)


@pytest.fixture(scope="module")
def benches(tmp_path_factory) -> dict[int, dict[str, Any]]:
    """Generated benchmarks by image size: folder, meta, rows and the processor they were made for."""
    made = {}
    for size, per_category in SIZES.items():
        adapter = llava(size)
        out = tmp_path_factory.mktemp(f"bench{size}")
        meta = generate_benchmark(out, adapter, per_category=per_category, progress=False)
        made[size] = {"size": size, "out": out, "meta": meta, "processor": adapter.processor.image_processor}
        made[size]["rows"] = read_jsonl(out / "items.jsonl")
    return made


@pytest.fixture(params=sorted(SIZES, reverse=True), ids=lambda s: f"{s}px")
def bench(request, benches) -> dict[str, Any]:
    """Each generated benchmark in turn (24 x 24 and 16 x 16 grids)."""
    return benches[request.param]


@pytest.fixture
def bench224(benches) -> dict[str, Any]:
    """The 224 px benchmark (16 x 16 grid) with 24 items per category, for the content checks."""
    return benches[224]


@pytest.fixture(scope="module")
def setup() -> tuple[Any, PatchGeometry]:
    """The 224 px adapter (16 x 16 grid) and its geometry."""
    adapter = llava(224)
    return adapter, PatchGeometry.from_adapter(adapter)


@pytest.fixture(scope="module")
def resampling() -> tuple[Any, PatchGeometry]:
    """An adapter whose processor enlarges the drawn 56 px picture 3x (shortest edge 168) before a 56 px
    centre crop."""
    adapter = llava(56, CLIPImageProcessorPil(size={"shortest_edge": 168}, crop_size={"height": 56, "width": 56}))
    return adapter, PatchGeometry.from_adapter(adapter)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Benchmarks at 224 px, 3 items per category: seed 0 twice and seed 1."""
    adapter = llava(224)
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        out[name] = tmp_path_factory.mktemp(f"seed-{name}")
        generate_benchmark(out[name], adapter, per_category=3, seed=seed, progress=False)
    return out


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    """The tiny default LLaVA's adapter: 56 px, a 4 x 4 grid."""
    return llava(56)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def seen_cells(processor: Any, before: np.ndarray, after: np.ndarray, size: int) -> set[int]:
    """Patches whose processed pixel values differ (written independently of ``changed_cells``)."""
    pixels = processor(images=[Image.fromarray(before), Image.fromarray(after)], return_tensors="np")["pixel_values"]
    pixels = np.asarray(pixels)
    assert pixels.shape[-2:] == (size, size)
    differs = np.any(pixels[0] != pixels[1], axis=0)
    grid = size // PATCH
    return {
        row * grid + col
        for row in range(grid)
        for col in range(grid)
        if differs[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH].any()
    }


def repaint(array: np.ndarray, boxes: list[list[int]]) -> np.ndarray:
    """A copy of ``array`` with only the pixels inside ``boxes`` painted :data:`FLAT`."""
    out = array.copy()
    for left, top, right, bottom in boxes:
        region = out[top:bottom, left:right]
        assert (region != FLAT).any(), "the flat colour would change nothing"
        region[...] = FLAT
    return out


def box_cell(box: list[int], grid: int) -> int:
    """The patch holding ``box``, asserting by arithmetic that the box lies inside that patch's pixels."""
    left, top, right, bottom = box
    assert 0 <= left < right and 0 <= top < bottom, box
    col, row = left // PATCH, top // PATCH
    assert (right - 1) // PATCH == col and (bottom - 1) // PATCH == row, f"{box} crosses a patch border"
    assert col * PATCH <= left and right <= (col + 1) * PATCH
    assert row * PATCH <= top and bottom <= (row + 1) * PATCH
    return row * grid + col


class TestPlacement:
    """The benchmark's claim is that each target lives in exactly its recorded visual patches; if that
    were wrong, pruning the target tokens would not remove the target and every conclusion drawn from the
    control split would be void. So each saved image is checked again, here, without the generator's code."""

    def test_every_target_lies_in_exactly_its_patches(self, bench):
        size, processor = bench["size"], bench["processor"]
        grid = size // PATCH
        assert bench["rows"], "no items"
        for row in bench["rows"]:
            image = Image.open(bench["out"] / row["image"])
            assert image.size == (size, size) and image.mode == "RGB"
            array = np.asarray(image.convert("RGB"))
            targets = row["target_patches"]
            assert row["grid"] == [grid, grid]
            assert targets == sorted(set(targets)) and all(0 <= c < grid * grid for c in targets)
            assert len(row["target_boxes"]) == len(targets)
            # arithmetic: each box lies inside one patch, and those patches are the recorded ones
            assert {box_cell(box, grid) for box in row["target_boxes"]} == set(targets)
            # what the model sees: repainting the boxes changes exactly the recorded patches
            changed = seen_cells(processor, array, repaint(array, row["target_boxes"]), size)
            assert changed and changed <= set(targets), (row["id"], changed, targets)
            if len(targets) == 1:
                assert changed == set(targets), row["id"]
            for box in row["target_boxes"]:  # one target at a time: its own patch and nothing else
                alone = seen_cells(processor, array, repaint(array, [box]), size)
                assert alone == {box_cell(box, grid)}, (row["id"], box, alone)

    def test_the_picture_is_the_processor_picture(self, bench):
        """Drawn images are exactly the processor's output size, so the processor does not resample them."""
        size = bench["size"]
        geometry = bench["meta"]["geometry"]
        grid = size // PATCH
        expected = {"width": size, "height": size, "patch": PATCH, "rows": grid, "cols": grid, "views": ["full"]}
        assert geometry == expected


class TestChangedCells:
    """``changed_cells`` is the generator's verification; it must find a change in the right patch and
    report nothing for identical pictures, or unverified items would be written."""

    @pytest.mark.parametrize("offset", [(0, 0), (5, 7), (13, 13)])
    def test_one_pixel_in_a_known_patch(self, setup, offset):
        adapter, geometry = setup
        assert (geometry.rows, geometry.cols) == (16, 16)
        before = Image.new("RGB", (224, 224), (128, 128, 128))
        after = before.copy()
        row, col = 2, 3
        after.putpixel((col * PATCH + offset[0], row * PATCH + offset[1]), (255, 0, 0))
        assert changed_cells(adapter, geometry, before, after) == [row * geometry.cols + col] == [35]

    def test_identical_images(self, setup):
        adapter, geometry = setup
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
        assert changed_cells(adapter, geometry, image, image.copy()) == []

    def test_cell_box_matches_the_grid(self, setup):
        _, geometry = setup
        assert geometry.cells == 256
        assert geometry.cell_box(2 * 16 + 3) == (3 * 14 + 1, 2 * 14 + 1, 4 * 14 - 1, 3 * 14 - 1)
        assert geometry.cell_box(0, margin=0) == (0, 0, 14, 14)


class TestResamplingProcessor:
    """A processor that rescales the picture spreads every drawing over neighbouring patches; the
    generator must then refuse with a clear message instead of writing targets that straddle patches."""

    def test_drawn_pixels_really_spread(self, resampling):
        adapter, geometry = resampling
        assert (geometry.rows, geometry.cols) == (4, 4)
        for cell in range(geometry.cells):
            before = Image.new("RGB", (56, 56), (128, 128, 128))
            after = before.copy()
            after.paste((255, 0, 0), geometry.cell_box(cell))
            assert changed_cells(adapter, geometry, before, after) != [cell]
        # a square filling a central patch's box reaches several patches
        before = Image.new("RGB", (56, 56), (128, 128, 128))
        after = before.copy()
        after.paste((255, 0, 0), geometry.cell_box(5))
        assert len(changed_cells(adapter, geometry, before, after)) > 1

    @pytest.mark.parametrize("category", CATEGORIES)
    def test_make_item_refuses(self, resampling, category):
        adapter, geometry = resampling
        with pytest.raises(InputError, match=r"inside their patches after \d+ tries; does the processor resample"):
            make_item(category, 0, geometry, adapter)

    def test_generate_writes_no_items(self, resampling, tmp_path):
        adapter, _ = resampling
        with pytest.raises(InputError, match="resample"):
            generate_benchmark(tmp_path / "b", adapter, per_category=1, progress=False)
        assert not (tmp_path / "b" / "items.jsonl").exists()

    def test_picture_not_a_whole_number_of_patches(self):
        adapter = llava(56, CLIPImageProcessorPil(size={"shortest_edge": 50}, crop_size={"height": 50, "width": 50}))
        with pytest.raises(InputError, match=r"\(3, 50, 50\) is not a \[3, H, W\] picture cut into 3 x 3 equal cells"):
            PatchGeometry.from_adapter(adapter)


class TestDeterminism:
    """Everything depends only on (seed, category, index), so a benchmark can be regenerated anywhere
    and results compared across models and machines; another seed must give another benchmark."""

    @staticmethod
    def pngs(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}

    def test_same_seed_same_bytes(self, runs):
        for name in ("items.jsonl", "control.jsonl", "meta.json"):
            assert (runs["a"] / name).read_bytes() == (runs["b"] / name).read_bytes(), name
        first = self.pngs(runs["a"])
        assert len(first) == 3 * len(CATEGORIES)
        assert first == self.pngs(runs["b"])

    def test_other_seed_differs(self, runs):
        assert (runs["a"] / "items.jsonl").read_bytes() != (runs["other"] / "items.jsonl").read_bytes()
        first, other = self.pngs(runs["a"]), self.pngs(runs["other"])
        assert first.keys() == other.keys()
        assert sum(first[k] != other[k] for k in first) >= len(first) // 2
        assert json.loads((runs["other"] / "meta.json").read_text())["seed"] == 1

    def test_make_item_alone_matches_the_benchmark(self, runs):
        adapter = llava(224)
        geometry = PatchGeometry.from_adapter(adapter)
        rows = {r["id"]: r for r in read_jsonl(runs["a"] / "items.jsonl")}
        item, image = make_item("count", 2, geometry, adapter, seed=0)
        assert rows["count-00002"]["target_patches"] == item.target_patches
        saved = np.asarray(Image.open(runs["a"] / item.image).convert("RGB"))
        assert np.array_equal(saved, np.asarray(image))


class TestContent:
    """Each category must ask what the picture shows (varied kinds, every colour, true counts, readable
    text, balanced yes/no), or scores measure the generator rather than the model."""

    def by_category(self, rows: list[dict[str, Any]], category: str) -> list[dict[str, Any]]:
        chosen = [r for r in rows if r["category"] == category]
        assert len(chosen) == 24
        return chosen

    def test_object(self, bench224):
        rows = self.by_category(bench224["rows"], "object")
        kinds = {r["extra"]["kind"] for r in rows}
        assert len(kinds) >= 10 and kinds <= set(SHAPE_KINDS)
        open_rows = [r for r in rows if r["type"] == "exact"]
        assert open_rows and all(r["answers"] == [r["extra"]["kind"]] for r in open_rows)
        assert all(r["question"] == QUESTIONS["object"] for r in open_rows)
        assert len({r["answers"][0] for r in open_rows}) >= 10
        self.check_yesno(rows, "kind")

    def test_colour(self, bench224):
        rows = self.by_category(bench224["rows"], "colour")
        assert {r["extra"]["colour"] for r in rows} == set(COLOUR_NAMES) and len(COLOUR_NAMES) == 8
        assert {r["extra"]["kind"] for r in rows} <= set(BASIC_SHAPES)
        open_rows = [r for r in rows if r["type"] == "exact"]
        assert open_rows and all(r["answers"] == [r["extra"]["colour"]] for r in open_rows)
        self.check_yesno(rows, "colour")
        for r in rows:  # the named colour is really drawn: some target pixel within the jitter of it
            left, top, right, bottom = r["target_boxes"][0]
            pixels = np.asarray(Image.open(bench224["out"] / r["image"]).convert("RGB"))[top:bottom, left:right]
            distance = np.abs(pixels.astype(int) - np.array(COLOURS[r["extra"]["colour"]])).max(axis=2)
            assert distance.min() <= 12, r["id"]

    @staticmethod
    def check_yesno(rows: list[dict[str, Any]], key: str) -> None:
        """Yes/no items exist, answer yes or no, and the answer is true of the drawn target."""
        yesno = [r for r in rows if r["type"] == "yesno"]
        assert yesno and len(yesno) < len(rows)
        for r in yesno:
            assert r["answers"] in (["yes"], ["no"]) and r["subtype"] == "yesno"
            template = QUESTIONS["object-yesno" if key == "kind" else "colour-yesno"]
            drawn = template.format(**{key: r["extra"][key]})
            assert r["answers"] == (["yes"] if r["question"] == drawn else ["no"]), r
            if key == "kind":
                assert r["question"] == template.format(kind=r["extra"]["asked"])

    def test_count(self, bench224):
        rows = self.by_category(bench224["rows"], "count")
        counts = set()
        for r in rows:
            cells = r["target_patches"]
            count = int(r["answers"][0])
            counts.add(count)
            assert len(cells) == count == r["extra"]["count"] and r["type"] == "exact"
            positions = [divmod(c, 16) for c in cells]
            for i, (ra, ca) in enumerate(positions):
                for rb, cb in positions[i + 1 :]:
                    assert abs(ra - rb) > 1 or abs(ca - cb) > 1, (r["id"], cells)
        assert counts == set(range(COUNT_RANGE[0], COUNT_RANGE[1] + 1))

    def test_ocr(self, bench224):
        rows = self.by_category(bench224["rows"], "ocr")
        subtypes = {r["subtype"] for r in rows}
        assert subtypes == {"char", "pair"}
        for r in rows:
            (text,) = r["answers"]
            assert text == r["extra"]["text"]
            if r["subtype"] == "char":
                assert len(text) == 1 and text in LETTERS + DIGITS
                assert r["question"] == QUESTIONS["ocr-char"]
            else:
                assert len(text) == 2 and all(ch in LETTERS for ch in text)
                assert r["question"] == QUESTIONS["ocr-pair"]

    def test_control_split(self, bench224):
        rows = bench224["rows"]
        control = read_jsonl(bench224["out"] / "control.jsonl")
        assert len(control) == len(rows)
        for row, ctrl in zip(rows, control, strict=True):
            assert ctrl == {**row, "id": row["id"] + "-control", "prune_target": True}
            assert "prune_target" not in row

    def test_meta(self, bench224):
        meta = bench224["meta"]
        assert json.loads((bench224["out"] / "meta.json").read_text()) == meta
        assert meta["format"] == BENCH_FORMAT and meta["seed"] == 0 and meta["per_category"] == 24
        assert meta["geometry"] == {"width": 224, "height": 224, "patch": 14, "rows": 16, "cols": 16, "views": ["full"]}
        assert meta["categories"] == list(CATEGORIES)
        assert meta["counts"] == dict.fromkeys(CATEGORIES, 24) and meta["items"] == 96
        assert meta["colours"] == {name: list(COLOURS[name]) for name in COLOUR_NAMES}
        ids = [r["id"] for r in bench224["rows"]]
        assert len(set(ids)) == len(ids) == 96
        assert all((bench224["out"] / r["image"]).is_file() for r in bench224["rows"])

    def test_backgrounds_vary(self, bench224):
        kinds = {r["background"] for r in bench224["rows"]}
        assert "plain" in kinds and "photo" in kinds and len(kinds) >= 3

    def test_some_categories_only(self, tmp_path):
        meta = generate_benchmark(tmp_path, llava(56), per_category=2, categories=("ocr",), progress=False)
        rows = read_jsonl(tmp_path / "items.jsonl")
        assert meta["counts"] == {"ocr": 2} and [r["category"] for r in rows] == ["ocr", "ocr"]

    def test_a_category_named_twice_is_made_once(self, tmp_path):
        meta = generate_benchmark(
            tmp_path, llava(56), per_category=1, categories=("count", "ocr", "count"), progress=False
        )
        ids = [r["id"] for r in read_jsonl(tmp_path / "items.jsonl")]
        assert ids == ["count-00000", "ocr-00000"]
        assert meta["categories"] == ["count", "ocr"] and meta["counts"] == {"count": 1, "ocr": 1}


class TestBadInput:
    """Wrong arguments must stop with one clear InputError before anything is written."""

    @pytest.mark.parametrize("categories", [("object", "shoes"), ()])
    def test_unknown_category(self, adapter, tmp_path, categories):
        with pytest.raises(InputError, match="unknown categories"):
            generate_benchmark(tmp_path / "b", adapter, per_category=1, categories=categories)
        assert not (tmp_path / "b").exists()

    def test_make_item_unknown_category(self, adapter):
        geometry = PatchGeometry.from_adapter(adapter)
        with pytest.raises(InputError, match="unknown category 'shoes'"):
            make_item("shoes", 0, geometry, adapter)

    @pytest.mark.parametrize("per_category", [0, -3, True, 1.5])
    def test_per_category(self, adapter, tmp_path, per_category):
        with pytest.raises(InputError, match="positive integer"):
            generate_benchmark(tmp_path / "b", adapter, per_category=per_category)
        assert not (tmp_path / "b").exists()

    def test_out_is_a_file(self, adapter, tmp_path):
        target = tmp_path / "file"
        target.write_text("x")
        with pytest.raises(InputError, match="is a file"):
            generate_benchmark(target, adapter, per_category=1, progress=False)
        assert target.read_text() == "x"
