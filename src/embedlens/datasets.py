"""Image datasets for the dataset-level commands (``stats``, ``discover-anchors``, ``align``).

A dataset is either

* a **folder**: every image file below it (recursively, hidden files and folders skipped), in sorted
  order of the path relative to the folder; or
* a **JSONL file**: one JSON object per line, ``{"image": PATH, "prompt": TEXT}`` with ``prompt``
  optional and ``PATH`` relative to the JSONL file's folder (or absolute); a line without ``prompt``
  but with a ``question`` (an evaluation JSONL) uses the question. Blank lines are ignored.
  Malformed lines are not fatal: they are skipped and reported with their line numbers.

Items keep their position in that order (``index``) and a stable ``key`` (the relative path for a
folder; ``"line N"`` for JSONL), so that a run can be split across processes and resumed, and still
merge into one result in dataset order. Whether an image can be decoded is only known when it is
opened; the commands skip unreadable images and list them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embedlens.errors import InputError

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

    def shard(self, rank: int, world: int) -> list[DatasetItem]:
        """The contiguous share of process ``rank`` out of ``world`` (sizes differ by at most one).

        Contiguous shares keep each process's items in dataset order, so per-process outputs
        concatenated by rank are in dataset order too.
        """
        if world < 1 or not 0 <= rank < world:
            raise InputError(f"process rank {rank} is outside a world of {world}")
        start = len(self.items) * rank // world
        stop = len(self.items) * (rank + 1) // world
        return self.items[start:stop]


def open_dataset(source: str | Path) -> Dataset:
    """Read a dataset folder or JSONL file (see the module docs).

    Raises:
        InputError: The source is missing, is neither a folder nor a ``.jsonl`` file, or holds no
            usable image entry.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"dataset not found: {path}")
    if path.is_dir():
        dataset = _read_folder(path)
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


def _read_folder(folder: Path) -> Dataset:
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(relative)
    found.sort(key=lambda p: p.as_posix())
    items = [DatasetItem(i, rel.as_posix(), folder / rel) for i, rel in enumerate(found)]
    return Dataset(source=folder, items=items)


def _read_jsonl(file: Path) -> Dataset:
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"dataset {file} is not UTF-8 text") from exc
    except OSError as exc:
        raise InputError(f"cannot read dataset {file}: {exc.strerror}") from exc
    items: list[DatasetItem] = []
    malformed: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            image, prompt = _parse_line(line)
        except ValueError as exc:
            malformed.append(f"line {number}: {exc}")
            continue
        path = Path(image).expanduser()
        items.append(
            DatasetItem(len(items), f"line {number}", path if path.is_absolute() else file.parent / path, prompt)
        )
    return Dataset(source=file, items=items, malformed=malformed)


def _parse_line(line: str) -> tuple[str, str | None]:
    """``(image, prompt)`` of one JSONL line; ValueError with the reason otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
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
