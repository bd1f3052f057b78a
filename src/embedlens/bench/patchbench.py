"""The patch-compression benchmark: each target inside exactly one visual token's cell of a given model.

The paper shows that a single alive visual token already encodes an object, a colour or a character
(REFERENCE §3). This generator makes that measurable on any model: it reads, through the model's
adapter, which picture the vision tower sees and how its visual tokens cut it into cells
(:class:`~embedlens.bench.patchgeom.PatchGeometry`: one vision patch for LLaVA, a merged block for
Qwen, ...), draws each target inside one cell of that picture, and then *verifies* the placement by
preparing the image with and without the target -- in every view of the image, the only cells whose
processed pixel values change must be the recorded ones. An item that fails the check is redrawn
elsewhere; nothing unverified is written.

Categories (``CATEGORIES``):

* ``object``: one object of 18 drawn kinds ("What object is shown?"; a quarter of the items are
  balanced yes/no questions "Is there a star in the image?");
* ``colour``: one shape in one of 8 colours ("What colour is the shape?"; a quarter yes/no);
* ``count``: one to five shapes, each in its own patch, no two in neighbouring patches;
* ``ocr``: one character (a capital letter or a digit) or a two-letter string.

Backgrounds cycle through plain, textured and photographic (packaged photos). Everything depends only
on ``(seed, category, index)``. Written: ``images/*.png``, ``items.jsonl`` (one row per item: image,
question, answers, type, category, target_patches, ...), ``control.jsonl`` (the same items with
``"prune_target": true``: the evaluation removes the target patches' tokens, so the answer must then
come from somewhere else) and ``meta.json`` (geometry with the grid and the views, seed, counts).
``target_patches`` are cells of the grid, the same cells in every view (as the ``target`` group of a
prune reads them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from embedlens.bench.patchgeom import PatchGeometry, changed_cells, view_changes
from embedlens.errors import InputError
from embedlens.files import atomic_write_text, umask
from embedlens.synth.backgrounds import TEXTURES, colour_distance, make_background
from embedlens.synth.draw import BASIC_SHAPES, COLOUR_NAMES, COLOURS, RGB, SHAPE_KINDS, BBox, draw_shape, jitter_colour
from embedlens.synth.glyphs import LETTERS, draw_text_in_box

if TYPE_CHECKING:
    from embedlens.models.base import ModelAdapter

__all__ = ["PatchGeometry", "changed_cells", "generate_benchmark", "make_item", "view_changes"]

CATEGORIES: tuple[str, ...] = ("object", "colour", "count", "ocr")
BACKGROUNDS: tuple[str, ...] = ("plain", "texture", "photo")
DIGITS: tuple[str, ...] = tuple("0123456789")
COUNT_RANGE = (1, 5)
#: Share of object and colour items asked as yes/no questions (half of them answered "yes").
YESNO_SHARE = 0.25
#: Smallest RGB distance between a target's colour and the background under it.
MIN_CONTRAST = 110.0
BENCH_FORMAT = "embedlens-patchbench"

QUESTIONS: dict[str, str] = {
    "object": "What object is shown in the image?",
    "object-yesno": "Is there a {kind} in the image?",
    "colour": "What colour is the shape in the image?",
    "colour-yesno": "Is the shape in the image {colour}?",
    "count": "How many shapes are in the image?",
    "ocr-char": "What character is written in the image?",
    "ocr-pair": "What letters are written in the image?",
}


@dataclass
class Item:
    """One benchmark question (a row of ``items.jsonl``)."""

    id: str
    image: str
    question: str
    answers: list[str]
    type: str
    category: str
    subtype: str
    target_patches: list[int]
    target_boxes: list[list[int]]
    background: str
    grid: list[int]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Drawn:
    """What an item draws: targets (cell, painter) and the question."""

    targets: list[tuple[int, Callable[[Image.Image, BBox], BBox], RGB]]
    question: str
    answers: list[str]
    type: str
    subtype: str
    extra: dict[str, Any]


def _rng(seed: int, category: str, index: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, CATEGORIES.index(category), index, attempt])


def _background(kind: str, geometry: PatchGeometry, rng: np.random.Generator) -> tuple[Image.Image, str]:
    side = max(geometry.width, geometry.height)
    if kind == "texture":
        kind = str(rng.choice(sorted(TEXTURES)))
    image = make_background(kind, side, rng).image.crop((0, 0, geometry.width, geometry.height))
    return image.convert("RGB"), kind


def _shape(kind: str, colour: RGB) -> Callable[[Image.Image, BBox], BBox]:
    return lambda image, box: draw_shape(image, kind, box, colour)


def _text(text: str, colour: RGB) -> Callable[[Image.Image, BBox], BBox]:
    return lambda image, box: draw_text_in_box(image, text, box, colour)


def _spread_cells(geometry: PatchGeometry, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` cells, no two in neighbouring patches (so each target is counted apart)."""
    for _ in range(200):
        chosen: list[int] = []
        for cell in rng.permutation(geometry.cells).tolist():
            row, col = divmod(cell, geometry.cols)
            if all(abs(row - r) > 1 or abs(col - c) > 1 for r, c in (divmod(x, geometry.cols) for x in chosen)):
                chosen.append(cell)
                if len(chosen) == count:
                    return sorted(chosen)
    raise InputError(f"cannot place {count} targets in separate patches of a {geometry.rows}x{geometry.cols} grid")


def _plan_item(category: str, index: int, geometry: PatchGeometry, rng: np.random.Generator) -> _Drawn:
    """Decide what item ``index`` of ``category`` shows and asks (uniform answers, balanced yes/no)."""
    colour_name = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    colour = jitter_colour(colour_name, rng)
    cell = int(rng.integers(geometry.cells))
    yesno = category in ("object", "colour") and rng.random() < YESNO_SHARE
    if category == "object":
        kind = SHAPE_KINDS[index % len(SHAPE_KINDS)]
        drawn = _shape(kind, colour)
        if yesno:
            truth = bool(rng.random() < 0.5)
            asked = kind if truth else str(rng.choice([k for k in SHAPE_KINDS if k != kind]))
            question, answers = QUESTIONS["object-yesno"].format(kind=asked), ["yes" if truth else "no"]
            return _Drawn([(cell, drawn, colour)], question, answers, "yesno", "yesno", {"kind": kind, "asked": asked})
        return _Drawn([(cell, drawn, colour)], QUESTIONS["object"], [kind], "exact", "open", {"kind": kind})
    if category == "colour":
        colour_name = COLOUR_NAMES[index % len(COLOUR_NAMES)]
        colour = jitter_colour(colour_name, rng)
        kind = BASIC_SHAPES[int(rng.integers(len(BASIC_SHAPES)))]
        drawn = _shape(kind, colour)
        extra = {"colour": colour_name, "kind": kind}
        if yesno:
            truth = bool(rng.random() < 0.5)
            asked = colour_name if truth else str(rng.choice([c for c in COLOUR_NAMES if c != colour_name]))
            question = QUESTIONS["colour-yesno"].format(colour=asked)
            return _Drawn([(cell, drawn, colour)], question, ["yes" if truth else "no"], "yesno", "yesno", extra)
        return _Drawn([(cell, drawn, colour)], QUESTIONS["colour"], [colour_name], "exact", "open", extra)
    if category == "count":
        low, high = COUNT_RANGE
        high = min(high, -(-geometry.rows // 2) * -(-geometry.cols // 2))  # most cells with no two adjacent
        count = low + index % (high - low + 1)
        kind = BASIC_SHAPES[int(rng.integers(len(BASIC_SHAPES)))]
        cells = _spread_cells(geometry, count, rng)
        return _Drawn(
            [(c, _shape(kind, colour), colour) for c in cells],
            QUESTIONS["count"],
            [str(count)],
            "exact",
            "open",
            {"count": count, "kind": kind},
        )
    pair = index % 4 == 3
    if pair:
        text = "".join(rng.choice(list(LETTERS), size=2).tolist())
        return _Drawn(
            [(cell, _text(text, colour), colour)], QUESTIONS["ocr-pair"], [text], "exact", "pair", {"text": text}
        )
    pool = LETTERS + DIGITS
    text = pool[index % len(pool)]
    return _Drawn([(cell, _text(text, colour), colour)], QUESTIONS["ocr-char"], [text], "exact", "char", {"text": text})


def make_item(
    category: str,
    index: int,
    geometry: PatchGeometry,
    adapter: ModelAdapter,
    *,
    seed: int = 0,
    attempts: int = 20,
) -> tuple[Item, Image.Image]:
    """Draw and verify item ``index`` of ``category`` (in every view, exactly the target cells change);
    retried with new placements until verified.

    Raises:
        InputError: No placement passed the check in ``attempts`` tries (the processor resamples the
            picture so that no drawing stays inside one cell).
    """
    if category not in CATEGORIES:
        raise InputError(f"unknown category {category!r}; categories are {', '.join(CATEGORIES)}")
    background_kind = BACKGROUNDS[index % len(BACKGROUNDS)]
    for attempt in range(attempts):
        rng = _rng(seed, category, index, attempt)
        plan = _plan_item(category, index, geometry, rng)
        background, used_kind = _background(background_kind, geometry, rng)
        array = np.asarray(background)
        image = background.copy()
        boxes: list[BBox] = []
        colours_ok = True
        for cell, paint, colour in plan.targets:
            box = geometry.cell_box(cell)
            boxes.append(paint(image, box))
            colours_ok &= colour_distance(array, box, colour) >= MIN_CONTRAST
        cells = sorted(cell for cell, _, _ in plan.targets)
        if not colours_ok or any(seen != cells for seen in view_changes(adapter, geometry, background, image)):
            continue
        item = Item(
            id=f"{category}-{index:05d}",
            image=f"images/{category}-{index:05d}.png",
            question=plan.question,
            answers=plan.answers,
            type=plan.type,
            category=category,
            subtype=plan.subtype,
            target_patches=cells,
            target_boxes=[list(b) for b in boxes],
            background=used_kind,
            grid=[geometry.rows, geometry.cols],
            extra=plan.extra,
        )
        return item, image
    raise InputError(
        f"could not keep the {category} item's targets inside their patches after {attempts} tries; does the processor "
        "resample the picture?"
    )


def _atomic_image(image: Image.Image, path: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as handle:
        image.save(handle, format="PNG")
    os.replace(handle.name, path)


#: What a benchmark directory holds besides ``images/`` (replaced together by ``overwrite``).
BENCH_FILES: tuple[str, ...] = ("items.jsonl", "control.jsonl", "meta.json")


def holds_benchmark(directory: Path) -> bool:
    """Whether ``directory`` already holds (part of) a benchmark: its files or a non-empty ``images/``."""
    images = directory / "images"
    return any((directory / name).exists() for name in BENCH_FILES) or (images.is_dir() and any(images.iterdir()))


def generate_benchmark(
    out: str | Path,
    adapter: ModelAdapter,
    *,
    per_category: int = 200,
    categories: Sequence[str] = CATEGORIES,
    seed: int = 0,
    model: str = "",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the benchmark for a model's processor to ``out``; returns the contents of ``meta.json``.

    The benchmark is built in a temporary sibling directory and published when complete, so an
    interrupted run leaves ``out`` as it was.

    Args:
        out: Output directory (created).
        adapter: The model's adapter (its processor decides picture, views and grid); one from
            :func:`~embedlens.bench.patchgeom.processor_adapter` needs no weights and keeps pixel values
            in float32 (an adapter loaded in a half dtype compares its rounded pixel values).
        per_category: Items per category.
        categories: Which of :data:`CATEGORIES` to make.
        seed: Everything depends only on ``(seed, category, index)``.
        model: Name recorded in ``meta.json``.
        progress: Show a progress bar.
        overwrite: Replace a benchmark ``out`` already holds (its ``images/`` and :data:`BENCH_FILES`;
            other files there are left alone). Without it such an ``out`` is refused.

    Raises:
        InputError: Bad ``per_category`` or ``categories``, ``out`` is a file, ``out`` holds a
            benchmark and ``overwrite`` is off, or the model's views do not share one grid of square
            cells (see :meth:`PatchGeometry.from_adapter`).
    """
    if isinstance(per_category, bool) or not isinstance(per_category, int) or per_category <= 0:
        raise InputError(f"items per category must be a positive integer, got {per_category!r}")
    categories = tuple(dict.fromkeys(categories))  # a category named twice is made once
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise InputError(f"unknown categories {unknown}; choose from {', '.join(CATEGORIES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")
    if not overwrite and out.is_dir() and holds_benchmark(out):
        raise InputError(f"{out} already holds a benchmark; pass --overwrite to replace it")
    geometry = PatchGeometry.from_adapter(adapter)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        meta = _write_benchmark(staging, geometry, adapter, per_category, categories, seed, model, progress)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def _write_benchmark(
    out: Path,
    geometry: PatchGeometry,
    adapter: ModelAdapter,
    per_category: int,
    categories: tuple[str, ...],
    seed: int,
    model: str,
    progress: bool,
) -> dict[str, Any]:
    """Write every image, ``items.jsonl``, ``control.jsonl`` and ``meta.json`` into the empty ``out``."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    items: list[Item] = []
    jobs = [(category, index) for category in categories for index in range(per_category)]
    for category, index in tqdm(jobs, desc="patchbench", unit="item", disable=not progress):
        item, image = make_item(category, index, geometry, adapter, seed=seed)
        _atomic_image(image, out / item.image)
        items.append(item)
    rows = [asdict(item) for item in items]
    atomic_write_text(out / "items.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    control = [{**row, "id": row["id"] + "-control", "prune_target": True} for row in rows]
    atomic_write_text(out / "control.jsonl", "".join(json.dumps(row) + "\n" for row in control))
    meta = {
        "format": BENCH_FORMAT,
        "version": 1,
        "model": model,
        "seed": seed,
        "geometry": {**asdict(geometry), "views": list(geometry.views)},
        "per_category": per_category,
        "categories": list(categories),
        "items": len(items),
        "counts": {c: sum(i.category == c for i in items) for c in categories},
        "colours": {name: list(COLOURS[name]) for name in COLOUR_NAMES},
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
    return meta


def _publish(staging: Path, out: Path) -> None:
    """Move the finished benchmark in ``staging`` to ``out``: one rename when ``out`` is new, else
    the old benchmark's entries are removed (``meta.json`` first) and the new ones moved in."""
    os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes the directory owner-only
    if not out.exists():
        os.replace(staging, out)
        return
    for name in ("meta.json", *BENCH_FILES, "images"):
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    for name in ("images", "items.jsonl", "control.jsonl", "meta.json"):
        os.replace(staging / name, out / name)
