"""One self-contained HTML report from EmbedLens output folders.

``write_report(run_dirs, out_path)`` reads each folder (see :mod:`.readers`), renders the static
sections in Python (:mod:`.sections`) and the probe panels' data as one JSON block that the inline
script (:mod:`.script`) turns into interactive grids. The page makes no network request of any kind:
pictures are ``data:`` URIs, there are no external fonts, scripts or styles, and a
Content-Security-Policy (``default-src 'none'``) forbids any fetch even if one were attempted.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image

from embedlens._version import __version__
from embedlens.errors import InputError
from embedlens.files import atomic_write_text
from embedlens.report.encode import TokenTable, encode_probe, finish_id_type, image_uri
from embedlens.report.readers import KINDS, Section, read_section
from embedlens.report.script import SCRIPT, STYLE
from embedlens.report.sections import (
    align_html,
    anchors_html,
    eval_html,
    provenance_html,
    stats_html,
    sweep_html,
)
from embedlens.result import VIEW_PNG
from embedlens.taxonomy.groups import ALIVE, ALL_GROUPS, CODES, COLOURS

#: Content-Security-Policy of the page: nothing may be fetched; inline script, style and data: images only.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_RENDERERS = {
    "stats": stats_html,
    "anchors": anchors_html,
    "eval": eval_html,
    "inject-sweep": sweep_html,
    "align": align_html,
}


@dataclass(frozen=True)
class ReportInfo:
    """What :func:`write_report` wrote.

    Attributes:
        path: The HTML file.
        bytes: Its size.
        sections: The kinds of the sections, in page order.
    """

    path: Path
    bytes: int
    sections: tuple[str, ...]


def save_view(view: Image.Image | None, directory: str | Path) -> Path | None:
    """Save the picture the model saw as ``view.png`` in a result folder (for the report), atomically.

    Single-layer ``probe`` / ``classify`` folders do not hold it; with it, the report draws the grid on
    exactly what the model saw rather than on the source image cropped to the grid's shape.
    """
    if view is None:
        return None
    from embedlens.files import atomic_path

    target = Path(directory) / VIEW_PNG
    with atomic_path(target) as tmp:
        view.save(tmp, format="PNG")
    return target


def _groups_json() -> dict[str, Any]:
    return {CODES[name]: {"name": name, "colour": list(COLOURS[name]), "paint": name != ALIVE} for name in ALL_GROUPS}


def _match_key(section: Section) -> tuple[str, str, tuple[int, int]]:
    probe = section.data["probe"]
    return (probe.results[0].provenance.model, probe.image, probe.grid)


def build_data(sections: Sequence[Section]) -> tuple[dict[str, Any], dict[int, list[str]]]:
    """The page's JSON data (token table, group colours, probe panels) and each probe section's panel ids
    (one panel per view of the image, each on that view's picture and grid, titled with the view's name
    when there are several).

    A probe folder without groups takes them from a classify folder of the same model, image and grid.
    """
    table = TokenTable()
    panels: list[dict[str, Any]] = []
    ids: dict[int, list[str]] = {}
    labelled = {_match_key(s): s for s in sections if s.kind == "classify"}
    for index, section in enumerate(sections):
        if section.kind not in ("probe", "classify"):
            continue
        groups = section.data["groups"]
        if groups is None and _match_key(section) in labelled:
            other = labelled[_match_key(section)]
            groups = other.data["groups"]
            section.notes.append(f"groups from {other.source} (the layer-0 rule)")
        probe = section.data["probe"]
        pictures = section.data.get("pictures") or [section.data["view"]]
        ids[index] = []
        for v, info in enumerate(probe.views):
            several = len(probe.views) > 1
            mine = groups[info.start : info.stop] if groups is not None and several else groups
            panel = encode_probe(probe.part(v) if several else probe, table, groups=mine)
            view = pictures[v] if v < len(pictures) else None
            panel.update(
                id=str(len(panels)),
                title=f"{section.title} · view {info.name}" if several else section.title,
                image=image_uri(view) if view is not None else None,
                imageSize=list(view.size) if view is not None else None,
            )
            ids[index].append(panel["id"])
            panels.append(panel)
    finish_id_type(panels, table)
    return {"version": 1, "tokens": table.to_dict(), "groups": _groups_json(), "panels": panels}, ids


def _section_html(index: int, section: Section, panel_ids: list[str] | None) -> str:
    notes = "".join(f'<p class="note">{escape(note)}</p>' for note in section.notes)
    if panel_ids is not None:
        names = [view.name for view in section.data["probe"].views] if len(panel_ids) > 1 else []
        body = "".join(
            (f'<h3 class="view">view {escape(names[i])}</h3>' if names else "")
            + f'<div class="probe" id="panel-{panel_id}"></div>'
            for i, panel_id in enumerate(panel_ids)
        )
    else:
        body = _RENDERERS[section.kind](section)
    return (
        f'<section class="sec" id="sec-{index}" data-kind="{escape(section.kind)}">'
        f'<h2><span class="kind">{escape(section.kind)}</span>{escape(section.title)}</h2>'
        f"{notes}{provenance_html(section)}{body}</section>"
    )


def _json_block(data: dict[str, Any]) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>``, no ``<!--``)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render_report(sections: Sequence[Section], *, title: str = "EmbedLens report") -> str:
    """The whole page as text."""
    data, panel_ids = build_data(sections)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    toc = "".join(
        f'<a href="#sec-{i}">{escape(s.kind)}: {escape(s.title.split(": ", 1)[-1])}</a>' for i, s in enumerate(sections)
    )
    body = "".join(_section_html(i, s, panel_ids.get(i)) for i, s in enumerate(sections))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>{escape(title)}</h1><p class='note'>Written by EmbedLens {escape(__version__)} on "
        f"{escape(created)} from {len(sections)} output(s). Works offline; nothing is fetched.</p>"
        f"<nav>{toc}</nav></header>{body}"
        f'<script type="application/json" id="embedlens-data">{_json_block(data)}</script>'
        f"<script>{SCRIPT}</script></body></html>"
    )


def write_report(
    run_dirs: Sequence[str | Path], out_path: str | Path, *, title: str = "EmbedLens report"
) -> ReportInfo:
    """Read EmbedLens outputs and write ONE self-contained HTML file (atomically).

    Args:
        run_dirs: Output folders of ``probe`` (single or multi-layer), ``classify``, ``stats``, ``eval``,
            ``align`` and ``inject-sweep``, and anchors JSON files of ``discover-anchors``, in any order;
            the page lists them by kind (probe, classify, anchors, stats, eval, inject-sweep, align),
            keeping the given order within a kind.
        out_path: The HTML file to write.
        title: The page's heading.

    Returns:
        The path written, its size and the kinds of its sections.

    Raises:
        InputError: For no outputs, or a path that is not an EmbedLens output.
    """
    if not run_dirs:
        raise InputError("give at least one output folder to report on")
    sections = [read_section(path) for path in run_dirs]
    sections.sort(key=lambda s: KINDS.index(s.kind))
    out_path = Path(out_path)
    if out_path.is_dir():
        raise InputError(f"--out must be a file, but {out_path} is a directory")
    text = render_report(sections, title=title)
    atomic_write_text(out_path, text)
    return ReportInfo(out_path, len(text.encode("utf-8")), tuple(s.kind for s in sections))
