"""Layer alignment, the summarising half: the layer table, the per-group summary and its markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedlens.analysis.align_measures import EPS, VISUAL_GROUPS, TextReference, Totals


# --------------------------------------------------------------------------- summarising
def wasserstein_1d(a: np.ndarray, b: np.ndarray, points: int = 1000) -> float:
    """1-D Wasserstein-1 distance between two samples: the mean gap between their quantiles."""
    if a.size == 0 or b.size == 0:
        return float("nan")
    q = (np.arange(points) + 0.5) / points
    return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))


def layer_rows(totals: Totals, reference: TextReference, lens_layers: Sequence[int]) -> list[dict[str, Any]]:
    """The long layer table: one row per (group, layer), visual groups then ``text`` and ``prompt``."""
    layers = totals.norm_sum.shape[1]
    measured = np.zeros(layers, dtype=bool)
    measured[list(lens_layers)] = True
    text_log = np.log(np.maximum(reference.norms, EPS))
    text_mean_unit = reference.unit.double().mean(dim=1).numpy()  # [L1, d]
    rows = []
    for g, group in enumerate(VISUAL_GROUPS):
        n = totals.count[g]
        if n == 0:
            continue
        mean = totals.norm_sum[g] / n
        std = np.sqrt(np.maximum(totals.norm_sq[g] / n - mean**2, 0))
        chosen = totals.log_norm0 if g == 0 else totals.log_norm0[totals.log_norm0_group == g]
        unit0 = totals.unit0[g] / n
        for layer in range(layers):
            rows.append(
                {
                    "group": group,
                    "layer": layer,
                    "tokens": int(n),
                    "norm_mean": float(mean[layer]),
                    "norm_std": float(std[layer]),
                    "cross_layer_cos": float(totals.cross_cos[g, layer] / n),
                    "best_cos": float(totals.best_cos[g, layer] / n),
                    "norm_w1": wasserstein_1d(chosen, text_log[layer]),
                    "direction_distance": float(np.linalg.norm(unit0 - text_mean_unit[layer])),
                    "readable_embedding": float(totals.readable[0, g, layer] / n) if measured[layer] else None,
                    "word_share_embedding": float(totals.word_share[0, g, layer] / n) if measured[layer] else None,
                    "readable_logit": float(totals.readable[1, g, layer] / n) if measured[layer] else None,
                    "word_share_logit": float(totals.word_share[1, g, layer] / n) if measured[layer] else None,
                }
            )
    for layer in range(layers):
        rows.append(
            {
                "group": "text",
                "layer": layer,
                "tokens": reference.tokens,
                "norm_mean": float(reference.norms[layer].mean()),
                "norm_std": float(reference.norms[layer].std()),
            }
        )
    n = totals.prompt_count
    if n:
        mean = totals.prompt_norm / n
        std = np.sqrt(np.maximum(totals.prompt_sq / n - mean**2, 0))
        for layer in range(layers):
            rows.append(
                {
                    "group": "prompt",
                    "layer": layer,
                    "tokens": int(n),
                    "norm_mean": float(mean[layer]),
                    "norm_std": float(std[layer]),
                    "best_cos": float(totals.prompt_best_cos[layer] / n),
                    "norm_w1": wasserstein_1d(totals.prompt_log_norm[layer], text_log[layer]),
                    "direction_distance": float(np.linalg.norm(totals.prompt_unit[layer] / n - text_mean_unit[layer])),
                }
            )
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per visual group: the norm-matched layer and the best-aligned layer under each measure."""
    text = {r["layer"]: r["norm_mean"] for r in rows if r["group"] == "text"}
    out: dict[str, Any] = {}
    for group in VISUAL_GROUPS:
        mine = sorted((r for r in rows if r["group"] == group), key=lambda r: r["layer"])
        if not mine:
            continue
        start = mine[0]["norm_mean"]
        gaps = {layer: abs(math.log(norm / start)) for layer, norm in text.items() if norm > 0 and start > 0}
        matched = min(gaps, key=lambda layer: (gaps[layer], layer)) if gaps else None
        out[group] = {
            "tokens": mine[0]["tokens"],
            "norm_layer0": start,
            "norm_matched_layer": matched,
            "norm_ratio_to_text_layer0": start / text[0] if text.get(0) else None,
            "best_cos_layer": max(mine, key=lambda r: (r["best_cos"], -r["layer"]))["layer"],
            "best_cos_max": max(r["best_cos"] for r in mine),
            "norm_w1_layer": min(mine, key=lambda r: (r["norm_w1"], r["layer"]))["layer"],
            "direction_distance_layer": min(mine, key=lambda r: (r["direction_distance"], r["layer"]))["layer"],
            "cross_layer_cos_last": mine[-1]["cross_layer_cos"],
        }
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def render_markdown(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The summary and the layer table of the focus group as markdown."""
    lines = [
        f"Alignment of visual tokens on {summary['images']} images ({summary['model']}); text reference: "
        f"{summary['text']['tokens']} tokens from {summary['text']['passages']} passages.",
        "",
        "| group | tokens | norm at layer 0 | x text norm at layer 0 | norm-matched layer | best-cos layer (max) "
        "| norm-W1 layer | direction layer | cos(layer 0, last) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group, s in summary["groups"].items():
        lines.append(
            f"| {group} | {s['tokens']} | {_fmt(s['norm_layer0'])} | {_fmt(s['norm_ratio_to_text_layer0'])} | "
            f"{s['norm_matched_layer']} | {s['best_cos_layer']} ({_fmt(s['best_cos_max'])}) | {s['norm_w1_layer']} | "
            f"{s['direction_distance_layer']} | {_fmt(s['cross_layer_cos_last'])} |"
        )
    focus = summary["focus_group"]
    text = {r["layer"]: r for r in rows if r["group"] == "text"}
    prompt = {r["layer"]: r for r in rows if r["group"] == "prompt"}
    lines += [
        "",
        f"Per layer, group {focus!r} (layer-0 tokens against the text states of each layer; readability of "
        "the tokens' own states at each layer):",
        "",
        "| layer | text norm | prompt norm | visual norm | best cos | prompt's best cos | norm W1 "
        "| direction dist. | cos(0, l) | readable (emb.) | readable (logit) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["group"] == focus), key=lambda r: r["layer"]):
        layer = r["layer"]
        lines.append(
            f"| {layer} | {_fmt(text[layer]['norm_mean'])} | {_fmt(prompt.get(layer, {}).get('norm_mean'))} | "
            f"{_fmt(r['norm_mean'])} | {_fmt(r['best_cos'])} | {_fmt(prompt.get(layer, {}).get('best_cos'))} | "
            f"{_fmt(r['norm_w1'])} | "
            f"{_fmt(r['direction_distance'])} | {_fmt(r['cross_layer_cos'])} | {_fmt(r['readable_embedding'])} | "
            f"{_fmt(r['readable_logit'])} |"
        )
    return "\n".join(lines) + "\n"
