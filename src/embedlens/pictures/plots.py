"""Line plots of the alignment analysis and the injection sweep, written as PNGs.

Drawn with matplotlib's object API (:class:`matplotlib.figure.Figure`, no pyplot): no display, no
global backend switch, nothing left open after a figure is saved. Series colours and line styles come
from :data:`embedlens.pictures.colour.LINE_STYLES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from embedlens.files import atomic_path
from embedlens.pictures.colour import line_style
from embedlens.taxonomy.groups import TEXT_GROUPS

#: Resolution of the written PNGs.
DPI = 120


def save_figure(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG (atomically, cropped to its content) and return ``path``."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _series(rows: Sequence[dict[str, Any]], group: str, key: str) -> tuple[list[int], list[float]]:
    """Layers and values of ``key`` for ``group``'s rows that have it, by layer."""
    mine = sorted((r for r in rows if r["group"] == group and r.get(key) is not None), key=lambda r: r["layer"])
    return [r["layer"] for r in mine], [r[key] for r in mine]


def _groups(rows: Sequence[dict[str, Any]], visual_only: bool = True) -> list[str]:
    """Groups present in the rows, in order of appearance (without the text groups if ``visual_only``)."""
    present = list(dict.fromkeys(r["group"] for r in rows))
    return [g for g in present if not visual_only or g not in TEXT_GROUPS]


def plot_alignment(rows: Sequence[dict[str, Any]], summary: dict[str, Any], out: Path) -> list[Path]:
    """``norms.png``, ``alignment.png`` and ``readability.png`` from the alignment layer table.

    Args:
        rows: The layer table's rows (``group``, ``layer`` and one column per measure).
        summary: The analysis summary (``model``, ``images``, ``focus_group`` and per-group norms).
        out: Folder the three PNGs are written to.

    Returns:
        The paths written, in that order.
    """
    title = f"{summary['model']} · {summary['images']} images"
    return [
        save_figure(_norms_figure(rows, summary, title), out / "norms.png"),
        save_figure(_alignment_figure(rows, title), out / "alignment.png"),
        save_figure(_readability_figure(rows, title), out / "readability.png"),
    ]


def _norms_figure(rows: Sequence[dict[str, Any]], summary: dict[str, Any], title: str) -> Figure:
    figure = Figure(figsize=(7, 4.2))
    axis = figure.subplots()
    for group in _groups(rows, visual_only=False):
        colour, style = line_style(group)
        layers, values = _series(rows, group, "norm_mean")
        axis.plot(layers, values, style, color=colour, label=group, marker="." if group not in ("text",) else None)
    for group, info in summary["groups"].items():
        if info["norm_matched_layer"] is not None and group == summary["focus_group"]:
            axis.axhline(info["norm_layer0"], color=line_style(group)[0], linewidth=0.8, alpha=0.6)
            axis.axvline(info["norm_matched_layer"], color=line_style(group)[0], linewidth=0.8, alpha=0.6)
    axis.set_yscale("log")
    axis.set_xlabel("layer (0 = decoder input)")
    axis.set_ylabel("mean L2 norm")
    axis.set_title(f"Norm per layer ({title}); lines: {summary['focus_group']} at layer 0 and its matched layer")
    axis.legend(fontsize=8)
    return figure


def _alignment_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    figure = Figure(figsize=(15, 4.2))
    axes = figure.subplots(1, 3)
    measures = (
        ("best_cos", "mean best cosine to text states at l (higher = closer)"),
        ("norm_w1", "W1 of log-norms vs text at l (lower = closer)"),
        ("direction_distance", "mean-direction distance to text at l (lower = closer)"),
    )
    for axis, (key, label) in zip(axes, measures, strict=True):
        for group in _groups(rows):
            layers, values = _series(rows, group, key)
            axis.plot(layers, values, color=line_style(group)[0], marker=".", label=group)
        layers, values = _series(rows, "prompt", key)
        if layers:  # the text-to-text reference: prompt tokens at their own layer
            axis.plot(layers, values, ":", color=line_style("prompt")[0], label="prompt text at layer l (reference)")
        axis.set_xlabel("text layer l")
        axis.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Layer-0 visual tokens against the text hidden states of each layer ({title})")
    return figure


def _readability_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2)
    for group in _groups(rows):
        colour = line_style(group)[0]
        for key, style in (("readable_embedding", "-"), ("readable_logit", "--")):
            layers, values = _series(rows, group, key)
            if layers:
                axes[0].plot(layers, values, style, color=colour, marker=".", label=f"{group} ({key.split('_')[1]})")
        layers, values = _series(rows, group, "cross_layer_cos")
        axes[1].plot(layers, values, color=colour, marker=".", label=group)
    axes[0].set_title("share of tokens whose top-1 is a whole word", fontsize=9)
    axes[0].set_xlabel("layer")
    axes[0].legend(fontsize=7)
    axes[1].set_title("cos(token at layer 0, token at layer l)", fontsize=9)
    axes[1].set_xlabel("layer")
    axes[1].legend(fontsize=8)
    figure.suptitle(f"Readability and cross-layer change ({title})")
    return figure


def plot_sweep(rows: Sequence[dict[str, Any]], out: Path, *, title: str) -> Path:
    """``sweep.png``: accuracy and FLOPs (and measured prefill time) against the injection layer.

    ``rows`` are the sweep table's rows: ``kind`` is ``"inject"`` (with ``layer``), ``"baseline"`` or
    ``"skip"``; ``scores`` maps a dataset name to its overall score.
    """
    inject = sorted((r for r in rows if r["kind"] == "inject"), key=lambda r: r["layer"])
    others = [r for r in rows if r["kind"] in ("baseline", "skip")]
    names = list(dict.fromkeys(name for r in rows for name in r["scores"]))
    figure = Figure(figsize=(12, 4.2))
    axes = figure.subplots(1, 2)
    layers = [r["layer"] for r in inject]
    for name in names:
        line = axes[0].plot(layers, [r["scores"][name] * 100 for r in inject], marker="o", label=f"inject@k · {name}")
        if all("relaxed" in r for r in inject):
            relaxed = [r["relaxed"][name] * 100 for r in inject]
            axes[0].plot(layers, relaxed, "-.", marker="x", color=line[0].get_color(), label=f"relaxed · {name}")
        for r in others:
            style = "--" if r["kind"] == "baseline" else ":"
            axes[0].axhline(r["scores"][name] * 100, linestyle=style, color=line[0].get_color(), linewidth=0.9)
    axes[0].set_xlabel("injection layer k")
    axes[0].set_ylabel("score (%)")
    axes[0].set_title("accuracy (dash-dot: relaxed; dashed: baseline; dotted: early-layer skip)", fontsize=9)
    axes[0].legend(fontsize=8)
    axes[1].plot(layers, [r["flops_ratio"] for r in inject], marker="o", label="FLOPs / baseline")
    timed = [(r["layer"], r["time_ratio"]) for r in inject if r.get("time_ratio") is not None]
    if timed:
        axes[1].plot([t[0] for t in timed], [t[1] for t in timed], marker="s", label="prefill time / baseline")
    for r in others:
        if r["kind"] == "skip":
            axes[1].axhline(r["flops_ratio"], linestyle=":", color="#555555", label=f"{r['setting']} (FLOPs)")
    axes[1].set_xlabel("injection layer k")
    axes[1].set_ylim(bottom=0)
    axes[1].set_title("prefill cost relative to the baseline", fontsize=9)
    axes[1].legend(fontsize=8)
    figure.suptitle(title)
    return save_figure(figure, out / "sweep.png")
