"""HTML for the report's static sections: provenance, stats, anchors, eval, inject-sweep and align.

Everything here is rendered once, in Python, as HTML tables and inline SVG (see :mod:`.charts`);
only the probe panels are drawn by the page's script. All text from the outputs is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

import pandas as pd

from embedlens.report.charts import PALETTE, Point, Series, cell_heatmap, interval_bars, line_chart, scatter_chart
from embedlens.report.readers import Section
from embedlens.taxonomy.groups import ALL_GROUPS, COLOURS

#: Group colours for charts (alive, white in pictures, is drawn grey here).
GROUP_HEX = {name: "#{:02x}{:02x}{:02x}".format(*COLOURS[name]) for name in ALL_GROUPS} | {"alive": "#bbbbbb"}
#: Colours of the other token sets the alignment profiles draw (distinct from the groups').
SET_HEX = {"visual": "#e69f00", "text": "#000000", "prompt": "#cc79a7"}


def pct(value: Any, digits: int = 1) -> str:
    """A share as a percentage, or ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value) * 100:.{digits}f}"


def _num(value: Any, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return escape(str(value))


def table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """An HTML table; cells are given as HTML (escape text before)."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def provenance_html(section: Section) -> str:
    """The section's provenance as a small key/value list, always shown."""
    items = "".join(f"<dt>{escape(label)}</dt><dd>{escape(value)}</dd>" for label, value in section.provenance.items())
    return f'<dl class="prov"><dt>source</dt><dd>{escape(str(section.source))}</dd>{items}</dl>'


# --------------------------------------------------------------------------- stats / anchors
def stats_html(section: Section) -> str:
    """Group shares with intervals (bars and table), overlaps, per-cell heatmaps."""
    data = section.data
    level = f"{data['intervals']['confidence']:.0%}"
    groups = data["groups"]
    bars = interval_bars(
        [(name, g["fraction"], g["ci"][0], g["ci"][1], GROUP_HEX[name]) for name, g in groups.items()],
        title=f"share of all {data['tokens']} visual tokens ({level} interval, images resampled)",
        width=540,
    )
    rows = [
        [
            f'<span class="sw" style="background:{GROUP_HEX[name]}"></span>{escape(name)}',
            str(g["tokens"]),
            f"{pct(g['fraction'], 2)} [{pct(g['ci'][0], 2)}, {pct(g['ci'][1], 2)}]",
            f"{pct(g['mean_image_fraction'], 2)} ± {pct(g['std_image_fraction'], 2)}",
        ]
        for name, g in groups.items()
    ]
    parts = [
        bars,
        table(["group", "tokens", f"share % [{level} interval]", "per image: mean ± sd %"], rows),
        "<h4>Overlaps (tokens matching both groups, before precedence)</h4>",
        table(["pair", "tokens"], [[escape(pair), str(count)] for pair, count in data.get("overlaps", {}).items()]),
    ]
    heat = data.get("heatmap") or {}
    if heat.get("fractions"):
        grid = heat["grid"]
        parts.append(
            f"<h4>Per grid cell: share of the {heat['images']} images with a {grid[0]} x {grid[1]} grid"
            + (f" in their view {escape(str(heat['view']))}" if heat.get("view") else "")
            + " whose token there is in each group</h4>"
        )
        maps = [
            cell_heatmap(values, COLOURS[name] if name != "alive" else (90, 90, 90), title=name)
            for name, values in heat["fractions"].items()
        ]
        parts.append('<div class="charts">' + "".join(maps) + "</div>")
        if heat.get("other_grids"):
            parts.append(f"<p class='note'>Other grid shapes (not in the maps): {escape(str(heat['other_grids']))}</p>")
    skipped = data["images"].get("skipped_list") or []
    if skipped:
        parts.append(
            "<h4>Skipped images</h4>"
            + table(["image", "reason"], [[escape(str(s["image"])), escape(str(s.get("reason")))] for s in skipped])
        )
    return "".join(parts)


def anchors_html(section: Section) -> str:
    """Each group's anchor ids with their pieces and evidence, the thresholds, and every candidate judged."""
    data = section.data
    evidence = data.get("evidence") or {}
    candidates = evidence.get("candidates") or []
    by_id = {c["id"]: c for c in candidates}
    rows = []
    for name, ids in data["groups"].items():
        shown = [f"{i} <code>{escape(repr(by_id[i]['piece']))}</code>" if i in by_id else str(i) for i in ids]
        rows.append(
            [
                f'<span class="sw" style="background:{GROUP_HEX[name]}"></span>{escape(name)}',
                ", ".join(shown) or "<em>none found</em>",
            ]
        )
    parts = [table(["group", "anchor ids"], rows)]
    thresholds = evidence.get("thresholds") or {}
    if thresholds:
        parts.append("<h4>Thresholds</h4>")
        parts.append(table(["setting", "value"], [[escape(k), escape(str(v))] for k, v in thresholds.items()]))
    if candidates:
        columns = [
            "id",
            "piece",
            "image_fraction",
            "independence",
            "norm_ratio",
            "bos_cosine",
            "massive_ratio",
            "cross_layer_cosine",
            "group",
            "reason",
        ]
        header = [escape(c.replace("_", " ")) for c in columns]

        def rows_of(chosen: list[dict[str, Any]]) -> list[list[str]]:
            out = []
            for c in chosen:
                cells = [escape(str(c.get("id"))), f"<code>{escape(repr(c.get('piece')))}</code>"]
                cells += [_num(c.get(col), ".3f") for col in columns[2:8]]
                out.append([*cells, escape(str(c.get("group") or "—")), escape(str(c.get("reason", "")))])
            return out

        accepted = [c for c in candidates if c.get("group")]
        if accepted:
            parts.append(f"<h4>Evidence for the {len(accepted)} accepted ids</h4>")
            parts.append(table(header, rows_of(accepted), "wide"))
        parts.append(
            f"<details><summary>Evidence for all {len(candidates)} candidate ids</summary>"
            + table(header, rows_of(candidates), "wide")
            + "</details>"
        )
    return "".join(parts)


# --------------------------------------------------------------------------- eval / sweep
def eval_html(section: Section) -> str:
    """Scores per category with intervals and paired deltas, FLOPs, and accuracy against FLOPs."""
    data = section.data
    level = f"{data['confidence']:.0%}"
    categories = data["categories"]
    rows = []
    points = []
    for index, entry in enumerate(data["settings"]):
        cells = [escape(entry["name"])]
        for category in categories:
            cell = entry["categories"].get(category)
            if cell is None:
                cells.append("n/a")
                continue
            text = f"{pct(cell['score'])} [{pct(cell['interval'][0])}, {pct(cell['interval'][1])}]"
            if "delta" in cell:
                low, high = cell["delta_interval"]
                text += (
                    f'<br><span class="delta">Δ {cell["delta"] * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]</span>'
                )
            cells.append(text)
        interval = entry.get("overall_interval") or [None, None]
        cells += [
            f"{pct(entry['overall'])} [{pct(interval[0])}, {pct(interval[1])}]",
            _num(entry.get("pruned"), ".1f"),
            _num(entry.get("tokens_layer0"), ".1f"),
            f"{_num(entry.get('gflops'), '.4g')} G ({_num(entry.get('flops_ratio'), '.2f')}x)",
        ]
        rows.append(cells)
        if entry.get("flops_ratio") is not None and not math.isnan(entry["overall"]):
            points.append(
                Point(
                    entry["name"],
                    entry["flops_ratio"],
                    entry["overall"] * 100,
                    *(v * 100 if v is not None else None for v in interval),
                    colour=PALETTE[index % len(PALETTE)],
                )
            )
    header = ["setting", *map(escape, categories), "overall", "pruned", "tokens L0", "prefill FLOPs"]
    parts = [
        f"<p>Scores in % ({level} bootstrap intervals over questions); Δ = setting − baseline, paired.</p>",
        table(header, rows, "wide"),
        scatter_chart(
            points, title="overall score against prefill FLOPs", x_label="FLOPs / baseline", y_label="overall score %"
        ),
    ]
    if data.get("families"):
        body = [
            [escape(f"{f['name']} ({f['seeds']} seeds)")]
            + [
                f"{pct(f['categories'][c]['mean'])} ± {pct(f['categories'][c]['spread'])}"
                for c in [*categories, "overall"]
            ]
            for f in data["families"]
        ]
        parts.append("<h4>Random control, over seeds (mean ± spread)</h4>")
        parts.append(table(["family", *map(escape, categories), "overall"], body))
    return "".join(parts)


def _sweep_rows(rows: Sequence[dict[str, Any]], datasets: Sequence[str]) -> list[list[str]]:
    out = []
    for row in rows:
        cells = [escape(row["setting"])]
        for name in datasets:
            cells.append(f"{pct(row['scores'].get(name))} (Δ {pct(row['deltas'].get(name))})")
        cells += [
            pct(row.get("mean_score")),
            _num(row.get("tokens_mean"), ".1f"),
            _num(row.get("flops_ratio"), ".2f"),
            _num(row.get("prefill_ms"), ".1f"),
            _num(row.get("time_ratio"), ".2f"),
        ]
        out.append(cells)
    return out


def sweep_html(section: Section) -> str:
    """The sweep table, score / FLOPs / time against the injection layer, and the scaling rows."""
    data = section.data
    datasets = list(data["datasets"])
    header = ["setting", *map(escape, datasets), "mean", "tokens/layer", "FLOPs ×", "prefill ms", "time ×"]
    parts = [
        "<p>Scores in %; Δ = setting − baseline (same run). FLOPs: theoretical prefill FLOPs / baseline; time: "
        "measured prefill / baseline.</p>",
        table(header, _sweep_rows(data["rows"], datasets), "wide"),
    ]
    inject = sorted((r for r in data["rows"] if r["kind"] == "inject"), key=lambda r: r["layer"])
    if inject:
        layers = [r["layer"] for r in inject]
        score_series = [
            Series(name, layers, [(r["scores"].get(name) or 0) * 100 for r in inject], PALETTE[i])
            for i, name in enumerate(datasets)
        ]
        score_series.append(Series("mean", layers, [r["mean_score"] * 100 for r in inject], "#000000"))
        cost = [Series("FLOPs ×", layers, [r["flops_ratio"] for r in inject], PALETTE[1])]
        if any(r.get("time_ratio") is not None for r in inject):
            cost.append(Series("time ×", layers, [r.get("time_ratio") for r in inject], PALETTE[2]))
        parts.append('<div class="charts">')
        parts.append(
            line_chart(score_series, title="score against injection layer", x_label="inject@k", y_label="score %")
        )
        parts.append(line_chart(cost, title="cost against injection layer", x_label="inject@k", y_label="× baseline"))
        points = [
            Point(r["setting"], r["flops_ratio"], r["mean_score"] * 100, colour=PALETTE[i % len(PALETTE)])
            for i, r in enumerate(data["rows"])
            if r.get("flops_ratio") is not None
        ]
        parts.append(
            scatter_chart(
                points, title="mean score against prefill FLOPs", x_label="FLOPs / baseline", y_label="mean score %"
            )
        )
        parts.append("</div>")
    if data.get("scaling_rows"):
        parts.append("<h4>Norm scaling: visual embeddings × scale</h4>")
        parts.append(table(header, _sweep_rows(data["scaling_rows"], datasets), "wide"))
    return "".join(parts)


# --------------------------------------------------------------------------- align
#: (column of layers.parquet, chart title, y label, log scale)
_ALIGN_CHARTS = (
    ("norm_mean", "mean norm per layer", "norm", True),
    ("best_cos", "layer-0 visual tokens: best cosine to text states", "cosine", False),
    ("norm_w1", "W1 distance of log-norms to text", "W1", False),
    ("direction_distance", "distance of mean directions to text", "distance", False),
    ("cross_layer_cos", "cos(layer 0, layer l) of each token", "cosine", False),
    ("readable_embedding", "readable by the embedding lens", "share", False),
    ("readable_logit", "readable by the logit lens", "share", False),
)


def align_html(section: Section) -> str:
    """The per-group summary table and one profile chart per measure (lines per group, against layer)."""
    summary, frame = section.data["summary"], section.data["layers"]
    group_rows = [
        [
            escape(name),
            str(g["tokens"]),
            _num(g["norm_layer0"], ".3g"),
            _num(g["norm_ratio_to_text_layer0"], ".3g"),
            str(g["norm_matched_layer"]),
            f"{g['best_cos_layer']} ({_num(g['best_cos_max'], '.3f')})",
            str(g["norm_w1_layer"]),
            str(g["direction_distance_layer"]),
            _num(g["cross_layer_cos_last"], ".3f"),
        ]
        for name, g in summary["groups"].items()
    ]
    header = [
        "group",
        "tokens",
        "norm at L0",
        "× text norm at L0",
        "norm-matched layer",
        "best-cos layer (max)",
        "norm-W1 layer",
        "direction layer",
        "cos(L0, last)",
    ]
    charts = []
    names = list(dict.fromkeys(frame["group"]))
    for column, title, label, log in _ALIGN_CHARTS:
        if column not in frame:
            continue
        series = []
        for index, name in enumerate(names):
            part = frame[frame["group"] == name].sort_values("layer")
            values = part[column].astype(float)
            if values.notna().any():
                colour = GROUP_HEX.get(name) or SET_HEX.get(name) or PALETTE[index % len(PALETTE)]
                series.append(Series(name, part["layer"].tolist(), [_none(v) for v in values], colour))
        if series:
            charts.append(line_chart(series, title=title, x_label="layer", y_label=label, log_y=log))
    return (
        table(header, group_rows, "wide")
        + f"<p>Focus group in the per-layer table: {escape(str(summary.get('focus_group')))}.</p>"
        + '<div class="charts">'
        + "".join(charts)
        + "</div>"
    )


def _none(value: float) -> float | None:
    return None if pd.isna(value) else float(value)
