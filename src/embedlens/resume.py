"""Output directories of long runs that resume: a ``run.json`` identity and committed parts.

A run (``embedlens stats``, ``embedlens eval``) writes its settings to ``run.json`` once and commits
its work batch by batch under ``parts/`` (each commit ends with a JSON record written atomically, so a
part either exists whole or not at all). Running the same command again skips what was committed;
other settings are refused unless the user asks to restart.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from embedlens.errors import InputError
from embedlens.files import atomic_write_text

RUN_FILE = "run.json"
PARTS_DIR = "parts"


def prepare_run_dir(
    out: Path, identity: dict[str, Any], *, restart: bool, kind: str, outputs: Iterable[str] = ()
) -> None:
    """Create ``out`` for a run, or check that what it holds is this run's (to resume it).

    Call from one process only (rank 0), before any other starts.

    Args:
        out: The run's directory.
        identity: Everything that decides the run's results; a resumed run must match it exactly.
        restart: Delete an earlier run's ``run.json``, parts and ``outputs`` first.
        kind: What the run is called in messages ("stats", "eval").
        outputs: Names of the final files under ``out`` that a restart removes.

    Raises:
        InputError: ``out`` holds a run with other settings (and ``restart`` is False), or is a file.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")
    run_file = out / RUN_FILE
    if restart:
        for name in (PARTS_DIR, RUN_FILE, *outputs):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    elif run_file.exists():
        try:
            stored = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{run_file} is unreadable ({exc}); pass --restart to start over") from exc
        if stored != identity:
            changed = sorted(key for key in identity if stored.get(key) != identity[key])
            raise InputError(
                f"{out} holds a {kind} run with other settings ({', '.join(changed)}); "
                "pass --restart to replace it, or choose another --out"
            )
    elif (out / PARTS_DIR).exists():
        raise InputError(f"{out} holds {kind} parts without {RUN_FILE}; pass --restart to start over")
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    if not run_file.exists():
        atomic_write_text(run_file, json.dumps(identity, ensure_ascii=False, indent=1))


def read_parts(parts: Path, pattern: str) -> list[Any]:
    """The records of every committed part matching ``pattern`` (JSON lists), in file-name order.

    Files that do not parse were never committed (an interrupted write) and are ignored.
    """
    records: list[Any] = []
    for marker in sorted(parts.glob(pattern)):
        try:
            records.extend(json.loads(marker.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
    return records
