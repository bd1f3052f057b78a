"""Backgrounds for synthetic scenes: plain neutral colours, low-contrast textures and muted photo crops.

All backgrounds stay away from the eight object colours of :data:`embedlens.synth.draw.COLOURS`: plain
and textured backgrounds use only greys, whites, blacks and faint tints, and photo crops are desaturated
and lowered in contrast, so "what colour is the shape?" has one clear answer. Photo backgrounds use
whatever :mod:`embedlens.synth.photos` finds installed; without any, photo requests fall back to
textures (logged once).
"""

from __future__ import annotations

import colorsys
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from embedlens.synth.draw import RGB, BBox
from embedlens.synth.photos import available_photos, load_photo

logger = logging.getLogger(__name__)

#: Texture kinds.
TEXTURES: tuple[str, ...] = ("noise", "stripes", "checkerboard", "gradient")
#: Every background kind.
BACKGROUND_KINDS: tuple[str, ...] = ("plain", *TEXTURES, "photo")
#: Default probability of each background kind.
DEFAULT_WEIGHTS: dict[str, float] = {
    "plain": 0.3,
    "noise": 0.1,
    "stripes": 0.1,
    "checkerboard": 0.1,
    "gradient": 0.1,
    "photo": 0.3,
}

#: Largest HSV saturation of a "neutral" background colour.
MAX_TINT = 0.08

_warned_no_photos = False


@dataclass
class Background:
    """A background image and how to mention it in a caption.

    Attributes:
        image: RGB image.
        kind: A :data:`BACKGROUND_KINDS` entry; photos are ``"photo:<name>"``.
        phrase: Noun phrase for captions, e.g. ``"a plain white background"``.
    """

    image: Image.Image
    kind: str
    phrase: str


def neutral_colour(
    rng: np.random.Generator, value: float | None = None, tint: tuple[float, float] | None = None
) -> tuple[RGB, str]:
    """A grey, white, black or faintly tinted colour, with a word for it.

    Args:
        rng: Random generator.
        value: HSV value (brightness) in 0..1; random when ``None``.
        tint: HSV ``(hue, saturation)``; when ``None``, half the colours are pure greys and half get a random
            hue with saturation up to :data:`MAX_TINT`.

    Returns:
        The colour and one of "white", "black", "pale", "light grey", "grey", "dark grey".
    """
    v = float(rng.uniform(0.04, 0.97)) if value is None else float(np.clip(value, 0.0, 1.0))
    if tint is None:
        tint = random_tint(rng)
    h, s = tint
    r, g, b = (round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))
    if v >= 0.88 and s < 0.04:
        name = "white"
    elif v <= 0.15:
        name = "black"
    elif s >= 0.04 and v >= 0.7:
        name = "pale"
    elif v >= 0.62:
        name = "light grey"
    elif v >= 0.35:
        name = "grey"
    else:
        name = "dark grey"
    return (r, g, b), name


def random_tint(rng: np.random.Generator) -> tuple[float, float]:
    """HSV ``(hue, saturation)`` of a neutral colour: pure grey half the time, else a faint random tint."""
    hue = float(rng.random())
    saturation = float(rng.uniform(0.0, MAX_TINT)) if rng.random() < 0.5 else 0.0
    return hue, saturation


def _two_tones(rng: np.random.Generator, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Two neutral colours of one tint whose brightness differs by ``low``..``high`` (HSV value units)."""
    delta = float(rng.uniform(low, high))
    v = float(rng.uniform(0.08, 0.95 - delta))
    tint = random_tint(rng)
    first, _ = neutral_colour(rng, v, tint)
    second, _ = neutral_colour(rng, v + delta, tint)
    pair = [np.array(first, dtype=np.float32), np.array(second, dtype=np.float32)]
    if rng.random() < 0.5:
        pair.reverse()
    return pair[0], pair[1]


def _blend(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> Image.Image:
    """Image mixing colours ``a`` (t = 0) and ``b`` (t = 1) per pixel."""
    out = a[None, None, :] + t[:, :, None] * (b - a)[None, None, :]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def plain_background(size: int, rng: np.random.Generator) -> Background:
    """One neutral colour."""
    colour, name = neutral_colour(rng)
    return Background(Image.new("RGB", (size, size), colour), "plain", f"a plain {name} background")


def noise_background(size: int, rng: np.random.Generator) -> Background:
    """Smooth low-contrast grey noise (blobs of 4-32 px) over a neutral colour, plus faint grain."""
    base, _ = neutral_colour(rng, float(rng.uniform(0.15, 0.85)))
    cell = int(rng.integers(4, 33))
    coarse = rng.normal(0.0, 1.0, size=(max(2, size // cell), max(2, size // cell))).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    amplitude = float(rng.uniform(8, 22))
    grain = rng.normal(0.0, float(rng.uniform(0, 5)), size=(size, size))
    delta = smooth * amplitude + grain
    out = np.asarray(base, dtype=np.float32)[None, None, :] + delta[:, :, None]
    image = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    return Background(image, "noise", "a mottled background")


def stripes_background(size: int, rng: np.random.Generator) -> Background:
    """Anti-aliased stripes of two close neutral tones, any angle, period 8-36 px."""
    a, b = _two_tones(rng, 0.06, 0.2)
    period = float(rng.uniform(8, 36))
    angle = float(rng.uniform(0, np.pi))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) * (2 * np.pi / period) + float(rng.uniform(0, 2 * np.pi))
    t = np.clip(0.5 + np.sin(phase) * period / (2 * np.pi), 0.0, 1.0)  # ~ signed distance in px
    return Background(_blend(t, a, b), "stripes", "a striped background")


def checkerboard_background(size: int, rng: np.random.Generator) -> Background:
    """A checkerboard of two close neutral tones with 8-32 px cells."""
    a, b = _two_tones(rng, 0.05, 0.16)
    cell = int(rng.integers(8, 33))
    ox, oy = (int(v) for v in rng.integers(0, cell, size=2))
    ys, xs = np.mgrid[0:size, 0:size]
    t = (((xs + ox) // cell + (ys + oy) // cell) % 2).astype(np.float32)
    return Background(_blend(t, a, b), "checkerboard", "a checkered background")


def gradient_background(size: int, rng: np.random.Generator) -> Background:
    """A linear gradient between two neutral tones in a random direction."""
    a, b = _two_tones(rng, 0.15, 0.6)
    angle = float(rng.uniform(0, 2 * np.pi))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    proj = xs * np.cos(angle) + ys * np.sin(angle)
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    return Background(_blend(t, a, b), "gradient", "a gradient background")


def mute(image: Image.Image, saturation: float, contrast: float) -> Image.Image:
    """Desaturate (0 = grey, 1 = unchanged) and lower the contrast (around the mean) of an RGB image."""
    array = np.asarray(image, dtype=np.float32)
    grey = array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    array = grey[:, :, None] + saturation * (array - grey[:, :, None])
    array = array.mean(axis=(0, 1), keepdims=True) + contrast * (array - array.mean(axis=(0, 1), keepdims=True))
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


def photo_background(size: int, rng: np.random.Generator, name: str | None = None) -> Background:
    """A random square crop of a packaged photo, flipped at random, desaturated and lowered in contrast.

    Args:
        size: Output side in pixels.
        rng: Random generator.
        name: Photo to use (see :func:`embedlens.synth.photos.available_photos`); random when ``None``.

    Returns:
        The background; a texture instead (logged once) when no photo is available.
    """
    names = available_photos(background=True)
    if name is None:
        if not names:
            _warn_no_photos()
            return random_background(size, rng, weights={k: 1.0 for k in TEXTURES})
        name = names[int(rng.integers(len(names)))]
    photo = load_photo(name)
    if photo is None:
        raise FileNotFoundError(f"photo {name!r} is not available here")
    width, height = photo.size
    side = int(min(width, height) * rng.uniform(0.4, 1.0))
    left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = mute(crop, float(rng.uniform(0.1, 0.35)), float(rng.uniform(0.45, 0.75)))
    return Background(image, f"photo:{name}", "a faded photo")


def _warn_no_photos() -> None:
    global _warned_no_photos
    if not _warned_no_photos:
        logger.warning("no packaged photos found (install scikit-image or scikit-learn); using textures instead")
        _warned_no_photos = True


_MAKERS: dict[str, Callable[[int, np.random.Generator], Background]] = {
    "plain": plain_background,
    "noise": noise_background,
    "stripes": stripes_background,
    "checkerboard": checkerboard_background,
    "gradient": gradient_background,
    "photo": photo_background,
}


def make_background(kind: str, size: int, rng: np.random.Generator) -> Background:
    """Background of the given kind (a :data:`BACKGROUND_KINDS` entry).

    Raises:
        KeyError: Unknown kind.
    """
    if kind not in _MAKERS:
        raise KeyError(f"unknown background kind {kind!r}; known: {', '.join(BACKGROUND_KINDS)}")
    return _MAKERS[kind](size, rng)


def random_background(size: int, rng: np.random.Generator, weights: Mapping[str, float] | None = None) -> Background:
    """Background of a random kind.

    Args:
        size: Output side in pixels.
        rng: Random generator.
        weights: Relative probability per kind; :data:`DEFAULT_WEIGHTS` when ``None``.
    """
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    kinds = [k for k, w in weights.items() if w > 0]
    probs = np.array([weights[k] for k in kinds], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))]
    return make_background(kind, size, rng)


def colour_distance(array: np.ndarray, box: BBox, colour: RGB) -> float:
    """Euclidean RGB distance between ``colour`` and the mean of ``array`` (H x W x 3) inside ``box``."""
    left, top, right, bottom = box
    region = array[max(top, 0) : bottom, max(left, 0) : right].reshape(-1, 3)
    return float(np.linalg.norm(region.mean(axis=0) - np.asarray(colour, dtype=np.float64)))
