"""Samples, question-answer pairs, answer spaces and exact-match answer normalisation."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from embedlens.synth.draw import BASIC_SHAPES, COLOUR_NAMES
from embedlens.synth.glyphs import LETTERS

#: Words of the OCR scenes: common concrete nouns of 3-5 letters. None is a colour, a shape or an object
#: kind of :mod:`embedlens.synth.draw`, so an OCR answer never doubles as another kind's answer, and each is
#: one token of the GPT-2-style SmolLM2 vocabulary both with and without a leading space.
WORDS: tuple[str, ...] = (
    "cat", "dog", "cup", "hat", "box", "pen", "key", "map", "bed", "egg",
    "bus", "fish", "bird", "book", "door", "ball", "milk", "bell", "ship", "boat",
    "leaf", "flag", "bear", "lion", "hill", "coat", "lake", "wall", "sock", "hand",
    "rain", "apple", "chair", "table", "bread", "clock", "horse", "mouse", "train", "water",
)  # fmt: skip

#: Count answers, as words.
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
#: Position answers. "center" (not "centre") because that spelling is one token in GPT-2-style vocabularies.
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

#: Every answer a synthetic question of each kind can have; each kind's answers are equally likely.
ANSWER_SPACE: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "shape": BASIC_SHAPES,
    "position": POSITIONS,
    "count": COUNT_WORDS,
    "letter": LETTERS,
    "word": WORDS,
}
#: Accuracy of a model that ignores the image and guesses uniformly (or always answers one thing).
CHANCE: dict[str, float] = {kind: 1.0 / len(space) for kind, space in ANSWER_SPACE.items()}

#: Question paraphrases per kind; ``{obj}`` is the object noun ("shape", "letter", "word", "text").
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour is the {obj}?",
        "What is the colour of the {obj}?",
        "Which colour is the {obj}?",
        "What color is the {obj}?",
        "In what colour is the {obj} drawn?",
    ),
    "shape": (
        "What shape is this?",
        "What shape is shown?",
        "Which shape is in the image?",
        "What is the shape in the picture?",
        "Name the shape.",
    ),
    "position": (
        "Where is the {obj}?",
        "Where is the {obj} in the image?",
        "In which part of the picture is the {obj}?",
        "Where is the {obj} located?",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes are in the image?",
        "How many shapes can you see?",
        "Count the shapes.",
        "How many objects are shown?",
    ),
    "letter": (
        "What letter is shown?",
        "Which letter is this?",
        "What letter is written in the image?",
        "Read the letter.",
    ),
    "word": (
        "What word is written?",
        "What does the text say?",
        "Which word is shown?",
        "Read the word in the image.",
    ),
}


@dataclass
class QA:
    """One question with its short ground-truth answer.

    Attributes:
        question: The question text.
        answer: Lowercase single word, or an uppercase single character for letters.
        kind: Answer kind: a key of :data:`ANSWER_SPACE`, or ``"photo"`` for hand-written photo questions.
    """

    question: str
    answer: str
    kind: str


@dataclass
class Sample:
    """One image with its caption, questions and ground truth.

    Attributes:
        image: RGB image.
        caption: One sentence describing the image.
        qas: Questions about the image.
        objects: One dict per drawn object: ``kind`` (shape kind, ``"letter"``, ``"word"`` or ``"photo"``),
            ``colour`` (colour name or ``None``), ``bbox`` (exact pixel box, right/bottom exclusive) and,
            for text, ``text`` and ``font``.
        background: Background kind (``"plain"``, ``"noise"``, ``"stripes"``, ``"checkerboard"``,
            ``"gradient"``, or ``"photo:<name>"``).
        seed: Seed of the run that produced the sample.
        index: Position in that run; ``(seed, index)`` regenerates the sample alone.
        scene: Scene type (``"shape"``, ``"count"``, ``"letter"``, ``"word"`` or ``"photo"``).
    """

    image: Image.Image
    caption: str
    qas: list[QA]
    objects: list[dict[str, Any]] = field(default_factory=list)
    background: str = "plain"
    seed: int = 0
    index: int = 0
    scene: str = ""


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_ARTICLES = {"a", "an", "the"}
_SPELLINGS = {"centre": "center", "color": "colour", "gray": "grey"}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Normalise a model answer or a ground-truth answer for exact-match scoring.

    Lowercases (so letters compare case-insensitively), replaces punctuation by spaces, drops leading
    articles "a", "an", "the" (never the last word, which may be the letter "A"), maps digit numbers
    0-10 to words ("2" -> "two"), unifies a few spellings ("centre" -> "center", "color" -> "colour",
    "gray" -> "grey") and collapses whitespace.

    Args:
        text: Raw answer text.

    Returns:
        The normalised answer; ``""`` when nothing is left.
    """
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    while len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    out = []
    for word in words:
        if word.isdigit() and int(word) < len(_DIGIT_WORDS):
            word = _DIGIT_WORDS[int(word)]
        out.append(_SPELLINGS.get(word, word))
    return " ".join(out)


def answers_match(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer` on both sides."""
    return normalize_answer(prediction) == normalize_answer(answer)
