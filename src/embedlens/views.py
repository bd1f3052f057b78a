"""The views of an image in a probe result: which of the result's tokens each view holds, on which grid.

Some families show the model one image as several pictures, each with its own patch grid: LLaVA-NeXT /
OneVision a ``"base"`` grid and a ``"tiles"`` grid, InternVL ``"tile-0"`` .. ``"tile-<n>"`` and a
``"thumbnail"``; LLaVA-1.5, Qwen and Gemma one ``"full"`` view. A result lists the grid tokens of every
view one after another, in sequence order; :class:`ViewInfo` says where each view's run of tokens starts,
how many there are and on which grid they lie, so each token's ``index`` / ``row`` / ``col`` are read
within its own view. Visual tokens that are not grid cells (CLS, row-end newline slots) and the text
markers around an image are never result rows: their sequence positions are kept here, as metadata.

Results written before views existed carry none of this; they load as one ``"full"`` view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from embedlens.errors import InputError
from embedlens.files import atomic_path

if TYPE_CHECKING:
    from embedlens.models.base import VisualSpan

#: Name of the one view of a single-view family (and of results saved before views existed).
FULL_VIEW = "full"
#: The picture of a result's first view, saved beside it (the name results used before views existed).
VIEW_PNG = "view.png"


@dataclass(frozen=True)
class ViewInfo:
    """One view's share of a result.

    Attributes:
        name: The view's name (``"full"``, ``"base"``, ``"tiles"``, ``"tile-0"``, ``"thumbnail"``, ...).
        grid: ``(rows, cols)`` of the view's patch grid.
        start: Index of the view's first token in the result's token arrays.
        count: Number of the view's grid tokens (``rows * cols`` for a whole grid).
        image: Index of the image within its sample that the view shows.
        extra_positions: Sequence positions of the view's visual tokens that are not grid cells
            (CLS, newline slots); never result rows.
        markers: Sequence positions of the text tokens that open and close the image.
    """

    name: str
    grid: tuple[int, int]
    start: int
    count: int
    image: int = 0
    extra_positions: tuple[int, ...] = ()
    markers: tuple[int, ...] = ()

    @property
    def stop(self) -> int:
        """One past the view's last token in the result's token arrays."""
        return self.start + self.count

    def to_dict(self) -> dict[str, Any]:
        """The JSON object saved in ``result.json``'s ``"views"``."""
        return {
            "name": self.name,
            "grid": [int(self.grid[0]), int(self.grid[1])],
            "start": int(self.start),
            "count": int(self.count),
            "image": int(self.image),
            "extra_positions": [int(p) for p in self.extra_positions],
            "markers": [int(p) for p in self.markers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ViewInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(data["name"]),
            grid=(int(data["grid"][0]), int(data["grid"][1])),
            start=int(data["start"]),
            count=int(data["count"]),
            image=int(data.get("image", 0)),
            extra_positions=tuple(int(p) for p in data.get("extra_positions", ())),
            markers=tuple(int(p) for p in data.get("markers", ())),
        )


def single_view(grid: tuple[int, int], count: int) -> tuple[ViewInfo, ...]:
    """The one ``"full"`` view of ``count`` tokens on ``grid`` (what a result without views means)."""
    return (ViewInfo(FULL_VIEW, (int(grid[0]), int(grid[1])), 0, int(count)),)


def views_from_spans(spans: Sequence[VisualSpan]) -> tuple[ViewInfo, ...]:
    """One :class:`ViewInfo` per span (views in sequence order), their tokens laid end to end."""
    out = []
    start = 0
    for span in spans:
        out.append(
            ViewInfo(
                name=span.view,
                grid=(int(span.grid[0]), int(span.grid[1])),
                start=start,
                count=span.num_tokens,
                image=int(span.image),
                extra_positions=tuple(int(p) for p in span.extra_positions.tolist()),
                markers=tuple(int(p) for p in span.markers.tolist()),
            )
        )
        start += span.num_tokens
    return tuple(out)


def check_views(views: Sequence[ViewInfo], count: int) -> tuple[ViewInfo, ...]:
    """``views`` as a tuple, checked to cover ``count`` tokens in consecutive runs from 0.

    Raises:
        InputError: No views, a run that does not start where the previous one stopped, a negative
            count, or runs that do not add up to ``count``.
    """
    views = tuple(views)
    if not views:
        raise InputError("a result needs at least one view")
    stop = 0
    for view in views:
        if view.start != stop or view.count < 0:
            raise InputError(f"view {view.name!r} starts at token {view.start}, expected {stop}")
        stop = view.stop
    if stop != count:
        raise InputError(f"the views hold {stop} tokens but the result has {count}")
    return views


def is_plain(views: Sequence[ViewInfo], count: int) -> bool:
    """Whether ``views`` is the one plain ``"full"`` view (nothing to record beyond the grid)."""
    return len(views) == 1 and views[0] == ViewInfo(FULL_VIEW, views[0].grid, 0, count)


def view_indices(views: Sequence[ViewInfo]) -> np.ndarray:
    """Each token's view (index into ``views``), int64 array of shape ``[n]``."""
    return np.repeat(np.arange(len(views), dtype=np.int64), [view.count for view in views])


def views_from_json(data: Mapping[str, Any], count: int) -> tuple[ViewInfo, ...]:
    """The views a saved ``result.json`` records, or one ``"full"`` view on its ``"grid"`` (older files)."""
    listed = data.get("views")
    if not listed:
        return single_view((int(data["grid"][0]), int(data["grid"][1])), count)
    return check_views([ViewInfo.from_dict(item) for item in listed], count)


def picture_name(view: int) -> str:
    """File name of view ``view``'s picture: ``view.png`` for the first, ``view-<i>.png`` for the others."""
    return VIEW_PNG if view == 0 else f"view-{view}.png"


def save_pictures(pictures: Sequence[Image.Image | None], directory: str | Path) -> list[Path]:
    """Write each known picture as :func:`picture_name` in ``directory`` (atomically); the paths written."""
    written = []
    for index, picture in enumerate(pictures):
        if picture is None:
            continue
        target = Path(directory) / picture_name(index)
        with atomic_path(target) as tmp:
            picture.save(tmp, format="PNG")
        written.append(target)
    return written


def read_pictures(directory: str | Path, views: int) -> tuple[Image.Image | None, ...]:
    """The saved pictures of ``views`` views (None where a file is missing)."""
    out: list[Image.Image | None] = []
    for index in range(views):
        path = Path(directory) / picture_name(index)
        if path.is_file():
            with Image.open(path) as opened:
                out.append(opened.convert("RGB"))
        else:
            out.append(None)
    return tuple(out)
