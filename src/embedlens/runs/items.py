"""The items of a run: their identity, their batches, and reading their images.

* :func:`resolved` and :func:`items_hash`: ONE identity for a run's item list. Paths are resolved
  (absolute, symlinks followed) and named relative to the dataset's folder where they lie inside it,
  so ``ds`` and ``/abs/ds`` (or a symlink to it) give the same identity. The hash covers the list as
  the dataset names it, never which images turned out to be readable.
* :func:`contiguous_batches`: batches of consecutive items, optionally only this rank's share.
* :func:`load_readable`: open each item's image; an image that cannot be used (any
  :class:`~embedlens.errors.InputError` from :func:`~embedlens.images.load_image`) is skipped and
  listed with its reason, never fatal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from embedlens.errors import InputError
from embedlens.images import load_image

_I = TypeVar("_I")


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with symlinks followed (missing parts are kept as written)."""
    return Path(path).expanduser().resolve(strict=False)


def path_label(path: str | Path, root: str | Path) -> str:
    """How an item's file enters the identity: relative to ``root`` (a dataset folder, or a JSONL
    file's folder) when inside it, else its resolved absolute path."""
    full, base = resolved(path), resolved(root)
    if base.is_file() or base.suffix.lower() in {".jsonl", ".ndjson"}:
        base = base.parent
    try:
        return full.relative_to(base).as_posix()
    except ValueError:
        return full.as_posix()


def items_hash(rows: Iterable[Sequence[Any]]) -> str:
    """SHA-256 over the JSON of each row (what identifies one item: key, path label, prompt, ...)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(list(row), ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def shard(items: Sequence[_I], rank: int, world: int) -> list[_I]:
    """The contiguous share of process ``rank`` out of ``world`` (sizes differ by at most one)."""
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"process rank {rank} is outside a world of {world}")
    return list(items[len(items) * rank // world : len(items) * (rank + 1) // world])


def contiguous_batches(
    items: Sequence[_I],
    size: int,
    *,
    index: Callable[[_I], int] = lambda item: item.index,  # type: ignore[attr-defined]
    together: Callable[[_I, _I], bool] | None = None,
) -> list[list[_I]]:
    """Batches of at most ``size`` items whose indices are consecutive.

    Committed parts then never interleave, and concatenating them by first index gives dataset order.
    ``together(last, item)`` may forbid more joins (e.g. questions of the control split are never
    batched with plain ones).
    """
    batches: list[list[_I]] = []
    for item in items:
        last = batches[-1] if batches else None
        if (
            last is not None
            and len(last) < size
            and index(last[-1]) + 1 == index(item)
            and (together is None or together(last[-1], item))
        ):
            last.append(item)
        else:
            batches.append([item])
    return batches


def load_readable(
    items: Sequence[_I],
    path: Callable[[_I], str | Path] = lambda item: item.image,  # type: ignore[attr-defined]
) -> tuple[list[tuple[_I, Image.Image]], list[tuple[_I, str]]]:
    """Open the image of each item.

    Returns:
        ``(readable, skipped)``: the items whose image opened, each with its RGB image, and the others,
        each with the reason (the :class:`InputError`'s message).
    """
    readable: list[tuple[_I, Image.Image]] = []
    skipped: list[tuple[_I, str]] = []
    for item in items:
        try:
            readable.append((item, load_image(path(item))))
        except InputError as exc:
            skipped.append((item, str(exc)))
    return readable, skipped


def placeholder_problem(prompt: str | None, placeholder: str) -> str | None:
    """Why ``prompt`` cannot be asked (it contains the model's image placeholder), or None."""
    if prompt and placeholder and placeholder in prompt:
        return f"the prompt contains the image placeholder {placeholder!r} (the image is placed for you)"
    return None


def refuse_placeholder(text: str | None, placeholder: str, option: str) -> None:
    """Raise if a setting (``option``: ``"--prompt"``, ``"--suffix"``) holds the image placeholder."""
    problem = placeholder_problem(text, placeholder)
    if problem is not None:
        raise InputError(f"{option}: {problem}")
