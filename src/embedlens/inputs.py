"""One image and one prompt, or lists of them: the calling convention of the user-facing verbs.

``probe``, ``classify``, ``generate`` and ``diagnose`` each take a single image (a path or a PIL image) with
a single prompt string, or a list of images with a list of prompts (or one string for all). A single image
gives a single result; a list gives a list. Questions go in ``prompt`` (placed through the model's chat
template); the model's full text goes in ``raw_prompt`` (used verbatim; it must hold the image placeholder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from embedlens.errors import InputError
from embedlens.images import ImageLike

T = TypeVar("T")
#: A prompt for every image: one string, a list with one per image, or None for the default.
Texts = str | Sequence[str] | None
#: One image, or a list of them.
Images = ImageLike | Sequence[ImageLike]


@dataclass(frozen=True)
class Batch:
    """One-or-many inputs as lists.

    Attributes:
        images: One entry per sample.
        prompts: One question per sample, or None.
        raw_prompts: One full model text per sample, or None.
        single: Whether the caller gave one image (and wants one result back).
    """

    images: list[ImageLike]
    prompts: list[str] | None
    raw_prompts: list[str] | None
    single: bool

    def unwrap(self, results: list[T]) -> T | list[T]:
        """``results[0]`` for a single image, else the list."""
        return results[0] if self.single else results


def one_or_many(images: Images, prompt: Texts = None, raw_prompt: Texts = None) -> Batch:
    """Normalise one image + prompt or lists of them.

    Raises:
        InputError: A list of prompts for a single image.
    """
    single = not isinstance(images, list | tuple)
    listed = [images] if single else list(images)

    def texts(value: Texts, name: str) -> list[str] | None:
        if value is None:
            return None
        if isinstance(value, str):
            return [value] * len(listed)
        if single:
            raise InputError(f"one image takes one {name} (a string), got {type(value).__name__}")
        return list(value)

    return Batch(listed, texts(prompt, "prompt"), texts(raw_prompt, "raw prompt"), single)
