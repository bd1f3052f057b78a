"""Tests of the procedural image / caption / question generator (embedlens.synth)."""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from embedlens.synth import backgrounds, draw, glyphs, photos
from embedlens.synth.qa import ANSWER_SPACE, CHANCE, answers_match, normalize_answer
from embedlens.synth.scenes import SCENES, generate, generate_one

BG: draw.RGB = (200, 200, 200)


def _changed_box(before: Image.Image, after: Image.Image) -> draw.BBox | None:
    """Tight box of the pixels that differ between two images."""
    diff = np.any(np.asarray(before) != np.asarray(after), axis=2)
    ys, xs = np.nonzero(diff)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _assert_tight(returned: draw.BBox, before: Image.Image, after: Image.Image, tolerance: int = 1) -> None:
    """Every changed pixel lies inside ``returned``, and ``returned`` exceeds them by at most ``tolerance``."""
    changed = _changed_box(before, after)
    assert changed is not None, "nothing was drawn"
    assert returned[0] <= changed[0] and returned[1] <= changed[1], (returned, changed)
    assert returned[2] >= changed[2] and returned[3] >= changed[3], (returned, changed)
    assert max(abs(a - b) for a, b in zip(returned, changed, strict=True)) <= tolerance, (returned, changed)


def _same(a: object, b: object) -> bool:
    return repr(a) == repr(b)


# --------------------------------------------------------------------------- drawing primitives
@pytest.mark.parametrize("kind", draw.SHAPE_KINDS)
@pytest.mark.parametrize("size", [8, 10, 14, 37, 90])
def test_shape_bbox_is_exact(kind: str, size: int) -> None:
    image = Image.new("RGB", (128, 128), BG)
    before = image.copy()
    width = round(size * draw.NATURAL_ASPECT.get(kind, 1.0))
    box = (17, 23, 17 + width, 23 + size)
    returned = draw.draw_shape(image, kind, box, draw.COLOURS["blue"])
    assert box[0] <= returned[0] and box[1] <= returned[1] and returned[2] <= box[2] and returned[3] <= box[3]
    _assert_tight(returned, before, image)


@pytest.mark.parametrize("kind", draw.BASIC_SHAPES)
def test_basic_shapes_fill_their_box(kind: str) -> None:
    image = Image.new("RGB", (64, 64), BG)
    assert draw.draw_shape(image, kind, (5, 6, 45, 46), draw.COLOURS["red"]) == (5, 6, 45, 46)


def test_draw_shape_paints_its_mask_in_the_colour() -> None:
    """``draw_shape`` paints ``shape_mask`` stretched to the box: fully covered pixels take the colour
    exactly, uncovered ones keep the background, nothing outside the box changes, and every kind has
    its own silhouette."""
    colour = (10, 20, 30)
    silhouettes = set()
    for kind in draw.SHAPE_KINDS:
        image = Image.new("RGB", (40, 40), BG)
        draw.draw_shape(image, kind, (3, 4, 33, 34), colour)
        mask = np.asarray(draw.shape_mask(kind, 30, 30))
        pixels = np.asarray(image)
        inside = pixels[4:34, 3:33]
        assert (inside[mask == 255] == colour).all(), kind
        assert (inside[mask == 0] == BG).all(), kind
        outside = pixels.copy()
        outside[4:34, 3:33] = BG
        assert (outside == BG).all(), kind
        silhouettes.add(mask.tobytes())
    assert len(silhouettes) == len(draw.SHAPE_KINDS)


def test_shape_geometry() -> None:
    """Where a kind's geometry is unambiguous, its 40 px mask says so (255 = covered, 0 = not)."""

    def mask(kind: str) -> np.ndarray:
        return np.asarray(draw.shape_mask(kind, 40))

    assert (mask("square") == 255).all()
    circle, ring, diamond, cross = mask("circle"), mask("ring"), mask("diamond"), mask("cross")
    for corner in ((0, 0), (0, 39), (39, 0), (39, 39)):
        assert circle[corner] == ring[corner] == diamond[corner] == cross[corner] == 0, corner
    assert circle[20, 20] == diamond[20, 20] == cross[20, 20] == 255
    assert ring[20, 20] == 0 and ring[20, 2] == 255  # a hole in the middle, a band at the edge
    triangle = mask("triangle")
    assert triangle[0, 0] == triangle[0, 39] == 0 and triangle[39, 1:39].min() == 255  # apex up, base down
    assert draw.shape_mask("car", 51, 30).size == (51, 30)


def test_draw_shape_refuses_unknown_kinds_and_empty_boxes() -> None:
    image = Image.new("RGB", (20, 20), BG)
    with pytest.raises(KeyError, match="unknown shape kind 'blob'"):
        draw.draw_shape(image, "blob", (2, 2, 12, 12), (0, 0, 0))
    with pytest.raises(ValueError, match="at least 1x1"):
        draw.draw_shape(image, "circle", (5, 5, 5, 9), (0, 0, 0))
    assert image.tobytes() == Image.new("RGB", (20, 20), BG).tobytes()


@pytest.mark.parametrize(
    ("text", "font", "height", "font_size"),
    [
        ("A", "sans-bold", 60.0, None),
        ("Q", "serif-italic", 41.0, None),
        ("W", "stix", 10.0, None),
        ("g", "mono", None, 12.0),
        ("cake", "cm-roman", None, 40.0),
        ("HORSE", "sans-bold-oblique", None, 22.0),
        ("7", "mono-bold", 9.0, None),
    ],
)
def test_text_bbox_is_exact(text: str, font: str, height: float | None, font_size: float | None) -> None:
    image = Image.new("RGB", (224, 128), BG)
    before = image.copy()
    returned = glyphs.draw_text(image, text, (11, 9), (20, 30, 200), font=font, height=height, font_size=font_size)
    assert returned[:2] == (11, 9)
    _assert_tight(returned, before, image)
    if height is not None:
        assert abs((returned[3] - returned[1]) - height) <= 1.0


def test_every_font_renders_every_letter() -> None:
    for font in glyphs.FONT_NAMES:
        for letter in glyphs.LETTERS:
            mask = glyphs.text_mask(letter, font, height=20)
            assert mask.getbbox() == (0, 0, *mask.size)
            assert abs(mask.height - 20) <= 1


def test_text_in_box_stays_inside() -> None:
    for text, box in [("K", (4, 4, 18, 18)), ("apple", (10, 20, 110, 50)), ("0", (40, 40, 50, 50))]:
        image = Image.new("RGB", (128, 96), BG)
        before = image.copy()
        returned = glyphs.draw_text_in_box(image, text, box, (200, 30, 30))
        assert box[0] <= returned[0] and box[1] <= returned[1] and returned[2] <= box[2] and returned[3] <= box[3]
        _assert_tight(returned, before, image)


def test_paint_mask_clips_to_image_and_rejects_empty() -> None:
    image = Image.new("RGB", (32, 32), BG)
    returned = draw.paint_mask(image, draw.shape_mask("square", 20), (-5, 20), (0, 0, 0))
    assert returned == (0, 20, 15, 32)
    with pytest.raises(ValueError):
        draw.paint_mask(image, Image.new("L", (5, 5), 0), (0, 0), (0, 0, 0))
    with pytest.raises(ValueError):
        draw.shape_mask("circle", 0)
    with pytest.raises(KeyError):
        draw.shape_mask("blob", 10)


def test_colour_table() -> None:
    assert draw.COLOUR_NAMES == ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown")
    for a, b in itertools.combinations(draw.COLOURS.values(), 2):
        assert math.dist(a, b) > 80
    rng = np.random.default_rng(0)
    for name, anchor in draw.COLOURS.items():
        jittered = draw.jitter_colour(name, rng)
        assert max(abs(x - y) for x, y in zip(jittered, anchor, strict=True)) <= 12


def test_patch_helpers() -> None:
    assert draw.patch_box(2, 3) == (42, 28, 56, 42)
    assert draw.patches_covered((42, 28, 56, 42)) == [(2, 3)]
    assert draw.patches_covered((40, 28, 57, 30)) == [(2, 2), (2, 3), (2, 4)]


# --------------------------------------------------------------------------- backgrounds
@pytest.mark.parametrize("kind", backgrounds.BACKGROUND_KINDS)
def test_backgrounds_have_size_and_stay_neutral(kind: str) -> None:
    background = backgrounds.make_background(kind, 96, np.random.default_rng(1))
    assert background.image.size == (96, 96) and background.image.mode == "RGB"
    assert background.phrase.startswith("a ")
    array = np.asarray(background.image, dtype=np.float64)
    chroma = array.max(axis=2) - array.min(axis=2)
    assert np.median(chroma) < 60  # far from the saturated object colours


def test_photo_background_falls_back_to_textures(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(backgrounds, "available_photos", lambda background=False: [])
    monkeypatch.setattr(backgrounds, "_warned_no_photos", False)
    with caplog.at_level(logging.WARNING, logger="embedlens.synth.backgrounds"):
        first = backgrounds.photo_background(64, np.random.default_rng(0))
        backgrounds.photo_background(64, np.random.default_rng(1))
    assert first.kind in backgrounds.TEXTURES
    assert sum("no packaged photos" in r.message for r in caplog.records) == 1


# --------------------------------------------------------------------------- scenes
def test_same_seed_gives_identical_samples_and_different_seed_differs() -> None:
    a, b, c = (list(generate(12, seed)) for seed in (3, 3, 4))
    for x, y in zip(a, b, strict=True):
        assert x.image.tobytes() == y.image.tobytes()
        assert (x.caption, _same(x.qas, y.qas), _same(x.objects, y.objects)) == (y.caption, True, True)
    assert sum(x.image.tobytes() != z.image.tobytes() for x, z in zip(a, c, strict=True)) >= 11
    assert [x.caption for x in a] != [z.caption for z in c]


def test_any_sample_regenerates_alone() -> None:
    run = list(generate(6, 9, 96))
    for sample in run:
        alone = generate_one(sample.seed, sample.index, 96)
        assert alone.image.tobytes() == sample.image.tobytes() and _same(alone.qas, sample.qas)
    assert next(generate(1, 9, 96, start=4)).image.tobytes() == run[4].image.tobytes()


def test_samples_are_well_formed() -> None:
    for sample in generate(80, 11):
        assert sample.image.size == (224, 224) and sample.image.mode == "RGB"
        assert sample.scene in SCENES and sample.caption.endswith(".") and sample.caption[0].isupper()
        assert sample.qas and sample.objects
        for qa in sample.qas:
            assert qa.answer in ANSWER_SPACE[qa.kind], qa
            assert qa.question.endswith(("?", "."))
            if qa.kind == "letter":
                assert len(qa.answer) == 1 and qa.answer.isupper()
            else:
                assert qa.answer.isalpha() and qa.answer.islower()
        for obj in sample.objects:
            left, top, right, bottom = obj["bbox"]
            assert 0 <= left < right <= 224 and 0 <= top < bottom <= 224
            assert obj["colour"] in draw.COLOURS
        if sample.scene in ("shape", "letter", "word"):
            colour = next(qa.answer for qa in sample.qas if qa.kind == "colour")
            assert colour in sample.caption


def test_object_sizes_scale_and_text_heights() -> None:
    for sample in generate(60, 5, scenes=("shape", "letter")):
        left, top, right, bottom = sample.objects[0]["bbox"]
        if sample.scene == "shape":
            assert 31 <= right - left <= 101
        else:
            assert 39 <= bottom - top <= 101


def test_count_scene_objects_do_not_overlap() -> None:
    for sample in generate(150, 2, scenes=("count",)):
        boxes = [obj["bbox"] for obj in sample.objects]
        answer = sample.qas[0].answer
        assert len(boxes) == ("one", "two", "three").index(answer) + 1
        for a, b in itertools.combinations(boxes, 2):
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_position_answer_matches_geometry() -> None:
    for sample in generate(150, 6, 224, scenes=("shape",), background_weights={"plain": 1}):
        left, top, right, bottom = sample.objects[0]["bbox"]
        dx, dy = (left + right) / 2 - 112, (top + bottom) / 2 - 112
        answer = next(qa.answer for qa in sample.qas if qa.kind == "position")
        expected = {
            "left": dx < -40 and abs(dy) < 20,
            "right": dx > 40 and abs(dy) < 20,
            "top": dy < -40 and abs(dx) < 20,
            "bottom": dy > 40 and abs(dx) < 20,
            "center": abs(dx) < 13 and abs(dy) < 13,
        }
        assert expected[answer], (answer, dx, dy)


@pytest.mark.parametrize("scene", SCENES)
def test_answers_are_balanced(scene: str) -> None:
    n = 2000
    counts: dict[str, Counter[str]] = {}
    for sample in generate(n, 7, 64, scenes=(scene,), background_weights={"plain": 1}):
        for qa in sample.qas:
            counts.setdefault(qa.kind, Counter())[qa.answer] += 1
    for kind, counter in counts.items():
        space = ANSWER_SPACE[kind]
        expected = n / len(space)
        assert set(counter) == set(space), kind
        worst = max(abs(counter[a] - expected) for a in space)
        assert worst <= 4.5 * math.sqrt(expected), (kind, counter)


def test_chance_matches_answer_space() -> None:
    assert CHANCE["colour"] == 1 / 8 and CHANCE["shape"] == 1 / 5 and CHANCE["count"] == 1 / 3
    assert CHANCE["letter"] == 1 / 26 and CHANCE["position"] == 1 / 5 and CHANCE["word"] == 1 / 40
    assert all(len(set(space)) == len(space) for space in ANSWER_SPACE.values())
    assert all(3 <= len(w) <= 5 for w in ANSWER_SPACE["word"])


# --------------------------------------------------------------------------- photos
def test_photo_samples_load_with_captions() -> None:
    samples = photos.photo_samples(96)
    assert samples, "matplotlib's grace_hopper.jpg at least should load"
    assert "grace_hopper" in photos.available_photos()
    for sample in samples:
        assert sample.image.size == (96, 96) and sample.scene == "photo"
        assert len(sample.caption.split()) >= 5 and sample.caption.endswith(".")
        assert sample.qas and all(qa.answer.isalpha() and qa.answer.islower() for qa in sample.qas)
    cropped = photos.photo_sample(photos.available_photos()[0], 64, fit="crop")
    assert cropped.image.size == (64, 64)


def test_photo_fit_square() -> None:
    wide = Image.new("RGB", (200, 100), (10, 200, 30))
    padded = photos.fit_square(wide, 50)
    assert padded.size == (50, 50) and padded.getpixel((25, 25)) == (10, 200, 30)
    with pytest.raises(ValueError):
        photos.fit_square(wide, 50, mode="stretch")


# --------------------------------------------------------------------------- answers
@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Red.", "red"),
        ("  The   circle! ", "circle"),
        ("a star", "star"),
        ("2", "two"),
        ("3 ", "three"),
        ("k", "k"),
        ("K", "k"),
        ("A", "a"),
        ("The letter A.", "letter a"),
        ("an orange", "orange"),
        ("the a", "a"),
        ("Centre", "center"),
        ("gray", "grey"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


def test_answers_match() -> None:
    assert answers_match("Two.", "two") and answers_match("q", "Q") and answers_match("the cat", "cat")
    assert not answers_match("red", "orange") and not answers_match("", "A")
