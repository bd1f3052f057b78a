"""Every picture EmbedLens draws, in one place.

* :mod:`~embedlens.pictures.probe`: a probe result's top-1 token per patch over the image (``top1.png``).
* :mod:`~embedlens.pictures.groups`: one image's sink / dead / alive group map (``groups.png``).
* :mod:`~embedlens.pictures.heatmap`: a dataset's per-cell group shares, one panel per group (``heatmap.png``).
* :mod:`~embedlens.pictures.plots`: the alignment plots (``norms.png``, ``alignment.png``,
  ``readability.png``) and the injection sweep (``sweep.png``); matplotlib, imported only there.
* :mod:`~embedlens.pictures.colour`: group colours, the viridis fraction scale and plot line styles.
* :mod:`~embedlens.pictures.panels`: one panel per view of an image (multi-view families), side by side.

Pictures drawn over the image, or with exact pixel layouts, use PIL; line plots use matplotlib. Every
``save_*`` function writes a PNG atomically (temporary file, then rename) and returns its path.

Example:
    >>> from embedlens.pictures import save_group_map
    >>> save_group_map(session.classify("photo.jpg"), "groups.png")  # doctest: +SKIP
"""

from embedlens.pictures.groups import LegendEntry, draw_group_map, group_panels, legend_entries, save_group_map
from embedlens.pictures.heatmap import draw_group_heatmap, save_group_heatmap
from embedlens.pictures.panels import join_panels
from embedlens.pictures.probe import draw_top1_grid, save_top1_grid, top1_panels

__all__ = [
    "LegendEntry",
    "draw_group_heatmap",
    "draw_group_map",
    "draw_top1_grid",
    "group_panels",
    "join_panels",
    "legend_entries",
    "save_group_heatmap",
    "save_group_map",
    "save_top1_grid",
    "top1_panels",
]
