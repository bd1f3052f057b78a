"""Real photographs that install offline with common packages, with hand-written captions and questions.

Sources (all optional; a photo whose package is missing is simply unavailable):

* scikit-image (``skimage/data``): astronaut, coffee, chelsea, rocket, camera, coins, brick, grass, gravel,
  hubble_deep_field, immunohistochemistry, retina, horse (public domain or CC0, see :data:`PHOTOS`).
* scikit-learn (``sklearn/datasets/images``): china, flower (CC BY 2.0, attribution in :data:`PHOTOS`).
* matplotlib (``mpl-data/sample_data``): grace_hopper (US Navy photo, public domain).

Files are opened straight from the installed package directories (no import of scikit-image or
scikit-learn, which is slow); the package's own loader is the fallback if a file moved.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from embedlens.synth.qa import QA, Sample

logger = logging.getLogger(__name__)

#: Photos larger than this (longest side, px) are downscaled once when loaded.
MAX_SIDE = 768


@dataclass(frozen=True)
class PhotoSource:
    """A packaged photograph and what is true about it.

    Attributes:
        name: Short identifier.
        package: Distribution that ships it (``"scikit-image"``, ``"scikit-learn"``, ``"matplotlib"``).
        module: Importable package holding the file.
        relpath: File path inside that package.
        fallback: ``"module:function"`` loader used when the file is not found (returns an array).
        licence: Licence and attribution.
        caption: One hand-written sentence that stays true for the whole photo.
        qas: Hand-written ``(question, answer)`` pairs; answers are lowercase single words.
        background_ok: Whether the photo may serve as a (muted) background for synthetic objects.
    """

    name: str
    package: str
    module: str
    relpath: str
    fallback: str
    licence: str
    caption: str
    qas: tuple[tuple[str, str], ...]
    background_ok: bool = True


def _skimage(
    name: str, relpath: str, licence: str, caption: str, *qas: tuple[str, str], bg: bool = True
) -> PhotoSource:
    return PhotoSource(name, "scikit-image", "skimage", relpath, f"skimage.data:{name}", licence, caption, qas, bg)


#: Every known photo, whether or not its package is installed here.
PHOTOS: dict[str, PhotoSource] = {
    p.name: p
    for p in (
        _skimage(
            "astronaut",
            "data/astronaut.png",
            "public domain (NASA portrait of Eileen Collins)",
            "A smiling astronaut in an orange spacesuit holding a helmet, with an American flag and a "
            "space shuttle model behind her.",
            ("What is this person's job?", "astronaut"),
            ("What colour is the spacesuit?", "orange"),
            ("What is the person holding?", "helmet"),
            ("Is the person smiling?", "yes"),
        ),
        _skimage(
            "coffee",
            "data/coffee.png",
            "CC0 (photo by Rachel Michetti)",
            "A cup of espresso on a red saucer with a metal spoon, on a wooden table.",
            ("What drink is in the cup?", "coffee"),
            ("What colour is the saucer?", "red"),
            ("What is lying on the saucer?", "spoon"),
            ("What is the table made of?", "wood"),
        ),
        _skimage(
            "chelsea",
            "data/chelsea.png",
            "CC0 (photo by Stefan van der Walt)",
            "A close-up of the face of a tabby cat looking at the camera.",
            ("What animal is this?", "cat"),
            ("How many eyes can you see?", "two"),
            ("Is this a dog?", "no"),
        ),
        _skimage(
            "rocket",
            "data/rocket.jpg",
            "public domain (SpaceX photo)",
            "A white rocket standing on its launch pad at dusk between tall lattice towers, with lights glowing below.",
            ("What vehicle is shown?", "rocket"),
            ("What colour is the rocket?", "white"),
            ("What colour is the sky?", "blue"),
        ),
        _skimage(
            "camera",
            "data/camera.png",
            "CC0 (photo by Lav Varshney)",
            "A black-and-white photo of a man in a dark coat looking through a camera on a tripod in a field.",
            ("What is the man using?", "camera"),
            ("What stands under the camera?", "tripod"),
            ("Is the photo in colour?", "no"),
        ),
        _skimage(
            "coins",
            "data/coins.png",
            "no known copyright restrictions (Brooklyn Museum, Greek coins from Pompeii)",
            "A black-and-white photo of four rows of old coins on a dark background.",
            ("What objects are shown?", "coins"),
            ("How many rows of coins are there?", "four"),
            ("Is the photo in colour?", "no"),
            bg=False,  # the coins look like circles: no background for counting shapes
        ),
        _skimage(
            "brick",
            "data/brick.png",
            "CC0 (CC0Textures, Bricks25)",
            "A black-and-white close-up of a surface of bricks seen at an angle.",
            ("What is the surface made of?", "bricks"),
            ("Is the photo in colour?", "no"),
        ),
        _skimage(
            "grass",
            "data/grass.png",
            "CC0 (texture by linolafett, DeviantArt)",
            "A black-and-white close-up of a patch of grass.",
            ("What plant is shown?", "grass"),
            ("Is the photo in colour?", "no"),
        ),
        _skimage(
            "gravel",
            "data/gravel.png",
            "CC0 (CC0Textures, Gravel04)",
            "A black-and-white close-up of a bed of small gravel stones.",
            ("What is shown?", "gravel"),
            ("Is the photo in colour?", "no"),
        ),
        _skimage(
            "hubble_deep_field",
            "data/hubble_deep_field.jpg",
            "public domain (NASA, Hubble eXtreme Deep Field)",
            "A deep space image with many small distant galaxies on a black sky.",
            ("What colour is the background?", "black"),
            ("What fills the picture?", "galaxies"),
        ),
        _skimage(
            "immunohistochemistry",
            "data/ihc.png",
            "no known copyright restrictions (CMMI)",
            "A microscope image of tissue with brown-stained glands and blue cell nuclei.",
            ("Was this picture taken through a microscope?", "yes"),
            ("What colour are the stained glands?", "brown"),
        ),
        _skimage(
            "retina",
            "data/retina.jpg",
            "CC0 (Mikael Häggström, Wikimedia Commons)",
            "A round photograph of the retina at the back of a human eye, with blood vessels spreading from "
            "a bright spot, on a black background.",
            ("Which body part is shown?", "eye"),
            ("What shape is the photograph of the retina?", "circle"),
            bg=False,  # one big disc: no background for shape questions
        ),
        _skimage(
            "horse",
            "data/horse.png",
            "CC0 (openclipart, Andreas Preuss)",
            "A black silhouette of a horse on a white background.",
            ("What animal is this?", "horse"),
            ("What colour is the horse?", "black"),
            ("What colour is the background?", "white"),
            bg=False,
        ),
        PhotoSource(
            "china",
            "scikit-learn",
            "sklearn",
            "datasets/images/china.jpg",
            "sklearn.datasets:load_sample_image:china.jpg",
            "CC BY 2.0 (danielbuechele, Flickr)",
            "A tall Chinese pagoda with red walls and green and orange roofs above a lake, surrounded by trees.",
            (("What kind of building is this?", "pagoda"), ("Is there water in the picture?", "yes")),
        ),
        PhotoSource(
            "flower",
            "scikit-learn",
            "sklearn",
            "datasets/images/flower.jpg",
            "sklearn.datasets:load_sample_image:flower.jpg",
            "CC BY 2.0 (vultilion, Flickr)",
            "An orange dahlia flower in front of dark green leaves.",
            (("What is this?", "flower"), ("What colour is the flower?", "orange")),
        ),
        PhotoSource(
            "grace_hopper",
            "matplotlib",
            "matplotlib",
            "mpl-data/sample_data/grace_hopper.jpg",
            "",
            "public domain (US Navy portrait of Grace Hopper)",
            "A portrait of Grace Hopper, an elderly woman in a dark navy uniform and cap, wearing glasses, in "
            "front of an American flag.",
            (
                ("Is the woman wearing glasses?", "yes"),
                ("What is on her head?", "cap"),
                ("What is behind her?", "flag"),
            ),
        ),
    )
}


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _call_fallback(fallback: str) -> Image.Image:
    """Run a ``"module:function[:argument]"`` loader and convert its array to an image."""
    module_name, function, *args = fallback.split(":")
    loader: Callable[..., np.ndarray] = getattr(importlib.import_module(module_name), function)
    array = np.asarray(loader(*args))
    if array.dtype == bool:
        array = np.where(array, 0, 255).astype(np.uint8)  # skimage's horse: True = silhouette
    return Image.fromarray(array.astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels become white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@cache
def load_photo(name: str) -> Image.Image | None:
    """Load photo ``name`` as RGB (longest side at most :data:`MAX_SIDE`), or ``None`` if unavailable.

    The result is cached; callers must not modify it (copy first).

    Raises:
        KeyError: ``name`` is not in :data:`PHOTOS`.
    """
    source = PHOTOS[name]
    image: Image.Image | None = None
    root = _package_dir(source.module)
    if root is not None and (root / source.relpath).is_file():
        with Image.open(root / source.relpath) as opened:
            opened.load()
            image = _to_rgb(opened)
    elif root is not None and source.fallback:
        try:
            image = _to_rgb(_call_fallback(source.fallback))
        except Exception as exc:  # any failure of a third-party loader only makes the photo unavailable
            logger.debug("photo %s unavailable: %s", name, exc)
    if image is None:
        return None
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def available_photos(*, background: bool = False) -> list[str]:
    """Names of the photos that load here, in :data:`PHOTOS` order.

    Args:
        background: Only those suitable as backgrounds for synthetic objects.
    """
    return [n for n, s in PHOTOS.items() if (s.background_ok or not background) and load_photo(n) is not None]


def fit_square(image: Image.Image, size: int, mode: str = "pad") -> Image.Image:
    """Resize ``image`` to ``size`` x ``size``.

    Args:
        image: Any RGB image.
        size: Output side in pixels.
        mode: ``"pad"`` keeps the whole picture and pads the short side with the image's mean colour (as
            LLaVA-1.5 does); ``"crop"`` takes the central square.

    Raises:
        ValueError: Unknown mode.
    """
    width, height = image.size
    if mode == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    if mode != "pad":
        raise ValueError(f"mode must be 'pad' or 'crop', got {mode!r}")
    side = max(width, height)
    mean = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0))
    square = Image.new("RGB", (side, side), mean)  # type: ignore[arg-type]
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def photo_sample(name: str, image_size: int = 224, *, fit: str = "pad") -> Sample:
    """The photo ``name`` as a :class:`Sample` with its hand-written caption and questions (kind ``"photo"``).

    Raises:
        KeyError: Unknown photo.
        FileNotFoundError: The photo's package is not installed.
    """
    image = load_photo(name)
    if image is None:
        raise FileNotFoundError(f"photo {name!r} needs the {PHOTOS[name].package} package")
    source = PHOTOS[name]
    square = fit_square(image, image_size, fit)
    width, height = image.size
    if fit == "pad":  # the picture itself, without the padding
        scale = image_size / max(width, height)
        pad_x, pad_y = (image_size - width * scale) / 2, (image_size - height * scale) / 2
        full = (round(pad_x), round(pad_y), image_size - round(pad_x), image_size - round(pad_y))
    else:
        full = (0, 0, image_size, image_size)
    return Sample(
        image=square,
        caption=source.caption,
        qas=[QA(question, answer, "photo") for question, answer in source.qas],
        objects=[{"kind": "photo", "name": name, "colour": None, "bbox": full}],
        background=f"photo:{name}",
        seed=0,
        index=list(PHOTOS).index(name),
        scene="photo",
    )


def photo_samples(image_size: int = 224, *, fit: str = "pad") -> list[Sample]:
    """Every available photo as a :class:`Sample` (see :func:`photo_sample`)."""
    return [photo_sample(name, image_size, fit=fit) for name in available_photos()]
