"""Dataset statistics of the sink / dead / alive groups: streamed, resumable, split across processes.

:func:`collect` classifies one process's share of a dataset batch by batch and commits each batch as
two files in ``OUT/parts/``: a Parquet of its token rows, then a JSON record of its images (the commit
marker, written last). An interrupted run therefore resumes from its last committed batch without
losing or duplicating a row: images with a record are done, a Parquet without its record is ignored.
:func:`merge` then reads every committed batch, in dataset order, and writes

* ``tokens.parquet``: one row per visual token (``image_index``, ``image``, ``index``, ``row``,
  ``col``, ``group``, ``anchor_id``, ``top_ids``, ``norm``, ``view``), streamed part by part; with
  several views per image (:mod:`embedlens.views`) every view's grid tokens are rows, ``view`` says
  which (index into the views of the image's record) and ``index`` / ``row`` / ``col`` are within it;
* ``images.parquet``: one row per dataset item (status, grid, tokens and count of each group);
* ``summary.json``: group fractions over all tokens with bootstrap confidence intervals (images are
  resampled, since tokens of one image are not independent), per-image means, overlaps, the grid
  heatmap of each group, skipped images and the rule used;
* ``heatmap.png``: the heatmap picture.

Several processes (``accelerate launch`` / ``torchrun``) each take a contiguous share of the dataset
(:meth:`~embedlens.datasets.Dataset.shard`); rank 0 merges once all have finished, into the same files
one process would write. Memory stays flat in the dataset size: tokens are never held beyond a batch
(the merge keeps one group code per token, one byte each, for the heatmap).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedlens.checks import CONFIDENCE, NON_NEGATIVE_INT, POSITIVE_INT, check_fields, option
from embedlens.context import DEFAULT_PROMPT
from embedlens.datasets import Dataset, DatasetItem
from embedlens.errors import InputError
from embedlens.files import atomic_path, atomic_write_text
from embedlens.pictures.heatmap import save_group_heatmap
from embedlens.runs import (
    Commit,
    RunDir,
    load_readable,
    ranks,
    refuse_placeholder,
    resolved,
    run_share,
)
from embedlens.taxonomy.anchors import Anchors
from embedlens.taxonomy.classify import AnchorsLike, classify_batch, rule_settings
from embedlens.taxonomy.groups import CODES
from embedlens.taxonomy.rule import check_precedence
from embedlens.taxonomy.stats_summary import STATS_FORMAT, STATS_VERSION, heatmap, summary_data, write_images

if TYPE_CHECKING:
    from embedlens.context import ModelContext

__all__ = [
    "HEATMAP_FILE",
    "IMAGES_FILE",
    "STATS_FORMAT",
    "STATS_VERSION",
    "SUMMARY_FILE",
    "TOKENS_FILE",
    "TOKEN_SCHEMA",
    "Progress",
    "StatsOptions",
    "StatsSummary",
    "collect",
    "heatmap",
    "merge",
    "prepare_output",
    "run_identity",
    "run_stats",
]

#: The committed parts of a stats run (``r<rank>-b<sequence>``).
_PARTS = "r*-b*.json"

TOKENS_FILE = "tokens.parquet"
IMAGES_FILE = "images.parquet"
SUMMARY_FILE = "summary.json"
HEATMAP_FILE = "heatmap.png"
#: One letter per group in the per-image group strings of the batch records (grid order).

TOKEN_SCHEMA = pa.schema(
    [
        ("image_index", pa.int64()),
        ("image", pa.string()),
        ("index", pa.int64()),
        ("row", pa.int64()),
        ("col", pa.int64()),
        ("group", pa.string()),
        ("anchor_id", pa.int64()),
        ("top_ids", pa.list_(pa.int64())),
        ("norm", pa.float32()),
        ("view", pa.int64()),
    ]
)


@dataclass(frozen=True)
class StatsOptions:
    """How a dataset is classified and summarised.

    Attributes:
        top_k: Nearest ids the rule looks at (None: the anchors' ``top_k``).
        precedence: Group order for tokens matching several groups (None: vit_sink > llm_sink > dead).
        prompt: Question asked with images that have none in the dataset (None: the default prompt).
        batch_size: Images per forward pass (and per committed batch).
        bootstrap: Bootstrap resamples (of images) for the confidence intervals.
        confidence: Confidence level of the intervals.
        seed: Seed of the bootstrap, so that a result is reproducible.
    """

    top_k: int | None = option(None, POSITIVE_INT)
    precedence: tuple[str, ...] | None = None
    prompt: str | None = None
    batch_size: int = option(4, POSITIVE_INT)
    bootstrap: int = option(1000, POSITIVE_INT)
    confidence: float = option(0.95, CONFIDENCE)
    seed: int = option(0, NON_NEGATIVE_INT)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Progress:
    """What :func:`collect` did in this process: images newly classified, skipped, already done."""

    classified: int = 0
    skipped: int = 0
    resumed: int = 0
    batches: int = 0


# --------------------------------------------------------------------------- the run's identity
def run_identity(session: ModelContext, dataset: Dataset, anchors: Anchors, options: StatsOptions) -> dict[str, Any]:
    """Everything that decides the rows of a run and the layout of its parts; a resumed run must
    match it exactly (the dataset by its resolved path and item list, see :mod:`embedlens.runs.items`)."""
    return {
        "format": STATS_FORMAT + "-run",
        **session.model_identity,
        "anchors": anchors.to_dict(),
        "top_k": options.top_k or anchors.top_k,
        "precedence": list(check_precedence(options.precedence)),
        "prompt": options.prompt,
        "dataset": str(resolved(dataset.source)),
        "items": len(dataset.items),
        "items_hash": dataset.fingerprint(),
        "batch_size": options.batch_size,
    }


def stats_run(out: str | Path) -> RunDir:
    """The run directory of a stats run in ``out``."""
    return RunDir(out, "stats", (TOKENS_FILE, IMAGES_FILE, SUMMARY_FILE, HEATMAP_FILE))


def prepare_output(out: Path, identity: dict[str, Any], *, restart: bool) -> None:
    """Create ``out`` for a stats run, or check that what it holds is this run's (to resume it); one
    process only. :func:`run_stats` does this (and holds the directory's lock) itself.

    Raises:
        InputError: ``out`` holds a run with other settings (and ``restart`` is False), is in use, or is
            a file.
    """
    run = stats_run(out)
    run.open(identity, restart=restart)
    run.close()


# --------------------------------------------------------------------------- collecting
def collect(
    session: ModelContext,
    dataset: Dataset,
    out: str | Path,
    anchors: Anchors,
    options: StatsOptions,
    *,
    rank: int | None = None,
    world: int | None = None,
    progress: bool = True,
    on_batch: Callable[[Progress], None] | None = None,
) -> Progress:
    """Classify process ``rank``'s share of ``dataset`` into committed batches under ``out/parts``.

    Images already committed (by any process, in any earlier run) are skipped, so calling this again
    after an interruption finishes the work. ``out`` must have been set up (:func:`run_stats` does it).

    Args:
        session: The loaded model.
        dataset: The images.
        out: The run's output directory.
        anchors: The anchors, already checked against the model (see :func:`rule_settings`).
        options: Rule and batching options.
        rank: This process's rank (None: from the launcher); ``world``: with ``rank``, take only that
            share of a ``world`` of processes yourself (None: the launcher's processes split the items).
        progress: Show a progress bar (on stderr).
        on_batch: Called after each committed batch with the running :class:`Progress`.
    """
    run = stats_run(out)
    run.require()
    rank = ranks.rank() if rank is None else rank
    state = Progress()
    sequence = [_next_sequence(run.parts, rank)]

    def compute(batch: list[DatasetItem]) -> Commit:
        tokens, records = _classify_batch(session, batch, anchors, options)
        sequence[0] += 1
        name = f"r{rank:03d}-b{sequence[0] - 1:06d}"
        return Commit(name, records, data=lambda tmp: pq.write_table(tokens, tmp), suffix=".parquet", size=len(batch))

    def count(commit: Commit) -> None:
        state.batches += 1
        state.skipped += sum(record["status"] != "ok" for record in commit.records)
        state.classified += sum(record["status"] == "ok" for record in commit.records)
        if on_batch is not None:
            on_batch(state)

    items = dataset.shard(rank, world) if world is not None else dataset.items
    state.resumed = run_share(
        run,
        items,
        compute,
        batch_size=options.batch_size,
        pattern=_PARTS,
        desc="stats",
        progress=progress,
        after=count,
        split=world is None,
    )
    return state


def _classify_batch(
    session: ModelContext, batch: Sequence[DatasetItem], anchors: Anchors, options: StatsOptions
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Token rows (a table in :data:`TOKEN_SCHEMA`) and one record per item of the batch."""
    readable, skipped = load_readable(batch)
    records = [_record(item, status="unreadable", reason=reason) for item, reason in skipped]
    columns: dict[str, list[Any]] = {name: [] for name in TOKEN_SCHEMA.names}
    if readable:
        prompts = [item.prompt or options.prompt or DEFAULT_PROMPT for item, _ in readable]
        results = classify_batch(
            session,
            [image for _, image in readable],
            prompts,
            anchors=anchors,
            top_k=options.top_k,
            precedence=options.precedence,
        )
        for (item, _), result in zip(readable, results, strict=True):
            probe, found = result.probe, result.classification
            n = len(probe)
            columns["image_index"] += [item.index] * n
            columns["image"] += [item.key] * n
            columns["index"] += probe.index.tolist()
            columns["row"] += probe.row.tolist()
            columns["col"] += probe.col.tolist()
            columns["group"] += found.group.tolist()
            columns["anchor_id"] += list(found.anchor_id)
            columns["top_ids"] += probe.top_ids[:, : found.top_k].tolist()
            columns["norm"] += probe.norm.tolist()
            columns["view"] += probe.view_index.tolist()
            records.append(
                _record(
                    item,
                    status="ok",
                    grid=list(probe.grid),
                    views=[
                        {"name": v.name, "grid": list(v.grid), "start": v.start, "count": v.count} for v in probe.views
                    ],
                    tokens=n,
                    counts=dict(found.counts),
                    overlaps=dict(found.overlaps),
                    groups="".join(CODES[str(g)] for g in found.group),
                )
            )
    records.sort(key=lambda record: record["index"])
    table = pa.table(columns, schema=TOKEN_SCHEMA)
    # Within an image, rows keep the probe's order (views in sequence order, each in grid order).
    order = np.lexsort((np.arange(len(columns["index"])), np.asarray(columns["image_index"])))
    return table.take(pa.array(order, type=pa.int64())), records


def _record(item: DatasetItem, **fields: Any) -> dict[str, Any]:
    return {"index": item.index, "key": item.key, "image": str(item.image), **fields}


def _index(record: dict[str, Any]) -> int:
    return int(record["index"])


def _next_sequence(parts: Path, rank: int) -> int:
    numbers = [int(path.stem.split("-b")[1]) for path in parts.glob(f"r{rank:03d}-b*.*") if path.stem[-6:].isdigit()]
    return max(numbers, default=-1) + 1


# --------------------------------------------------------------------------- merging
@dataclass
class StatsSummary:
    """The merged result (``summary.json``) and the files written."""

    data: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def fractions(self) -> dict[str, float]:
        """Overall fraction of tokens in each group."""
        return {name: entry["fraction"] for name, entry in self.data["groups"].items()}


def merge(
    out: str | Path, dataset: Dataset, options: StatsOptions | None = None, *, picture: bool = True
) -> StatsSummary:
    """Merge the committed batches under ``out/parts`` into the result files (see the module docs).

    Raises:
        InputError: Some dataset items have no committed record yet (a process stopped early: run
            the same command again to finish), or no image was readable.
    """
    options = options or StatsOptions()
    out = Path(out)
    run = stats_run(out)
    identity = run.identity()
    records = run.records(_index, _PARTS)
    missing = [item.index for item in dataset.items if item.index not in records]
    if missing:
        raise InputError(
            f"{len(missing)} of {len(dataset)} images are not done yet; run the same command again to resume"
        )
    ordered = [records[item.index] for item in dataset.items]
    used = [record for record in ordered if record["status"] == "ok"]
    if not used:
        raise InputError(f"none of the {len(dataset)} images in {dataset.source} could be read")

    files = {"tokens": out / TOKENS_FILE, "images": out / IMAGES_FILE, "summary": out / SUMMARY_FILE}
    _write_tokens(run, files["tokens"])
    write_images(ordered, files["images"])
    data = summary_data(identity, dataset, ordered, used, options)
    if picture:
        heat = data["heatmap"]
        fractions = {name: np.asarray(values, dtype=float) for name, values in heat["fractions"].items()}
        files["heatmap"] = save_group_heatmap(fractions, out / HEATMAP_FILE, images=heat["images"] or None)
    atomic_write_text(files["summary"], json.dumps(data, ensure_ascii=False, indent=1))
    return StatsSummary(data=data, files=files)


def _write_tokens(run: RunDir, target: Path) -> None:
    """Concatenate the committed Parquet parts in dataset order, one part in memory at a time; an item
    committed twice (never under the lock, but the merge does not rely on it) keeps its first part's rows."""
    owners = run.claimed(lambda record: (_index(record),), _PARTS)
    committed = []
    for part in run.committed(_PARTS):
        mine = sorted(index for index, owner in owners.items() if owner.marker == part.marker)
        if mine and part.data(".parquet").exists():
            committed.append((mine[0], part, mine))
    committed.sort(key=lambda entry: entry[0])
    with atomic_path(target) as tmp, pq.ParquetWriter(tmp, TOKEN_SCHEMA) as writer:
        for _, part, mine in committed:
            table = pq.read_table(part.data(".parquet"))
            if "view" not in table.column_names:  # written before views existed: one view
                table = table.append_column("view", pa.array(np.zeros(table.num_rows, dtype=np.int64)))
            table = table.select(TOKEN_SCHEMA.names).cast(TOKEN_SCHEMA)
            if len(mine) < len(part.records):
                table = table.filter(pc.is_in(table["image_index"], value_set=pa.array(mine, type=pa.int64())))
            writer.write_table(table)


# --------------------------------------------------------------------------- one call
def run_stats(
    session: ModelContext,
    dataset: Dataset,
    out: str | Path,
    *,
    anchors: AnchorsLike = None,
    options: StatsOptions | None = None,
    restart: bool = False,
    progress: bool = True,
    picture: bool = True,
    on_batch: Callable[[Progress], None] | None = None,
) -> StatsSummary | None:
    """Classify every image of ``dataset`` and write the result files into ``out``; 1 or N processes.

    Resumes an interrupted run with the same settings; ``restart`` starts over instead. Under
    ``accelerate launch`` / ``torchrun`` every process calls this: rank 0 sets up (and locks) ``out``,
    each rank classifies its contiguous share, rank 0 merges once all are done and returns the
    summary (other ranks return None). Every setting is checked before ``out`` is touched, and rows
    whose prompt holds the image placeholder are skipped and listed (``summary["dataset"]["malformed"]``).
    """
    options = options or StatsOptions()
    run = stats_run(out)
    run.check_target()
    _, chosen, _ = rule_settings(session, anchors, options.top_k, options.precedence)
    refuse_placeholder(options.prompt, session.adapter.image_placeholder, "--prompt")
    dataset = dataset.without_placeholder(session.adapter.image_placeholder)
    with run.session(run_identity(session, dataset, chosen, options), restart=restart, device=session.adapter.device):
        collect(session, dataset, run.out, chosen, options, progress=progress, on_batch=on_batch)
        return run.finish(lambda: merge(run.out, dataset, options, picture=picture))
