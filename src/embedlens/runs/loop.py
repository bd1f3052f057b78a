"""Running a run's batches: compute each, commit it, show progress."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from embedlens.runs.directory import RunDir
from embedlens.runs.items import contiguous_batches, shard
from embedlens.runs.ranks import rank, world_size

_B = TypeVar("_B")


@dataclass
class Commit:
    """What one batch commits: ``parts/NAME.json`` with ``records`` (one per item), after the data file
    ``parts/NAME + suffix`` that ``data(tmp)`` writes (if any)."""

    name: str
    records: list[dict[str, Any]]
    data: Callable[[Path], None] | None = None
    suffix: str = ""
    size: int = field(default=0)


def execute(
    run: RunDir,
    batches: Sequence[_B],
    compute: Callable[[_B], Commit],
    *,
    total: int,
    done: int,
    desc: str,
    unit: str = "img",
    progress: bool = True,
    after: Callable[[Commit], None] | None = None,
) -> int:
    """Compute and commit every batch in order; returns how many items ran.

    Args:
        run: The (opened) run directory.
        batches: The batches still to do (this rank's).
        compute: One batch -> its :class:`Commit` (``size``: the items it covers, for progress).
        total / done: Items of this rank's share, and how many of them were done before.
        desc / unit: Progress-bar label (``[rank]`` is added under several processes).
        progress: Show a progress bar (stderr).
        after: Called after each commit (e.g. to count, or to stop a test run).
    """
    several = world_size() > 1
    bar = tqdm(
        total=total,
        initial=done,
        desc=f"{desc}[{rank()}]" if several else desc,
        unit=unit,
        disable=not progress,
        position=rank() if several else None,
    )
    ran = 0
    try:
        for batch in batches:
            commit = compute(batch)
            run.commit(commit.name, commit.records, data=commit.data, suffix=commit.suffix)
            ran += commit.size
            bar.update(commit.size)
            if after is not None:
                after(commit)
    finally:
        bar.close()
    return ran


def run_share(
    run: RunDir,
    items: Sequence[_B],
    compute: Callable[[list[_B]], Commit],
    *,
    batch_size: int,
    pattern: str = "*.json",
    desc: str,
    unit: str = "img",
    progress: bool = True,
    after: Callable[[Commit], None] | None = None,
    split: bool = True,
    keys: Callable[[dict[str, Any]], Iterable[int]] = lambda record: (int(record["index"]),),
) -> int:
    """Do this rank's contiguous share of ``items`` (all of them with ``split`` False; each item has an
    ``index``) in contiguous batches of at most ``batch_size``, skipping the items whose record
    covers them (``keys(record)``, default its ``index``) is committed under ``pattern``; returns how many
    of the share were done before."""
    share = shard(items, rank(), world_size()) if split else list(items)
    done = set(run.claimed(keys, pattern))
    todo = [item for item in share if item.index not in done]  # type: ignore[attr-defined]
    resumed = len(share) - len(todo)
    batches = contiguous_batches(todo, batch_size)
    execute(run, batches, compute, total=len(share), done=resumed, desc=desc, unit=unit, progress=progress, after=after)
    return resumed
