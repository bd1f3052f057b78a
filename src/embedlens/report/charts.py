"""Small inline SVG charts for the report: lines, scatter with error bars, interval bars, cell heatmaps.

Each function returns one ``<svg>`` element as text, sized in CSS pixels, with ``<title>`` children
so hovering a mark shows its exact value (no script needed). Nothing is fetched: fonts are the
page's, colours are given by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

#: A colour cycle for series without a colour of their own (Okabe-Ito, then greys).
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#f0e442", "#000000", "#777777")
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 12, 24, 40


@dataclass(frozen=True)
class Series:
    """One line: name, x and y values (NaN or None breaks the line), colour."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    colour: str


@dataclass(frozen=True)
class Point:
    """One scatter mark with an optional interval on y."""

    label: str
    x: float
    y: float
    low: float | None = None
    high: float | None = None
    colour: str = PALETTE[0]


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]``."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


class _Frame:
    """Maps data to pixels for one chart and draws its axes."""

    def __init__(self, xs: list[float], ys: list[float], width: int, height: int, log_y: bool) -> None:
        self.width, self.height, self.log_y = width, height, log_y and all(y > 0 for y in ys) and bool(ys)
        ys_t = [math.log10(y) for y in ys] if self.log_y else ys
        self.xt = nice_ticks(min(xs, default=0.0), max(xs, default=1.0))
        if self.log_y:
            low, high = math.floor(min(ys_t)), math.ceil(max(ys_t))
            self.yt = [float(v) for v in range(low, high + 1)] if high > low else [low, low + 1.0]
        else:
            self.yt = nice_ticks(min(ys_t, default=0.0), max(ys_t, default=1.0))

    def x(self, value: float) -> float:
        low, high = self.xt[0], self.xt[-1]
        return _LEFT + (value - low) / ((high - low) or 1) * (self.width - _LEFT - _RIGHT)

    def y(self, value: float) -> float:
        value = math.log10(value) if self.log_y else value
        low, high = self.yt[0], self.yt[-1]
        return self.height - _BOTTOM - (value - low) / ((high - low) or 1) * (self.height - _TOP - _BOTTOM)

    def axes(self, title: str, x_label: str, y_label: str) -> list[str]:
        w, h = self.width, self.height
        out = [f'<text x="{w / 2:.0f}" y="15" class="ct">{escape(title)}</text>']
        for tick in self.xt:
            px = self.x(tick)
            out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{_TOP}" y2="{h - _BOTTOM}" class="cg"/>')
            out.append(f'<text x="{px:.1f}" y="{h - _BOTTOM + 14}" class="cx">{_fmt(tick)}</text>')
        for tick in self.yt:
            py = self.y(10**tick if self.log_y else tick)
            label = _fmt(10**tick) if self.log_y else _fmt(tick)
            out.append(f'<line x1="{_LEFT}" x2="{w - _RIGHT}" y1="{py:.1f}" y2="{py:.1f}" class="cg"/>')
            out.append(f'<text x="{_LEFT - 4}" y="{py + 4:.1f}" class="cy">{label}</text>')
        out.append(f'<text x="{w / 2:.0f}" y="{h - 6}" class="cl">{escape(x_label)}</text>')
        suffix = " (log)" if self.log_y else ""
        out.append(
            f'<text x="12" y="{h / 2:.0f}" class="cl" transform="rotate(-90 12 {h / 2:.0f})">'
            f"{escape(y_label + suffix)}</text>"
        )
        return out


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(label)}">' + "".join(body) + "</svg>"
    )


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    log_y: bool = False,
    width: int = 380,
    height: int = 230,
) -> str:
    """Lines with dots, a legend under the title, and each dot's value on hover."""
    xs = _finite([x for s in series for x in s.xs])
    ys = _finite([y for s in series for y in s.ys])
    frame = _Frame(xs, ys, width, height, log_y)
    body = frame.axes(title, x_label, y_label)
    for index, s in enumerate(series):
        points = [
            (float(x), float(y)) for x, y in zip(s.xs, s.ys, strict=True) if y is not None and math.isfinite(float(y))
        ]
        path, previous = [], None
        for x, y in points:
            path.append(f"{'L' if previous is not None else 'M'}{frame.x(x):.1f},{frame.y(y):.1f}")
            previous = x
        if path:
            body.append(f'<path d="{" ".join(path)}" fill="none" stroke="{s.colour}" stroke-width="1.6"/>')
        for x, y in points:
            body.append(
                f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="2.4" fill="{s.colour}">'
                f"<title>{escape(s.name)}: {x:g} → {y:.4g}</title></circle>"
            )
        lx = _LEFT + 6 + (index % 4) * ((width - _LEFT) // 4)
        ly = _TOP + 10 + (index // 4) * 12
        body.append(f'<rect x="{lx}" y="{ly - 7}" width="8" height="8" fill="{s.colour}"/>')
        body.append(f'<text x="{lx + 11}" y="{ly}" class="lg">{escape(s.name)}</text>')
    return _svg(width, height, body, title)


def scatter_chart(
    points: Sequence[Point],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 420,
    height: int = 260,
) -> str:
    """Labelled marks with vertical interval bars (e.g. accuracy against FLOPs per setting)."""
    xs = _finite([p.x for p in points])
    ys = _finite([v for p in points for v in (p.y, p.low, p.high)])
    frame = _Frame(xs, ys, width, height, False)
    body = frame.axes(title, x_label, y_label)
    for point in points:
        if not (math.isfinite(point.x) and math.isfinite(point.y)):
            continue
        px, py = frame.x(point.x), frame.y(point.y)
        if point.low is not None and point.high is not None:
            body.append(
                f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{frame.y(point.low):.1f}" y2="{frame.y(point.high):.1f}" '
                f'stroke="{point.colour}" stroke-width="1.2"/>'
            )
        interval = f" [{point.low:.4g}, {point.high:.4g}]" if point.low is not None and point.high is not None else ""
        body.append(
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{point.colour}">'
            f"<title>{escape(point.label)}: x {point.x:.4g}, y {point.y:.4g}{interval}</title></circle>"
        )
        body.append(f'<text x="{px + 5:.1f}" y="{py - 5:.1f}" class="pl">{escape(point.label)}</text>')
    return _svg(width, height, body, title)


def interval_bars(
    items: Sequence[tuple[str, float, float, float, str]], *, title: str, width: int = 420, row: int = 22
) -> str:
    """Horizontal bars on ``[0, 1]`` with interval whiskers: ``(label, value, low, high, colour)`` each."""
    height = _TOP + row * len(items) + 24
    left, right = 90, width - 70
    body = [f'<text x="{width / 2:.0f}" y="15" class="ct">{escape(title)}</text>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        px = left + tick * (right - left)
        body.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{_TOP}" y2="{height - 20}" class="cg"/>')
        body.append(f'<text x="{px:.1f}" y="{height - 6}" class="cx">{tick:.0%}</text>')
    for index, (label, value, low, high, colour) in enumerate(items):
        y = _TOP + index * row
        body.append(f'<text x="{left - 6}" y="{y + row / 2 + 4:.1f}" class="cy">{escape(label)}</text>')
        body.append(
            f'<rect x="{left}" y="{y + 4}" width="{max(value, 0) * (right - left):.1f}" height="{row - 8}" '
            f'fill="{colour}" stroke="#444" stroke-width="0.5"><title>{escape(label)}: {value:.2%} '
            f"[{low:.2%}, {high:.2%}]</title></rect>"
        )
        lx, hx = left + low * (right - left), left + high * (right - left)
        mid = y + row / 2
        body.append(f'<line x1="{lx:.1f}" x2="{hx:.1f}" y1="{mid:.1f}" y2="{mid:.1f}" stroke="#000"/>')
        for px in (lx, hx):
            body.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{mid - 4:.1f}" y2="{mid + 4:.1f}" stroke="#000"/>')
        body.append(f'<text x="{right + 6}" y="{mid + 4:.1f}" class="lg">{value:.1%}</text>')
    return _svg(width, height, body, title)


def cell_heatmap(values: Sequence[Sequence[float]], colour: tuple[int, int, int], *, title: str, cell: int = 0) -> str:
    """A grid of cells shaded from white (0) to ``colour`` (1); each cell's value shows on hover."""
    rows, cols = len(values), len(values[0]) if values else 0
    size = cell or max(4, min(18, 216 // max(rows, cols, 1)))
    width, height = cols * size + 2, rows * size + 24
    body = [f'<text x="{width / 2:.0f}" y="14" class="ct">{escape(title)}</text>']
    r, g, b = colour
    for i, line in enumerate(values):
        for j, value in enumerate(line):
            share = min(max(float(value), 0.0), 1.0)
            fill = tuple(round(255 - share * (255 - c)) for c in (r, g, b))
            body.append(
                f'<rect x="{1 + j * size}" y="{20 + i * size}" width="{size}" height="{size}" '
                f'fill="rgb{fill}"><title>row {i}, col {j}: {float(value):.1%}</title></rect>'
            )
    body.append(f'<rect x="1" y="20" width="{cols * size}" height="{rows * size}" fill="none" stroke="#888"/>')
    return _svg(max(width, 120), height, body, title)
