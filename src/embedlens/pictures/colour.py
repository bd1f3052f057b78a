"""The colours of EmbedLens pictures, in one place.

* Groups (sink / dead / alive) have one fixed colour each, :data:`embedlens.taxonomy.groups.COLOURS`
  (Okabe-Ito); :func:`blend` is how a group map tints the image with them.
* Fractions in ``[0, 1]`` (the dataset heatmap and its colour bar) use matplotlib's viridis colour map,
  whose lightness grows monotonically with the value; NaN (no data) is :data:`NO_DATA`, hatched with
  :data:`HATCH`.
* The line plots (alignment, sweep) give each series a colour and a line style, :data:`LINE_STYLES`.
"""

from __future__ import annotations

import matplotlib
import numpy as np

RGB = tuple[int, int, int]

#: Name of the matplotlib colour map fractions are drawn with.
FRACTION_MAP = "viridis"
#: Heatmap colour of a cell without data (NaN), and of the hatch lines drawn over it.
NO_DATA: RGB = (210, 210, 210)
HATCH: RGB = (150, 150, 150)

#: Series of the alignment plots -> (matplotlib colour, line style); other series are dark grey lines.
LINE_STYLES: dict[str, tuple[str, str]] = {
    "visual": ("#555555", "-"),
    "alive": ("#1b9e77", "-"),
    "vit_sink": ("#d95f02", "-"),
    "llm_sink": ("#7570b3", "-"),
    "dead": ("#e7298a", "-"),
    "text": ("#000000", "--"),
    "prompt": ("#999999", ":"),
}
#: Style of a series :data:`LINE_STYLES` does not name.
DEFAULT_LINE: tuple[str, str] = ("#333333", "-")


def line_style(series: str) -> tuple[str, str]:
    """``(colour, line style)`` of a plotted series (:data:`LINE_STYLES`, else :data:`DEFAULT_LINE`)."""
    return LINE_STYLES.get(series, DEFAULT_LINE)


def fraction_colours(values: np.ndarray) -> np.ndarray:
    """Colours of fractions: matplotlib's viridis (dark to light) on ``[0, 1]``, :data:`NO_DATA` for NaN.

    Args:
        values: Fractions of any shape ``S``; values outside ``[0, 1]`` are clipped to it.

    Returns:
        uint8 RGB array of shape ``[*S, 3]``.
    """
    array = np.asarray(values, dtype=np.float64)
    missing = np.isnan(array)
    rgba = matplotlib.colormaps[FRACTION_MAP](np.clip(np.where(missing, 0.0, array), 0.0, 1.0))
    rgb = np.rint(np.asarray(rgba)[..., :3] * 255.0).astype(np.uint8)
    rgb[missing] = NO_DATA
    return rgb


def fraction_colour(value: float) -> RGB:
    """The colour of one fraction in ``[0, 1]`` (see :func:`fraction_colours`); :data:`NO_DATA` for NaN."""
    r, g, b = (int(v) for v in fraction_colours(np.asarray(float(value))))
    return r, g, b


def blend(base: RGB, colour: RGB, alpha: float) -> RGB:
    """A pixel tinted with ``colour``: ``round((1 - alpha) * base + alpha * colour)`` per channel."""
    mixed = (1.0 - alpha) * np.asarray(base, dtype=np.float64) + alpha * np.asarray(colour, dtype=np.float64)
    r, g, b = (int(v) for v in np.rint(mixed))
    return r, g, b
