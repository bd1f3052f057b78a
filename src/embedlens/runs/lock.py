"""One owner per run directory: a lock file that names the owning process (pid and host).

A run directory is written by one process at a time; a second ``embedlens stats`` (or ``eval``,
``align``) into the same ``--out`` would otherwise commit the same items twice. The lock is a small
JSON file ``run.lock`` created atomically (a hard link of a finished temporary file, which fails if
the lock exists). A lock left by a process that died (same host, pid no longer alive) is stale and is
taken over; a live owner, or an owner on another host (whose pid cannot be checked from here), is
reported in one line. Under several processes only rank 0 holds the lock (see
:mod:`embedlens.runs.ranks`); the other ranks wait for rank 0 to set the run up and write only their
own parts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from embedlens.errors import InputError
from embedlens.files import temporary_sibling

LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) else None


class RunLock:
    """The lock of one run directory, held by this process between :meth:`acquire` and :meth:`release`.

    Args:
        directory: The run directory (created if missing).
        kind: What the run is called in messages ("stats", "eval").
    """

    def __init__(self, directory: Path, kind: str = "run") -> None:
        self.path = Path(directory) / LOCK_FILE
        self.kind = kind
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one.

        Raises:
            InputError: A live process (or a process on another host) holds it.
        """
        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = temporary_sibling(self.path)
        try:
            mine.write_text(json.dumps(self.owner), encoding="utf-8")
            for _ in range(8):
                try:
                    os.link(mine, self.path)  # atomic, and fails if a lock exists
                except FileExistsError:
                    self._take_over_if_stale()
                    continue
                self.held = True
                return
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mine)
        raise InputError(f"{self.path.parent} is locked by another {self.kind} run that keeps changing; try again")

    def _take_over_if_stale(self) -> None:
        owner = _read_owner(self.path)
        if owner is None:
            if not self.path.exists():
                return  # released meanwhile: try again
            # a lock is written whole before it is linked into place, so an unreadable one is damaged
            owner = {"pid": -1, "host": self.owner["host"]}
        pid, host = int(owner.get("pid", -1)), str(owner.get("host", "?"))
        if host != self.owner["host"] or _alive(pid):
            raise InputError(
                f"{self.path.parent} is in use by pid {pid} on {host} (another {self.kind} run); "
                f"wait for it to finish, or remove {self.path} if that process is gone"
            )
        # stale: move it aside under a name only this process uses; if what was moved is not the
        # stale lock judged above (another process took it over meanwhile), put it back
        grave = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.stale")
        try:
            os.replace(self.path, grave)
        except FileNotFoundError:
            return
        moved = _read_owner(grave)
        if moved is not None and (int(moved.get("pid", -1)), str(moved.get("host", "?"))) != (pid, host):
            with contextlib.suppress(FileExistsError):
                os.link(grave, self.path)
        grave.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if not self.held:
            return
        self.held = False
        owner = _read_owner(self.path)
        if owner is not None and owner.get("pid") == self.owner["pid"] and owner.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
