"""Procedural images with captions and question-answer pairs, for training and probing vision-language models.

* :mod:`~embedlens.synth.draw`: shapes and colours drawn with exact pixel bounding boxes.
* :mod:`~embedlens.synth.glyphs`: letters and words in bundled fonts, with exact pixel bounding boxes.
* :mod:`~embedlens.synth.backgrounds`: plain, textured and muted-photo backgrounds.
* :mod:`~embedlens.synth.scenes`: the seeded scene generator (:func:`generate`).
* :mod:`~embedlens.synth.photos`: packaged real photographs with hand-written captions and questions.
* :mod:`~embedlens.synth.qa`: :class:`Sample`, :class:`QA`, answer spaces and answer normalisation.

Example:
    >>> from embedlens.synth import generate
    >>> sample = next(generate(1, seed=0))
    >>> sample.image.size
    (224, 224)
"""

from __future__ import annotations

from embedlens.synth.draw import BASIC_SHAPES, COLOUR_NAMES, COLOURS, SHAPE_KINDS, BBox
from embedlens.synth.glyphs import FONT_NAMES
from embedlens.synth.photos import PHOTOS, available_photos, photo_sample, photo_samples
from embedlens.synth.qa import ANSWER_SPACE, CHANCE, QA, WORDS, Sample, answers_match, normalize_answer
from embedlens.synth.scenes import SCENES, generate, generate_one

__all__ = [
    "ANSWER_SPACE",
    "BASIC_SHAPES",
    "CHANCE",
    "COLOURS",
    "COLOUR_NAMES",
    "FONT_NAMES",
    "PHOTOS",
    "QA",
    "SCENES",
    "SHAPE_KINDS",
    "WORDS",
    "BBox",
    "Sample",
    "answers_match",
    "available_photos",
    "generate",
    "generate_one",
    "normalize_answer",
    "photo_sample",
    "photo_samples",
]
