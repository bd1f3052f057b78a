"""How EmbedLens writes files: atomically (temporary sibling, then rename), so a reader never sees a
half-written result, plus the sha256 of a file that manifests and downloads are checked with.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

#: Bytes read at a time when hashing or copying.
CHUNK = 1 << 22


def temporary_sibling(target: str | os.PathLike[str]) -> Path:
    """A fresh name for a temporary file beside ``target`` (``.NAME.XXXXXXXXXXXX.tmp``), not yet created.

    Choosing the name before the file exists lets a ``finally`` remove it whatever interrupts the work.
    """
    target = Path(target)
    return target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    A reader never sees a half-written file: either the old content or the complete new one. The
    temporary file is removed on any failure, Ctrl-C included: its name is chosen before it is created,
    so an interruption at any point leaves nothing behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    try:
        # Created exclusively with the usual permissions (0o666 less the umask): results are not secrets.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` through a temporary file and a rename."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
