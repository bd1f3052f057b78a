"""Text summaries of dataset-level taxonomy results, as ``embedlens stats`` and ``discover-anchors`` print them.

They live beside (not inside) :mod:`embedlens.taxonomy.stats` and :mod:`embedlens.taxonomy.discover`,
take the result object and return the text without a final newline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def stats_summary(summary: Any) -> str:
    """What ``embedlens stats`` prints for a finished run.

    Args:
        summary: The run's summary (:func:`embedlens.taxonomy.stats.run_stats`'s result): ``.data`` is
            the ``summary.json`` document and ``.files`` the written files.
    """
    data = summary.data
    images = data["images"]
    rule = data["rule"]
    level = data["intervals"]["confidence"]
    lines = [
        f"model    {data['model']}",
        f"dataset  {data['dataset']['source']}: {images['used']} images used of {images['total']}",
        f"rule     top-{rule['top_k']}, anchors {rule['anchors']} (precedence {' > '.join(rule['precedence'])})",
        "",
        f"  {'group':<9} {'tokens':>9}  {'share':>6}  {f'{level:.0%} interval (images resampled)':<30}",
    ]
    for name, entry in data["groups"].items():
        low, high = entry["ci"]
        lines.append(f"  {name:<9} {entry['tokens']:>9}  {entry['fraction']:>6.1%}  {low:.1%} .. {high:.1%}")
    lines.append(f"  {'total':<9} {data['tokens']:>9}")
    if images["skipped"]:
        lines += ["", f"skipped {images['skipped']} unreadable image(s):"]
        lines += [f"  {entry['key']}: {entry['reason']}" for entry in images["skipped_list"][:10]]
        if images["skipped"] > 10:
            lines.append(f"  ... and {images['skipped'] - 10} more (see images.parquet)")
    lines.append("")
    lines += [f"wrote {path}" for path in summary.files.values()]
    return "\n".join(lines)


def discovery_summary(found: Any, out: Path | None = None) -> str:
    """What ``embedlens discover-anchors`` prints: the evidence for every candidate id and the verdicts.

    Args:
        found: A :class:`embedlens.taxonomy.discover.Discovery`.
        out: Where the anchors were written (adds a ``wrote`` line), if anywhere.
    """
    lines = [
        f"model    {found.anchors.model}",
        f"images   {found.num_images} used, {len(found.skipped)} skipped; {found.num_tokens} visual tokens",
        f"layers   LLM-sink evidence at layer {found.sink_layer}, dead-token stability at layer {found.cross_layer}",
        "",
        f"  {'id':>7}  {'piece':<14} {'images':>6} {'indep':>6} {'norm x':>7} {'bos cos':>7} "
        f"{'massive':>7} {'stable':>6}  verdict",
    ]
    for c in found.candidates:
        verdict = c.group or "-"
        lines.append(
            f"  {c.id:>7}  {c.piece!r:<14} {c.image_fraction:>6.0%} {c.independence:>6.2f} {c.norm_ratio:>7.2f} "
            f"{c.bos_cosine:>7.2f} {c.massive_ratio:>7.1f} {c.cross_layer_cosine:>6.2f}  {verdict}: {c.reason}"
        )
    if not found.candidates:
        lines.append("  (no id recurs in enough images to be a candidate)")
    lines += [f"skipped  {entry.image}: {entry.reason}" for entry in found.skipped[:10]]
    lines += ["", "anchors  " + " | ".join(f"{name} {list(ids)}" for name, ids in found.anchors.groups.items())]
    if out is not None:
        lines.append(f"wrote {out}")
    return "\n".join(lines)
