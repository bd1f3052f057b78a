"""The directory of a resumable run: ``run.json`` (its identity), a lock, and committed parts.

A run (``embedlens stats``, ``eval``, ``align``, each evaluation of ``inject-sweep``) writes its
identity to ``run.json`` once and commits its work batch by batch under ``parts/``: optionally a data
file (Parquet, ``.npz``) first, then a JSON list of per-item records, the commit marker, written
atomically last. A part therefore exists whole or not at all; a data file without its record is
ignored and redone. Running the same command again skips the items that have a record.

Rules:

* The identity holds everything that decides the results **and the layout of the parts** (e.g. the
  batch size), so parts of different layouts are never mixed: a resume with other settings is refused
  in one :class:`~embedlens.errors.InputError` naming the differing keys, unless ``restart``.
* A ``run.json`` without any committed part never blocks a corrected command (a run refused before it
  committed anything has nothing to lose): it is replaced.
* One process owns the directory at a time (:class:`~embedlens.runs.lock.RunLock`).
* Reading parts (:meth:`RunDir.claimed`) keeps one record per item, the first committed in file-name
  order, so duplicates can never reach a merged result.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from embedlens.errors import InputError
from embedlens.files import atomic_path, atomic_write_text
from embedlens.runs.lock import LOCK_FILE, RunLock
from embedlens.runs.ranks import barrier, is_main, join, on_main

_T = TypeVar("_T")

RUN_FILE = "run.json"
PARTS_DIR = "parts"


@dataclass(frozen=True)
class Part:
    """One committed part: its record file and records (the data file, if any, sits beside it)."""

    marker: Path
    records: list[dict[str, Any]]

    def data(self, suffix: str) -> Path:
        """The part's data file with ``suffix`` (``".parquet"``, ``".npz"``)."""
        return self.marker.with_suffix(suffix)


class RunDir:
    """A run's output directory.

    Args:
        out: The directory.
        kind: What the run is called in messages ("stats", "eval", "align").
        outputs: Names of the final files under ``out`` that a restart removes.
    """

    def __init__(self, out: str | Path, kind: str, outputs: Iterable[str] = ()) -> None:
        self.out = Path(out)
        self.kind = kind
        self.outputs = tuple(outputs)
        self.parts = self.out / PARTS_DIR
        self.lock = RunLock(self.out, kind)

    # ----------------------------------------------------------------- setting up
    def check_target(self) -> None:
        """Refuse an ``out`` that is a file (cheap; call before loading anything)."""
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out {self.out} is a file, not a directory")

    def open(self, identity: Mapping[str, Any], *, restart: bool) -> None:
        """Lock the directory and create it for this run, or check that it holds this run (to resume).

        Raises:
            InputError: ``out`` is a file, is in use by a live process, or holds a run with other
                settings (and ``restart`` is False).
        """
        self.check_target()
        self.lock.acquire()
        try:
            self._prepare(dict(identity), restart=restart)
        except BaseException:
            self.lock.release()
            raise

    def _prepare(self, identity: dict[str, Any], *, restart: bool) -> None:
        run_file = self.out / RUN_FILE
        if restart:
            self.clear()
        elif run_file.exists():
            try:
                stored = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                stored = {"unreadable": str(exc)}
            changed = sorted(k for k in set(identity) | set(stored) if stored.get(k) != identity.get(k))
            if changed and self.committed():
                if "unreadable" in stored:
                    raise InputError(f"{run_file} is unreadable ({stored['unreadable']}); pass --restart to start over")
                raise InputError(
                    f"{self.out} holds a {self.kind} run with other settings ({', '.join(changed)}); "
                    "pass --restart to replace it, or choose another --out"
                )
            if changed:
                self.clear()  # nothing committed: nothing to lose, and no stale data file may stay
        elif self.parts.exists():
            raise InputError(f"{self.out} holds {self.kind} parts without {RUN_FILE}; pass --restart to start over")
        self.parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_file, json.dumps(identity, ensure_ascii=False, indent=1))

    def clear(self) -> None:
        """Delete the run's ``run.json``, parts and final outputs (not the lock, not other files)."""
        for name in (PARTS_DIR, RUN_FILE, *self.outputs):
            target = self.out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def require(self) -> None:
        """Refuse to work in a directory that was not set up (no ``run.json``)."""
        if not (self.out / RUN_FILE).is_file():
            raise InputError(f"{self.out} is not set up for a {self.kind} run (no {RUN_FILE})")

    def identity(self) -> dict[str, Any]:
        """The stored ``run.json``."""
        return json.loads((self.out / RUN_FILE).read_text(encoding="utf-8"))

    def close(self) -> None:
        """Release the lock (if this process holds it)."""
        self.lock.release()

    @contextmanager
    def session(self, identity: Mapping[str, Any], *, restart: bool, device: object = None) -> Iterator[RunDir]:
        """Open the run on rank 0 (problems raised on every rank), let all ranks in, and release the
        lock at the end. With one process: :meth:`open` then :meth:`close`.

        ``device``: where the model runs (decides gloo or NCCL when processes join)."""
        join(device)
        try:
            on_main(lambda: self.open(identity, restart=restart))
            barrier()
            yield self
        finally:
            if is_main():
                self.close()

    def finish(self, merge: Callable[[], _T]) -> _T | None:
        """After every rank has committed its parts, ``merge`` on rank 0; its result there, None
        elsewhere (an :class:`InputError` of the merge is raised on every rank)."""
        barrier()
        return on_main(merge)

    # ----------------------------------------------------------------- parts
    def commit(
        self,
        name: str,
        records: Sequence[Mapping[str, Any]],
        *,
        data: Callable[[Path], None] | None = None,
        suffix: str = "",
    ) -> Path:
        """Commit one part: ``data(tmp)`` writes the data file (atomically renamed to ``name + suffix``),
        then the records are written as ``name.json``, the marker that makes the part count."""
        if data is not None:
            with atomic_path(self.parts / f"{name}{suffix}") as tmp:
                data(tmp)
        marker = self.parts / f"{name}.json"
        atomic_write_text(marker, json.dumps(list(records), ensure_ascii=False))
        return marker

    def committed(self, pattern: str = "*.json") -> list[Part]:
        """Every committed part matching ``pattern``, in file-name order (unparsable markers were never
        committed: an interrupted write, ignored)."""
        if not self.parts.is_dir():
            return []
        found = []
        for marker in sorted(self.parts.glob(pattern)):
            try:
                records = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(records, list):
                found.append(Part(marker, records))
        return found

    def claimed(
        self, keys: Callable[[dict[str, Any]], Iterable[Hashable]], pattern: str = "*.json"
    ) -> dict[Hashable, Part]:
        """The part that owns each item: the first that committed it. ``keys(record)``: the items a
        record covers (one for a per-item record, a whole batch for a batch's totals)."""
        owners: dict[Hashable, Part] = {}
        for part in self.committed(pattern):
            for record in part.records:
                for key in keys(record):
                    owners.setdefault(key, part)
        return owners

    def records(self, key: Callable[[dict[str, Any]], Hashable], pattern: str = "*.json") -> dict[Hashable, dict]:
        """One record per item (the first committed), by ``key(record)``."""
        found: dict[Hashable, dict[str, Any]] = {}
        for part in self.committed(pattern):
            for record in part.records:
                found.setdefault(key(record), record)
        return found


def reserved_names() -> tuple[str, ...]:
    """Files a run directory holds besides its outputs (what a dataset scan must never take as data)."""
    return (RUN_FILE, PARTS_DIR, LOCK_FILE)
