"""ONE resumable run engine for ``stats``, ``eval``, ``align`` and ``inject-sweep``.

* :mod:`~embedlens.runs.directory`: the run directory (identity check, ``--restart``, lock, atomic
  commits of parts, one record per item when reading them back);
* :mod:`~embedlens.runs.items`: the identity hash of a run's items, contiguous batches (split by rank),
  reading images with unreadable ones skipped and listed;
* :mod:`~embedlens.runs.ranks`: several processes through ``accelerate.PartialState``;
* :mod:`~embedlens.runs.bootstrap`: the one bootstrap interval;
* :mod:`~embedlens.runs.lock`: one owner per run directory.

Each experiment keeps only its per-batch computation and its summary.
"""

from embedlens.runs.bootstrap import bootstrap_interval
from embedlens.runs.directory import PARTS_DIR, RUN_FILE, Part, RunDir
from embedlens.runs.items import (
    contiguous_batches,
    items_hash,
    load_readable,
    path_label,
    placeholder_problem,
    refuse_placeholder,
    resolved,
    shard,
)
from embedlens.runs.lock import LOCK_FILE, RunLock
from embedlens.runs.loop import Commit, execute, run_share
from embedlens.runs.ranks import (
    barrier,
    is_main,
    join,
    launched_world,
    on_main,
    process_device,
    process_state,
    rank,
    world_size,
)

__all__ = [
    "LOCK_FILE",
    "PARTS_DIR",
    "RUN_FILE",
    "Commit",
    "Part",
    "RunDir",
    "RunLock",
    "barrier",
    "bootstrap_interval",
    "contiguous_batches",
    "execute",
    "is_main",
    "items_hash",
    "join",
    "launched_world",
    "load_readable",
    "on_main",
    "path_label",
    "placeholder_problem",
    "process_device",
    "process_state",
    "rank",
    "refuse_placeholder",
    "resolved",
    "run_share",
    "shard",
    "world_size",
]
