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


def _views(record: dict[str, Any]) -> list[tuple[str, tuple[int, int], int, int]]:
    """``(name, (rows, cols), start, count)`` of each view of an ok record (older records: one ``"full"`` view)."""
    listed = record.get("views")
    if not listed:
        rows, cols = int(record["grid"][0]), int(record["grid"][1])
        return [("full", (rows, cols), 0, len(record["groups"]))]
    return [(str(v["name"]), (int(v["grid"][0]), int(v["grid"][1])), int(v["start"]), int(v["count"])) for v in listed]


def heatmap(used: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per grid cell, the fraction of images whose token there is in each group.

    Every view of every image is keyed by its name and grid shape; the heatmap is drawn for the most
    common key (ties: the larger grid), over the images that have that view, and the others are counted
    in ``"other_grids"`` (``"RxC"``, or ``"<view> RxC"`` when a view is not ``"full"``). With several
    views, ``"view"`` names the view drawn.
    """
    keys: dict[tuple[str, tuple[int, int]], int] = {}
    for record in used:
        for name, shape, _, _ in _views(record):
            keys[(name, shape)] = keys.get((name, shape), 0) + 1
    chosen = max(keys, key=lambda key: (keys[key], key[1], key[0] == "full"))
    name, grid = chosen
    cells = grid[0] * grid[1]
    sums = np.zeros((len(ALL_GROUPS), cells), dtype=np.int64)
    codes = np.array([ord(CODES[name]) for name in ALL_GROUPS], dtype=np.uint8)
    images = 0
    for record in used:
        letters = np.frombuffer(record["groups"].encode("ascii"), dtype=np.uint8)
        for view, shape, start, count in _views(record):
            if (view, shape) != chosen or count != cells or start + count > letters.size:
                continue
            sums += letters[None, start : start + count] == codes[:, None]
            images += 1
            break
    fractions = sums / images if images else np.full(sums.shape, np.nan)
    out: dict[str, Any] = {
        "grid": list(grid),
        "images": images,
        "fractions": {g_name: fractions[g].reshape(grid).round(6).tolist() for g, g_name in enumerate(ALL_GROUPS)},
        "other_grids": {_key_text(key): count for key, count in keys.items() if key != chosen},
    }
    if any(record.get("views") and len(record["views"]) > 1 for record in used):
        out["view"] = name
    return out


def _key_text(key: tuple[str, tuple[int, int]]) -> str:
    name, (rows, cols) = key
    return f"{rows}x{cols}" if name == "full" else f"{name} {rows}x{cols}"
