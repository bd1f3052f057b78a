"""Where EmbedLens keeps what it builds, and how cache entries are published and checked.

The cache location is read from the environment each time it is asked for (never at import), so a
test or a notebook can change ``EMBEDLENS_CACHE`` on the fly. Cache entries are built in a staging
directory beside their final place and swapped in with a rename (:func:`staged_dir`); downloads are
copied the same way and published only when their sha256 matches (:func:`copy_verified`). Every
cache directory carries a sha256 manifest, written last, so damaged or unfinished builds are detected
(:func:`manifest_problem`) and rebuilt (:func:`ensure_built`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

from embedlens.errors import EmbedLensError
from embedlens.files import CHUNK, atomic_write_text, sha256_file, temporary_sibling, umask

logger = logging.getLogger(__name__)

CACHE_ENV = "EMBEDLENS_CACHE"
"""Environment variable naming the EmbedLens cache directory; it wins over everything else."""

MANIFEST_NAME = "embedlens-manifest.json"
MANIFEST_FORMAT = 1
_STALE_AFTER_S = 3600.0


def cache_dir() -> Path:
    """Return the EmbedLens cache directory, creating it when missing.

    Lookup order:

    1. ``$EMBEDLENS_CACHE`` (used as given, ``~`` expanded);
    2. ``$XDG_CACHE_HOME/embedlens`` when ``XDG_CACHE_HOME`` is set to an absolute path (the XDG
       spec says relative values are to be ignored);
    3. ``~/.cache/embedlens``.

    Returns:
        The absolute path of the directory, which exists on return.

    Raises:
        EmbedLensError: The directory cannot be created; the message names the variable it came from.
    """
    explicit = os.environ.get(CACHE_ENV, "").strip()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if explicit:
        path, origin = Path(explicit).expanduser(), f"${CACHE_ENV}"
    elif xdg and Path(xdg).is_absolute():
        path, origin = Path(xdg) / "embedlens", "$XDG_CACHE_HOME"
    else:
        path, origin = Path.home() / ".cache" / "embedlens", "the default ~/.cache"
    path = path.absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EmbedLensError(
            f"cannot create the EmbedLens cache directory {path} (from {origin}): {err.strerror}"
        ) from err
    return path


def copy_verified(source: IO[bytes], target: Path, expected_sha256: str) -> None:
    """Copy a stream to ``target`` atomically, publishing it only if its sha256 matches.

    The bytes go to a temporary file beside ``target`` and are hashed on the way; the file is moved
    into place with ``os.replace`` only after the hash matched, so ``target`` is never half written.

    Raises:
        ValueError: The copied bytes do not have ``expected_sha256`` (nothing is left behind).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    digest = hashlib.sha256()
    tmp = temporary_sibling(target)
    try:
        with open(tmp, "xb") as out:
            for block in iter(lambda: source.read(CHUNK), b""):
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != expected_sha256:
            raise ValueError(f"sha256 {actual} differs from the recorded {expected_sha256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(directory: Path, info: Mapping[str, str]) -> None:
    """Hash every file in ``directory`` and write the manifest there (atomically, last).

    Args:
        directory: A flat directory of finished files.
        info: Provenance recorded beside the hashes (``source_sha256`` is checked on load).
    """
    files = {
        path.name: {"size": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST_NAME
    }
    payload = {"format": MANIFEST_FORMAT, **info, "files": files}
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def manifest_problem(directory: Path, *, source_sha256: str, required: Iterable[str]) -> str | None:
    """Say why a cache directory cannot be used, or return ``None`` when it is intact.

    Args:
        directory: The cache directory.
        source_sha256: sha256 of the file the cache was built from; a cache built from another
            file (an older package version) is stale.
        required: File names that must be listed in the manifest.

    Returns:
        ``None`` when the manifest exists, matches the source, lists every required file and every
        listed file has its recorded size and sha256; otherwise a short reason.
    """
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return "no manifest (an unfinished build?)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files: dict[str, dict[str, object]] = manifest["files"]
        if manifest["format"] != MANIFEST_FORMAT:
            return f"manifest format {manifest['format']} is not {MANIFEST_FORMAT}"
        recorded_source = manifest["source_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    if recorded_source != source_sha256:
        return "built from another source file"
    missing = sorted(set(required) - set(files))
    if missing:
        return f"manifest lacks {', '.join(missing)}"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{name} has the wrong size"
        if sha256_file(path) != entry.get("sha256"):
            return f"{name} fails its sha256 check"
    return None


def ensure_built(
    target: Path,
    *,
    source_sha256: str,
    required: Iterable[str],
    build: Callable[[Path], None],
    info: Mapping[str, str],
    what: str,
) -> Path:
    """Return ``target`` if its manifest says it is intact; otherwise (re)build it atomically.

    Args:
        target: The cache directory.
        source_sha256: Identity of what the directory is built from (recorded in the manifest).
        required: Files the directory must hold.
        build: Fills an empty staging directory; it is swapped in only when ``build`` returns.
        info: Extra provenance for the manifest (``source_sha256`` is added).
        what: Name used in log messages.
    """
    if target.exists():
        problem = manifest_problem(target, source_sha256=source_sha256, required=required)
        if problem is None:
            return target
        logger.warning("cached %s in %s is unusable (%s); rebuilding it", what, target, problem)
    with staged_dir(target) as staging:
        build(staging)
        write_manifest(staging, {**info, "source_sha256": source_sha256})
    logger.info("saved %s in %s", what, target)
    return target


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Build a directory beside ``target`` and swap it in only if the block succeeds.

    Yields:
        An empty temporary directory on the same file system as ``target``. When the block exits
        normally, any old ``target`` is removed and the temporary directory renamed to it; when it
        raises, the temporary directory is deleted and ``target`` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        _open_up(staging)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _open_up(directory: Path) -> None:
    """Give a ``mkdtemp`` directory and its files the usual umask-derived permissions (not 0700)."""
    mask = umask()
    os.chmod(directory, 0o777 & ~mask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


def _remove_stale(target: Path) -> None:
    """Delete temporary siblings of ``target`` left by a build killed over an hour ago."""
    cutoff = time.time() - _STALE_AFTER_S
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            if leftover.lstat().st_mtime > cutoff:
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        except OSError as err:
            logger.debug("cannot remove leftover %s: %s", leftover, err)
        else:
            logger.info("removed %s, left by an interrupted build", leftover)
