"""Dataset statistics of the sink / dead / alive groups: streamed, resumable, split across processes.

:func:`collect` classifies one process's share of a dataset batch by batch and commits each batch as
two files in ``OUT/parts/``: a Parquet of its token rows, then a JSON record of its images (the commit
marker, written last). An interrupted run therefore resumes from its last committed batch without
losing or duplicating a row: images with a record are done, a Parquet without its record is ignored.
:func:`merge` then reads every committed batch, in dataset order, and writes

* ``tokens.parquet``: one row per visual token (``image_index``, ``image``, ``index``, ``row``,
  ``col``, ``group``, ``anchor_id``, ``top_ids``, ``norm``), streamed part by part;
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

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from embedlens.context import DEFAULT_PROMPT
from embedlens.datasets import Dataset, DatasetItem
from embedlens.errors import InputError
from embedlens.files import atomic_path, atomic_write_text
from embedlens.images import load_image
from embedlens.pictures.heatmap import save_group_heatmap
from embedlens.resume import PARTS_DIR, RUN_FILE, prepare_run_dir, read_parts
from embedlens.taxonomy.anchors import Anchors
from embedlens.taxonomy.classify import AnchorsLike, classify_batch, resolve_anchors
from embedlens.taxonomy.groups import ALL_GROUPS, CODES
from embedlens.taxonomy.rule import check_precedence

if TYPE_CHECKING:
    from embedlens.context import ModelContext

_T = TypeVar("_T")

TOKENS_FILE = "tokens.parquet"
IMAGES_FILE = "images.parquet"
SUMMARY_FILE = "summary.json"
HEATMAP_FILE = "heatmap.png"
STATS_FORMAT = "embedlens-stats"
STATS_VERSION = 1
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

    top_k: int | None = None
    precedence: tuple[str, ...] | None = None
    prompt: str | None = None
    batch_size: int = 4
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not 0 < self.confidence < 1:
            raise InputError(f"confidence must be between 0 and 1, got {self.confidence!r}")


@dataclass
class Progress:
    """What :func:`collect` did in this process: images newly classified, skipped, already done."""

    classified: int = 0
    skipped: int = 0
    resumed: int = 0
    batches: int = 0


# --------------------------------------------------------------------------- the run's identity
def run_identity(session: ModelContext, dataset: Dataset, anchors: Anchors, options: StatsOptions) -> dict[str, Any]:
    """Everything that decides the rows of a run; a resumed run must match it exactly."""
    digest = hashlib.sha256()
    for item in dataset.items:
        digest.update(json.dumps([item.key, str(item.image), item.prompt]).encode())
    return {
        "format": STATS_FORMAT + "-run",
        "model": session.adapter.source,
        "config_hash": session.config_hash,
        "vocab_hash": session.vocab_hash,
        "anchors": anchors.to_dict(),
        "top_k": options.top_k or anchors.top_k,
        "precedence": list(check_precedence(options.precedence)),
        "prompt": options.prompt,
        "dataset": str(dataset.source),
        "items": len(dataset.items),
        "items_hash": digest.hexdigest(),
    }


def prepare_output(out: Path, identity: dict[str, Any], *, restart: bool) -> None:
    """Create ``out`` for a stats run, or check that what it holds is this run's (to resume it).

    Call from one process only (rank 0), before the others start.

    Raises:
        InputError: ``out`` holds a run with other settings (and ``restart`` is False), or is a file.
    """
    outputs = (TOKENS_FILE, IMAGES_FILE, SUMMARY_FILE, HEATMAP_FILE)
    prepare_run_dir(out, identity, restart=restart, kind="stats", outputs=outputs)


# --------------------------------------------------------------------------- collecting
def collect(
    session: ModelContext,
    dataset: Dataset,
    out: str | Path,
    *,
    anchors: AnchorsLike = None,
    options: StatsOptions | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    on_batch: Callable[[Progress], None] | None = None,
) -> Progress:
    """Classify process ``rank``'s share of ``dataset`` into committed batches under ``out/parts``.

    Images already committed (by any process, in any earlier run) are skipped, so calling this again
    after an interruption finishes the work. ``out`` must have been set up by :func:`prepare_output`.

    Args:
        session: The loaded model.
        dataset: The images.
        out: The run's output directory.
        anchors: Anchors, an anchors JSON path, or None for the model's built-in anchors.
        options: Rule and batching options.
        rank: This process's rank; ``world``: the number of processes.
        progress: Show a progress bar (on stderr).
        on_batch: Called after each committed batch with the running :class:`Progress`.
    """
    options = options or StatsOptions()
    out = Path(out)
    parts = out / PARTS_DIR
    if not (out / RUN_FILE).is_file():
        raise InputError(f"{out} is not set up for a stats run (no {RUN_FILE})")
    chosen = resolve_anchors(session, anchors)
    share = dataset.shard(rank, world)
    done = {record["index"] for record in _read_records(parts)}
    todo = [item for item in share if item.index not in done]
    state = Progress(resumed=len(share) - len(todo))
    sequence = _next_sequence(parts, rank)
    bar = tqdm(
        total=len(share),
        initial=state.resumed,
        desc=f"stats[{rank}]" if world > 1 else "stats",
        unit="img",
        disable=not progress,
        position=rank if world > 1 else None,
    )
    try:
        for batch in _contiguous_batches(todo, options.batch_size):
            tokens, records = _classify_batch(session, batch, chosen, options)
            stem = parts / f"r{rank:03d}-b{sequence:06d}"
            with atomic_path(stem.with_suffix(".parquet")) as tmp:
                pq.write_table(tokens, tmp)
            atomic_write_text(stem.with_suffix(".json"), json.dumps(records, ensure_ascii=False))
            sequence += 1
            state.batches += 1
            state.skipped += sum(record["status"] != "ok" for record in records)
            state.classified += sum(record["status"] == "ok" for record in records)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(state)
    finally:
        bar.close()
    return state


def _contiguous_batches(items: Sequence[DatasetItem], size: int) -> list[list[DatasetItem]]:
    """Batches of at most ``size`` items whose indices are consecutive, so committed parts never
    interleave and concatenating them by first index gives dataset order."""
    batches: list[list[DatasetItem]] = []
    for item in items:
        if batches and len(batches[-1]) < size and batches[-1][-1].index + 1 == item.index:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def _classify_batch(
    session: ModelContext, batch: Sequence[DatasetItem], anchors: Anchors, options: StatsOptions
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Token rows (a table in :data:`TOKEN_SCHEMA`) and one record per item of the batch."""
    records: list[dict[str, Any]] = []
    readable: list[tuple[DatasetItem, Any]] = []
    for item in batch:
        try:
            readable.append((item, load_image(item.image)))
        except InputError as exc:
            records.append(_record(item, status="unreadable", reason=str(exc)))
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
            records.append(
                _record(
                    item,
                    status="ok",
                    grid=list(probe.grid),
                    tokens=n,
                    counts=dict(found.counts),
                    overlaps=dict(found.overlaps),
                    groups="".join(CODES[str(g)] for g in found.group),
                )
            )
    records.sort(key=lambda record: record["index"])
    table = pa.table(columns, schema=TOKEN_SCHEMA)
    order = np.lexsort((np.asarray(columns["index"]), np.asarray(columns["image_index"])))
    return table.take(pa.array(order, type=pa.int64())), records


def _record(item: DatasetItem, **fields: Any) -> dict[str, Any]:
    return {"index": item.index, "key": item.key, "image": str(item.image), **fields}


def _read_records(parts: Path) -> list[dict[str, Any]]:
    """Every committed image record under ``parts`` (files that fail to parse are not committed)."""
    return read_parts(parts, "r*-b*.json")


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
    parts = out / PARTS_DIR
    identity = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    records = {record["index"]: record for record in _read_records(parts)}
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
    _write_tokens(parts, records, files["tokens"])
    _write_images(ordered, files["images"])
    data = _summary(identity, dataset, ordered, used, options)
    if picture:
        heat = data["heatmap"]
        fractions = {name: np.asarray(values, dtype=float) for name, values in heat["fractions"].items()}
        files["heatmap"] = save_group_heatmap(fractions, out / HEATMAP_FILE, images=heat["images"])
    atomic_write_text(files["summary"], json.dumps(data, ensure_ascii=False, indent=1))
    return StatsSummary(data=data, files=files)


def _write_tokens(parts: Path, records: Mapping[int, dict[str, Any]], target: Path) -> None:
    """Concatenate the committed Parquet parts in dataset order, one part in memory at a time."""
    committed = []
    for marker in parts.glob("r*-b*.json"):
        table_path = marker.with_suffix(".parquet")
        try:
            indices = [record["index"] for record in json.loads(marker.read_text(encoding="utf-8"))]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if indices and table_path.exists():
            committed.append((min(indices), table_path))
    committed.sort()
    with atomic_path(target) as tmp, pq.ParquetWriter(tmp, TOKEN_SCHEMA) as writer:
        for _, table_path in committed:
            writer.write_table(pq.read_table(table_path, schema=TOKEN_SCHEMA))


def _write_images(ordered: Sequence[dict[str, Any]], target: Path) -> None:
    rows: dict[str, list[Any]] = {
        "image_index": [],
        "image": [],
        "path": [],
        "status": [],
        "reason": [],
        "grid_rows": [],
        "grid_cols": [],
        "tokens": [],
    }
    for name in ALL_GROUPS:
        rows[f"count_{name}"] = []
    for record in ordered:
        ok = record["status"] == "ok"
        rows["image_index"].append(record["index"])
        rows["image"].append(record["key"])
        rows["path"].append(record["image"])
        rows["status"].append(record["status"])
        rows["reason"].append(record.get("reason"))
        rows["grid_rows"].append(record["grid"][0] if ok else None)
        rows["grid_cols"].append(record["grid"][1] if ok else None)
        rows["tokens"].append(record["tokens"] if ok else None)
        for name in ALL_GROUPS:
            rows[f"count_{name}"].append(record["counts"].get(name, 0) if ok else None)
    with atomic_path(target) as tmp:
        pq.write_table(pa.table(rows), tmp)


def _summary(
    identity: dict[str, Any],
    dataset: Dataset,
    ordered: Sequence[dict[str, Any]],
    used: Sequence[dict[str, Any]],
    options: StatsOptions,
) -> dict[str, Any]:
    counts = np.array([[record["counts"].get(name, 0) for name in ALL_GROUPS] for record in used], dtype=np.int64)
    tokens = counts.sum(axis=1)
    low, high = bootstrap_interval(counts, options.bootstrap, options.confidence, options.seed)
    per_image = counts / tokens[:, None]
    groups = {
        name: {
            "tokens": int(counts[:, g].sum()),
            "fraction": float(counts[:, g].sum() / tokens.sum()),
            "ci": [float(low[g]), float(high[g])],
            "mean_image_fraction": float(per_image[:, g].mean()),
            "std_image_fraction": float(per_image[:, g].std(ddof=1)) if len(used) > 1 else 0.0,
        }
        for g, name in enumerate(ALL_GROUPS)
    }
    overlaps: dict[str, int] = {}
    for record in used:
        for pair, value in record["overlaps"].items():
            overlaps[pair] = overlaps.get(pair, 0) + int(value)
    skipped = [
        {"key": r["key"], "image": r["image"], "reason": r.get("reason")} for r in ordered if r["status"] != "ok"
    ]
    return {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "model": identity["model"],
        "vocab_hash": identity["vocab_hash"],
        "rule": {
            "top_k": identity["top_k"],
            "precedence": identity["precedence"],
            "anchors": identity["anchors"]["groups"],
            "anchors_model": identity["anchors"]["model"],
        },
        "dataset": {"source": str(dataset.source), "items": len(dataset), "malformed": list(dataset.malformed)},
        "images": {"total": len(ordered), "used": len(used), "skipped": len(skipped), "skipped_list": skipped},
        "tokens": int(tokens.sum()),
        "groups": groups,
        "overlaps": overlaps,
        "intervals": {
            "method": "percentile bootstrap over images",
            "confidence": options.confidence,
            "resamples": options.bootstrap,
            "seed": options.seed,
        },
        "heatmap": heatmap(used),
    }


def bootstrap_interval(
    counts: np.ndarray, resamples: int, confidence: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of each group's token fraction, resampling images.

    Args:
        counts: Tokens per (image, group), shape ``[images, groups]``.

    Returns:
        Lower and upper bounds per group, each shape ``[groups]``.
    """
    rng = np.random.default_rng(seed)
    n = counts.shape[0]
    estimates = np.empty((resamples, counts.shape[1]))
    step = max(1, 2**22 // max(n, 1))
    for start in range(0, resamples, step):
        stop = min(start + step, resamples)
        picks = rng.integers(0, n, size=(stop - start, n))
        sums = counts[picks].sum(axis=1)  # [b, groups]
        estimates[start:stop] = sums / sums.sum(axis=1, keepdims=True)
    tail = (1 - confidence) / 2 * 100
    return np.percentile(estimates, tail, axis=0), np.percentile(estimates, 100 - tail, axis=0)


def heatmap(used: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per grid cell, the fraction of images whose token there is in each group.

    Images are grouped by grid shape; the heatmap is drawn for the most common shape (the others are
    counted in ``"other_grids"``).
    """
    shapes: dict[tuple[int, int], int] = {}
    for record in used:
        shape = (int(record["grid"][0]), int(record["grid"][1]))
        shapes[shape] = shapes.get(shape, 0) + 1
    grid = max(shapes, key=lambda shape: (shapes[shape], shape))
    cells = grid[0] * grid[1]
    sums = np.zeros((len(ALL_GROUPS), cells), dtype=np.int64)
    codes = np.array([ord(CODES[name]) for name in ALL_GROUPS], dtype=np.uint8)
    for record in used:
        if tuple(record["grid"]) != grid:
            continue
        letters = np.frombuffer(record["groups"].encode("ascii"), dtype=np.uint8)
        if letters.size != cells:
            continue
        sums += letters[None, :] == codes[:, None]
    fractions = sums / shapes[grid]
    return {
        "grid": list(grid),
        "images": shapes[grid],
        "fractions": {name: fractions[g].reshape(grid).round(6).tolist() for g, name in enumerate(ALL_GROUPS)},
        "other_grids": {f"{r}x{c}": count for (r, c), count in shapes.items() if (r, c) != grid},
    }


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
) -> StatsSummary:
    """Classify every image of ``dataset`` and write the result files into ``out`` (one process).

    Resumes an interrupted run with the same settings; ``restart`` starts over instead. For several
    processes see :func:`run_stats_distributed`.
    """
    options = options or StatsOptions()
    out = Path(out)
    chosen = resolve_anchors(session, anchors)
    prepare_output(out, run_identity(session, dataset, chosen, options), restart=restart)
    collect(session, dataset, out, anchors=chosen, options=options, progress=progress, on_batch=on_batch)
    return merge(out, dataset, options, picture=picture)


def run_stats_distributed(
    session: ModelContext,
    dataset: Dataset,
    out: str | Path,
    *,
    anchors: AnchorsLike = None,
    options: StatsOptions | None = None,
    restart: bool = False,
    progress: bool = True,
    picture: bool = True,
) -> StatsSummary | None:
    """:func:`run_stats` inside an initialised ``torch.distributed`` process group.

    Rank 0 sets up ``out``; every rank classifies its contiguous share; rank 0 merges once all are
    done and returns the summary (other ranks return None).
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    options = options or StatsOptions()
    out = Path(out)
    chosen = resolve_anchors(session, anchors)
    identity = run_identity(session, dataset, chosen, options)
    _on_rank_zero(lambda: prepare_output(out, identity, restart=restart))
    collect(session, dataset, out, anchors=chosen, options=options, rank=rank, world=world, progress=progress)
    dist.barrier()
    return _on_rank_zero(lambda: merge(out, dataset, options, picture=picture))


def _on_rank_zero(work: Callable[[], _T]) -> _T | None:
    """Run ``work`` on rank 0 only and return its result there (None elsewhere); an :class:`InputError`
    on rank 0 is raised on every rank, so that no process is left waiting for the others."""
    import torch.distributed as dist

    result, problem = None, [None]
    if dist.get_rank() == 0:
        try:
            result = work()
        except InputError as exc:
            problem[0] = str(exc)
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise InputError(problem[0])
    return result
