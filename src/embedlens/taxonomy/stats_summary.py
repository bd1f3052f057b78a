"""Dataset statistics, the summarising half: ``images.parquet``, ``summary.json`` and the heatmap data
(see :mod:`embedlens.taxonomy.stats`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedlens.datasets import Dataset
from embedlens.files import atomic_path
from embedlens.runs import bootstrap_interval, resolved
from embedlens.taxonomy.groups import ALL_GROUPS, CODES

if TYPE_CHECKING:
    from embedlens.taxonomy.stats import StatsOptions

STATS_FORMAT = "embedlens-stats"
STATS_VERSION = 1


def write_images(ordered: Sequence[dict[str, Any]], target: Path) -> None:
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


def summary_data(
    identity: dict[str, Any],
    dataset: Dataset,
    ordered: Sequence[dict[str, Any]],
    used: Sequence[dict[str, Any]],
    options: StatsOptions,
) -> dict[str, Any]:
    counts = np.array([[record["counts"].get(name, 0) for name in ALL_GROUPS] for record in used], dtype=np.int64)
    tokens = counts.sum(axis=1)
    low, high = bootstrap_interval(counts, options.bootstrap, options.confidence, options.seed, weights=tokens)
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
        "profile": identity.get("profile", "default"),
        "rule": {
            "top_k": identity["top_k"],
            "precedence": identity["precedence"],
            "anchors": identity["anchors"]["groups"],
            "anchors_model": identity["anchors"]["model"],
        },
        "dataset": {
            "source": str(resolved(dataset.source)),
            "items": len(dataset),
            "malformed": list(dataset.malformed),
        },
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
