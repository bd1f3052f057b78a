"""Image datasets for the dataset-level commands (``stats``, ``discover-anchors``, ``align``).

A dataset is either

* a **folder**: every image file below it (recursively, hidden files and folders skipped), in sorted
  order of the path relative to the folder; or
* a **JSONL file**: one JSON object per line, ``{"image": PATH, "prompt": TEXT}`` with ``prompt``
  optional and ``PATH`` relative to the JSONL file's folder (or absolute); a line without ``prompt``
  but with a ``question`` (an evaluation JSONL) uses the question. Blank lines are ignored.
  Malformed lines are not fatal: they are skipped and reported with their line numbers.

A folder's sub-folders that hold an EmbedLens run (a ``run.json`` or ``run.lock`` beside its
outputs) are never scanned, and neither are the folders named in ``exclude``: a run whose ``--out``
lies inside the dataset folder does not see its own pictures as new images on the next run.
A JSONL file may start with a UTF-8 byte-order mark.

Items keep their position in that order (``index``) and a stable ``key`` (the relative path for a
folder; ``"line N"`` for JSONL), so that a run can be split across processes and resumed, and still
merge into one result in dataset order. Whether an image can be decoded is only known when it is
opened; the commands skip unreadable images and list them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from embedlens.errors import InputError
from embedlens.runs.items import items_hash, path_label, placeholder_problem, resolved
from embedlens.runs.items import shard as shard_items
from embedlens.runs.lock import LOCK_FILE

#: A folder holding this file is an EmbedLens run's output, not part of a dataset.
RUN_MARKER = "run.json"
#: File suffixes taken as images when a folder is read (lower case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class DatasetItem:
    """One image of a dataset.

    Attributes:
        index: Position in the dataset (0-based).
        key: Stable, unique name: the path relative to the folder, or ``"line N"`` in a JSONL file.
        image: Path of the image file.
        prompt: The question asked with it, or None for the command's default.
    """

    index: int
    key: str
    image: Path
    prompt: str | None = None


@dataclass
class Dataset:
    """The items of a folder or JSONL file, in order, and the lines that could not be used.

    Attributes:
        source: The folder or JSONL file.
        items: The images, ``items[i].index == i``.
        malformed: One message per skipped JSONL line, ``"line N: why"``.
    """

    source: Path
    items: list[DatasetItem]
    malformed: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """The identity of the item list (keys, image paths relative to the dataset, prompts), the same
        however the dataset is addressed (relative, absolute, through a symlink)."""
        return items_hash((item.key, path_label(item.image, self.source), item.prompt) for item in self.items)

    def shard(self, rank: int, world: int) -> list[DatasetItem]:
        """The contiguous share of process ``rank`` out of ``world`` (sizes differ by at most one).

        Contiguous shares keep each process's items in dataset order, so per-process outputs
        concatenated by rank are in dataset order too.
        """
        return shard_items(self.items, rank, world)

    def without_placeholder(self, placeholder: str) -> Dataset:
        """This dataset without the items whose prompt contains the model's image ``placeholder``
        (``prepare`` would refuse their whole batch); each is listed in ``malformed`` with its line,
        the others are numbered again. Returns ``self`` when none does."""
        refused = {item.index: placeholder_problem(item.prompt, placeholder) for item in self.items}
        if not any(refused.values()):
            return self
        kept = [item for item in self.items if refused[item.index] is None]
        problems = [f"{item.key}: {refused[item.index]}" for item in self.items if refused[item.index]]
        malformed = sorted([*self.malformed, *problems], key=_line_number)
        return Dataset(self.source, [replace(item, index=i) for i, item in enumerate(kept)], malformed)


def _line_number(message: str) -> int:
    head = message.split(":", 1)[0]
    return int(head[5:]) if head.startswith("line ") and head[5:].isdigit() else 0


def open_dataset(source: str | Path, *, exclude: Iterable[str | Path] = ()) -> Dataset:
    """Read a dataset folder or JSONL file (see the module docs).

    Args:
        source: The folder or JSONL file.
        exclude: Folders whose images are not part of the dataset (e.g. the run's ``--out``).

    Raises:
        InputError: The source is missing, is neither a folder nor a ``.jsonl`` file, or holds no
            usable image entry.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"dataset not found: {path}")
    if path.is_dir():
        dataset = _read_folder(path, {resolved(folder) for folder in exclude})
    elif path.suffix.lower() in {".jsonl", ".ndjson"}:
        dataset = _read_jsonl(path)
    else:
        raise InputError(f"a dataset is a folder of images or a .jsonl file, got {path}")
    if not dataset.items:
        why = (
            f"; {len(dataset.malformed)} malformed line(s), first: {dataset.malformed[0]}" if dataset.malformed else ""
        )
        raise InputError(f"dataset {path} has no images{why}")
    return dataset


def _read_folder(folder: Path, exclude: set[Path]) -> Dataset:
    found = []
    skipped: dict[Path, bool] = {}

    def left_out(directory: Path) -> bool:
        if directory not in skipped:
            run = (directory / RUN_MARKER).is_file() or (directory / LOCK_FILE).is_file()
            skipped[directory] = (directory != folder and run) or resolved(directory) in exclude
        return skipped[directory]

    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if not (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
            continue
        if any(left_out(folder.joinpath(*relative.parts[:depth])) for depth in range(len(relative.parts))):
            continue
        found.append(relative)
    found.sort(key=lambda p: p.as_posix())
    items = [DatasetItem(i, rel.as_posix(), folder / rel) for i, rel in enumerate(found)]
    return Dataset(source=folder, items=items)


def read_jsonl(file: Path, what: str, problems: list[str]) -> Iterator[tuple[int, Any]]:
    """Each non-blank line of the JSONL ``file`` (UTF-8, a byte-order mark allowed), parsed, as
    ``(line number from 1, value)``. A line that is not valid JSON is not yielded: ``"line N: not valid
    JSON (reason)"`` is appended to ``problems`` instead, at the moment it is reached, so ``problems``
    stays in line order when the caller appends its own lines' problems while iterating.

    Raises:
        InputError: The file cannot be read or is not UTF-8 text (raised here, before iterating;
            ``what`` names the file in the message, e.g. ``"dataset"``).
    """
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"cannot read {what} {file}: not UTF-8 text") from exc
    except OSError as exc:
        raise InputError(f"cannot read {what} {file}: {exc.strerror}") from exc
    return _parsed_lines(lines, problems)


def _parsed_lines(lines: list[str], problems: list[str]) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not valid JSON ({exc.msg})")


def _read_jsonl(file: Path) -> Dataset:
    items: list[DatasetItem] = []
    malformed: list[str] = []
    for number, record in read_jsonl(file, "dataset", malformed):
        try:
            image, prompt = _parse_record(record)
        except ValueError as exc:
            malformed.append(f"line {number}: {exc}")
            continue
        path = Path(image).expanduser()
        items.append(
            DatasetItem(len(items), f"line {number}", path if path.is_absolute() else file.parent / path, prompt)
        )
    return Dataset(source=file, items=items, malformed=malformed)


def _parse_record(record: Any) -> tuple[str, str | None]:
    """``(image, prompt)`` of one parsed JSONL line; ValueError with the reason otherwise."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ValueError('no "image" path')
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError('"prompt" must be a string')
    if prompt is None and isinstance(record.get("question"), str):
        prompt = record["question"]
    return image, prompt


def describe_problems(malformed: Sequence[str], limit: int = 5) -> str:
    """One line summarising malformed entries: the count and the first ``limit`` of them."""
    shown = "; ".join(malformed[:limit])
    more = f"; and {len(malformed) - limit} more" if len(malformed) > limit else ""
    return f"{len(malformed)} malformed line(s) skipped: {shown}{more}"
