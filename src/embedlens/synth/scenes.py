"""Seeded synthetic scenes with captions and balanced question-answer pairs.

Four scene types, drawn with equal probability unless ``scenes`` says otherwise:

* ``"shape"``: one basic shape; questions on its colour, its shape and its position.
* ``"count"``: one to three non-overlapping shapes; question on how many there are.
* ``"letter"``: one large capital letter; questions on the letter and its colour.
* ``"word"``: one short common noun; questions on the word and its colour.

Every answer of a kind is drawn uniformly from :data:`ANSWER_SPACE` and independently of everything else
in the sample, so a model that ignores the image scores :data:`CHANCE`. Sample ``index`` of run ``seed``
depends only on ``(seed, index)``: :func:`generate_one` rebuilds it alone.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from embedlens.synth.backgrounds import Background, colour_distance, plain_background, random_background
from embedlens.synth.draw import BASIC_SHAPES, COLOUR_NAMES, RGB, BBox, draw_shape, jitter_colour, paint_mask
from embedlens.synth.glyphs import FONT_NAMES, LETTERS, text_mask
from embedlens.synth.qa import (
    ANSWER_SPACE,
    CHANCE,
    COUNT_WORDS,
    POSITIONS,
    QA,
    QUESTIONS,
    WORDS,
    Sample,
    answers_match,
    normalize_answer,
)

__all__ = [
    "ANSWER_SPACE",
    "CHANCE",
    "QA",
    "SCENES",
    "Sample",
    "answers_match",
    "generate",
    "generate_one",
    "normalize_answer",
    "sample_rng",
]

logger = logging.getLogger(__name__)

#: Scene types.
SCENES: tuple[str, ...] = ("shape", "count", "letter", "word")
#: Minimum RGB distance between an object's colour and the mean background under it.
MIN_CONTRAST = 90.0
#: Reference image side: object sizes below are given at this size and scale with ``image_size``.
REFERENCE_SIZE = 224

_T = TypeVar("_T")
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
_WHERE = {
    "left": "on the left of",
    "right": "on the right of",
    "top": "at the top of",
    "bottom": "at the bottom of",
    "center": "in the center of",
}


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of sample ``index`` in run ``seed`` (both non-negative).

    Raises:
        ValueError: A negative seed or index.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([seed, index])


def generate(
    n: int,
    seed: int,
    image_size: int = 224,
    *,
    scenes: Sequence[str] = SCENES,
    background_weights: Mapping[str, float] | None = None,
    start: int = 0,
) -> Iterator[Sample]:
    """Yield ``n`` synthetic samples, deterministic in ``seed``.

    Args:
        n: Number of samples.
        seed: Run seed (non-negative).
        image_size: Side of the square images in pixels.
        scenes: Scene types to draw from, uniformly (entries of :data:`SCENES`; repeats weight them).
        background_weights: Relative probability per background kind (see
            :data:`embedlens.synth.backgrounds.DEFAULT_WEIGHTS`).
        start: Index of the first sample, to continue a run or to shard it.

    Yields:
        Samples with indices ``start`` .. ``start + n - 1``.
    """
    for index in range(start, start + n):
        yield generate_one(seed, index, image_size, scenes=scenes, background_weights=background_weights)


def generate_one(
    seed: int,
    index: int,
    image_size: int = 224,
    *,
    scenes: Sequence[str] = SCENES,
    background_weights: Mapping[str, float] | None = None,
) -> Sample:
    """Build sample ``index`` of run ``seed`` on its own (same result as inside :func:`generate`).

    Raises:
        ValueError: Unknown scene type, or an image too small for the scenes (under 64 px).
    """
    unknown = set(scenes) - set(SCENES)
    if unknown or not scenes:
        raise ValueError(f"unknown scene types {sorted(unknown)}; known: {', '.join(SCENES)}")
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64, got {image_size}")
    rng = sample_rng(seed, index)
    scene = _pick(rng, list(scenes))
    builder = {"shape": _shape_scene, "count": _count_scene, "letter": _letter_scene, "word": _word_scene}[scene]
    sample = builder(rng, image_size, background_weights)
    sample.seed, sample.index, sample.scene = seed, index, scene
    return sample


# --------------------------------------------------------------------------- helpers
def _pick(rng: np.random.Generator, options: Sequence[_T]) -> _T:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _ask(rng: np.random.Generator, kind: str, answer: str, obj: str = "") -> QA:
    return QA(_pick(rng, QUESTIONS[kind]).format(obj=obj), answer, kind)


def _background(
    rng: np.random.Generator, size: int, weights: Mapping[str, float] | None, targets: Sequence[tuple[BBox, RGB]]
) -> Background:
    """A random background on which every ``(box, colour)`` target stands out by :data:`MIN_CONTRAST`."""
    for _ in range(30):
        background = random_background(size, rng, weights)
        array = np.asarray(background.image, dtype=np.float64)
        if all(colour_distance(array, box, colour) >= MIN_CONTRAST for box, colour in targets):
            return background
    for _ in range(1000):  # a plain white or black background always works for the object colours
        background = plain_background(size, rng)
        colour = np.asarray(background.image.getpixel((0, 0)), dtype=np.float64)
        if all(np.linalg.norm(colour - np.asarray(c)) >= MIN_CONTRAST for _, c in targets):
            break
    logger.debug("fell back to a plain background for contrast")
    return background


def _centre(rng: np.random.Generator, position: str, side: int, size: int) -> tuple[float, float]:
    """A centre for a ``side`` px object so that it unambiguously sits at ``position``."""
    half, margin, middle = side / 2, size / 112, size / 2
    if position == "center":
        spread = 0.05 * size
        return float(rng.uniform(middle - spread, middle + spread)), float(
            rng.uniform(middle - spread, middle + spread)
        )
    near = float(rng.uniform(half + margin, max(half + margin, 0.3 * size)))  # distance of centre from the edge
    across = float(rng.uniform(middle - 0.08 * size, middle + 0.08 * size))
    if position == "left":
        return near, across
    if position == "right":
        return size - near, across
    if position == "top":
        return across, near
    return across, size - near  # bottom


def _place(rng: np.random.Generator, sides: Sequence[int], size: int, gap: int) -> list[BBox]:
    """Random non-overlapping square boxes (at least ``gap`` px apart) inside the image."""
    margin = max(2, size // 112)
    current = list(sides)
    while True:
        boxes: list[BBox] = []
        for side in current:
            for _ in range(100):
                x, y = (int(v) for v in rng.integers(margin, size - side - margin + 1, size=2))
                box = (x, y, x + side, y + side)
                if all(_apart(box, other, gap) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(current):
            return boxes
        current = [max(8, int(side * 0.85)) for side in current]


def _apart(a: BBox, b: BBox, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _object(kind: str, colour: str, rgb: RGB, bbox: BBox, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "colour": colour, "rgb": rgb, "bbox": bbox, **extra}


# --------------------------------------------------------------------------- scene builders
def _shape_scene(rng: np.random.Generator, size: int, weights: Mapping[str, float] | None) -> Sample:
    scale = size / REFERENCE_SIZE
    kind, colour, position = _pick(rng, BASIC_SHAPES), _pick(rng, COLOUR_NAMES), _pick(rng, POSITIONS)
    side = int(rng.integers(round(32 * scale), round(100 * scale) + 1))
    cx, cy = _centre(rng, position, side, size)
    left, top = round(cx - side / 2), round(cy - side / 2)
    box = (left, top, left + side, top + side)
    rgb = jitter_colour(colour, rng)
    background = _background(rng, size, weights, [(box, rgb)])
    image = background.image
    bbox = draw_shape(image, kind, box, rgb)
    qas = [_ask(rng, "colour", colour, "shape"), _ask(rng, "shape", kind), _ask(rng, "position", position, "shape")]
    caption = f"{_article(colour).capitalize()} {colour} {kind} {_WHERE[position]} {background.phrase}."
    return Sample(image, caption, qas, [_object(kind, colour, rgb, bbox, position=position)], background.kind)


def _count_scene(rng: np.random.Generator, size: int, weights: Mapping[str, float] | None) -> Sample:
    scale = size / REFERENCE_SIZE
    count = int(rng.integers(1, 4))
    same = bool(rng.random() < 0.5)
    first = (_pick(rng, BASIC_SHAPES), _pick(rng, COLOUR_NAMES))
    specs = [first if same else (_pick(rng, BASIC_SHAPES), _pick(rng, COLOUR_NAMES)) for _ in range(count)]
    largest = 110 if count == 1 else 80
    sides = [int(rng.integers(round(30 * scale), round(largest * scale) + 1)) for _ in range(count)]
    boxes = _place(rng, sides, size, gap=max(2, round(6 * scale)))
    rgbs = [jitter_colour(colour, rng) for _, colour in specs]
    background = _background(rng, size, weights, list(zip(boxes, rgbs, strict=True)))
    image = background.image
    objects = [
        _object(kind, colour, rgb, draw_shape(image, kind, box, rgb))
        for (kind, colour), rgb, box in zip(specs, rgbs, boxes, strict=True)
    ]
    groups = Counter((colour, kind) for kind, colour in specs)
    parts = [
        f"{COUNT_WORDS[k - 1] if k > 1 else _article(colour)} {colour} {_PLURAL[kind] if k > 1 else kind}"
        for (colour, kind), k in groups.items()
    ]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    caption = f"{listed[0].upper()}{listed[1:]} on {background.phrase}."
    return Sample(image, caption, [_ask(rng, "count", COUNT_WORDS[count - 1])], objects, background.kind)


def _text_scene(
    rng: np.random.Generator,
    size: int,
    weights: Mapping[str, float] | None,
    text: str,
    font: str,
    colour: str,
    *,
    height: float | None = None,
    font_size: float | None = None,
) -> tuple[Background, dict[str, Any]]:
    """Draw ``text`` at a random place on a contrasting background; return it and the object record."""
    margin = max(2, size // 56)
    mask = text_mask(text, font, height=height, font_size=font_size)
    while mask.width > size - 2 * margin or mask.height > size - 2 * margin:
        if font_size is not None:
            font_size *= 0.9
        else:
            assert height is not None
            height *= 0.9
        mask = text_mask(text, font, height=height, font_size=font_size)
    x = int(rng.integers(margin, size - mask.width - margin + 1))
    y = int(rng.integers(margin, size - mask.height - margin + 1))
    rgb = jitter_colour(colour, rng)
    background = _background(rng, size, weights, [((x, y, x + mask.width, y + mask.height), rgb)])
    bbox = paint_mask(background.image, mask, (x, y), rgb)
    return background, {"colour": colour, "rgb": rgb, "bbox": bbox, "text": text, "font": font}


def _letter_scene(rng: np.random.Generator, size: int, weights: Mapping[str, float] | None) -> Sample:
    scale = size / REFERENCE_SIZE
    letter, colour, font = _pick(rng, LETTERS), _pick(rng, COLOUR_NAMES), _pick(rng, FONT_NAMES)
    height = float(rng.uniform(40, 100)) * scale
    background, record = _text_scene(rng, size, weights, letter, font, colour, height=height)
    qas = [_ask(rng, "letter", letter), _ask(rng, "colour", colour, "letter")]
    caption = f"The letter {letter} in {colour} on {background.phrase}."
    return Sample(background.image, caption, qas, [{"kind": "letter", **record}], background.kind)


def _word_scene(rng: np.random.Generator, size: int, weights: Mapping[str, float] | None) -> Sample:
    scale = size / REFERENCE_SIZE
    word, colour, font = _pick(rng, WORDS), _pick(rng, COLOUR_NAMES), _pick(rng, FONT_NAMES)
    text = _pick(rng, (word, word, word.upper(), word.capitalize()))
    font_size = float(rng.uniform(28, 56)) * scale
    background, record = _text_scene(rng, size, weights, text, font, colour, font_size=font_size)
    qas = [_ask(rng, "word", word), _ask(rng, "colour", colour, _pick(rng, ("word", "text")))]
    caption = f'The word "{text}" written in {colour} on {background.phrase}.'
    return Sample(background.image, caption, qas, [{"kind": "word", **record}], background.kind)
