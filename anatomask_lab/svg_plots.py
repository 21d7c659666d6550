"""Dependency-free SVG box plots, small and readable when a committed markdown file shows them as images.

Pure string building (standard library only). A box spans the quartiles (linear interpolation, numpy's default
``"linear"`` method) with a line at the median; whiskers reach the most extreme values within 1.5 IQR of the box;
values beyond are drawn as dots. NaN values are left out; values outside ``y_range`` are drawn at its edge. Every
box is a ``<rect class="box">`` so that tests and scripts can count them. Text is escaped for XML.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

__all__ = ["box_plot_panels_svg", "box_plot_svg", "box_stats", "nice_ticks"]

PALETTE = ("#4C78A8", "#F58518", "#54A24B", "#B279A2", "#E45756", "#72B7B2", "#9D755D", "#EECA3B")
_FONT = 'font-family="Helvetica, Arial, sans-serif"'
_PLOT_H, _TOP, _LEFT, _GROUP_W, _PANEL_GAP = 220, 44, 58, 72, 16


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Quantile of sorted values by linear interpolation between closest ranks (numpy's default)."""
    position = q * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def box_stats(values: Sequence[float]) -> dict[str, float | int | list[float]] | None:
    """Median, quartiles, 1.5 IQR whiskers and outliers of the finite values (None when there is none).

    Args:
        values: Numbers; NaN and infinities are left out.

    Returns:
        ``{"n", "median", "q1", "q3", "low", "high", "outliers"}`` where ``low`` / ``high`` are the whisker ends.
    """
    ordered = sorted(float(v) for v in values if math.isfinite(float(v)))
    if not ordered:
        return None
    q1, median, q3 = (_quantile(ordered, q) for q in (0.25, 0.5, 0.75))
    fence_low, fence_high = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    inside = [v for v in ordered if fence_low <= v <= fence_high]
    return {"n": len(ordered), "median": median, "q1": q1, "q3": q3, "low": inside[0], "high": inside[-1],
            "outliers": [v for v in ordered if v < fence_low or v > fence_high]}


def nice_ticks(low: float, high: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering ``[low, high]``."""
    if not high > low:
        raise ValueError(f"y range must have high > low, got ({low}, {high})")
    raw = (high - low) / max(target, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9)
    return [round(k * step, 10) for k in range(first, math.floor(high / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.1f}" if abs(value) < 1e4 else f"{value:.0f}"


def _tick_label(value: float) -> str:
    return f"{value:g}"


def _text(x: float, y: float, content: str, size: int = 11, anchor: str = "middle", extra: str = "") -> str:
    return (f'<text x="{_fmt(x)}" y="{_fmt(y)}" font-size="{size}" text-anchor="{anchor}" {_FONT}{extra}>'
            f"{escape(content)}</text>")


def _box(stats: dict, x: float, to_y, colour: str, name: str) -> list[str]:
    """SVG elements of one box centred at ``x``; ``to_y`` maps a value to a pixel row."""
    half, cap = 16, 8
    top, bottom = to_y(stats["q3"]), to_y(stats["q1"])
    tooltip = escape(f"{name}: n={stats['n']}, median {stats['median']:.3g}, IQR {stats['q1']:.3g}-{stats['q3']:.3g}")
    parts = [
        f'<line x1="{_fmt(x)}" y1="{_fmt(to_y(stats["high"]))}" x2="{_fmt(x)}" y2="{_fmt(top)}" stroke="#444"/>',
        f'<line x1="{_fmt(x)}" y1="{_fmt(bottom)}" x2="{_fmt(x)}" y2="{_fmt(to_y(stats["low"]))}" stroke="#444"/>',
        *(f'<line x1="{_fmt(x - cap)}" y1="{_fmt(to_y(v))}" x2="{_fmt(x + cap)}" y2="{_fmt(to_y(v))}" '
          f'stroke="#444"/>' for v in (stats["low"], stats["high"])),
        f'<rect class="box" x="{_fmt(x - half)}" y="{_fmt(top)}" width="{2 * half}" '
        f'height="{_fmt(max(bottom - top, 1.0))}" fill="{colour}" fill-opacity="0.55" stroke="{colour}" '
        f'stroke-width="1.5"><title>{tooltip}</title></rect>',
        f'<line x1="{_fmt(x - half)}" y1="{_fmt(to_y(stats["median"]))}" x2="{_fmt(x + half)}" '
        f'y2="{_fmt(to_y(stats["median"]))}" stroke="#222" stroke-width="2"/>',
    ]
    parts += [f'<circle class="outlier" cx="{_fmt(x)}" cy="{_fmt(to_y(v))}" r="2.5" fill="none" '
              f'stroke="{colour}"/>' for v in stats["outliers"]]
    return parts


def _panel_width(groups: Mapping[str, Sequence[float]], title: str) -> float:
    """Room for the boxes and for the panel title (about 7 px a character at 12 px bold)."""
    return max(_GROUP_W * len(groups), 7.0 * len(title) + 8)


def _panel(groups: Mapping[str, Sequence[float]], x0: float, title: str, y_range: tuple[float, float],
           colours: Mapping[str, str], rotate: bool) -> list[str]:
    """Elements of one panel whose plot area starts at pixel column ``x0``."""
    low, high = y_range
    width = _panel_width(groups, title)
    step = width / len(groups)

    def to_y(value: float) -> float:
        clamped = min(max(value, low), high)
        return _TOP + _PLOT_H * (high - clamped) / (high - low)

    parts = [f'<rect x="{_fmt(x0)}" y="{_TOP}" width="{_fmt(width)}" height="{_PLOT_H}" fill="#f7f7f7" stroke="#bbb"/>']
    for tick in nice_ticks(low, high):
        y = to_y(tick)
        parts.append(f'<line x1="{_fmt(x0)}" y1="{_fmt(y)}" x2="{_fmt(x0 + width)}" y2="{_fmt(y)}" stroke="#e2e2e2"/>')
    if title:
        parts.append(_text(x0 + width / 2, _TOP - 8, title, size=12, extra=' font-weight="bold"'))
    label_y = _TOP + _PLOT_H + 16
    for i, (name, values) in enumerate(groups.items()):
        x = x0 + step * (i + 0.5)
        stats = box_stats(values)
        if stats is None:
            parts.append(_text(x, _TOP + _PLOT_H / 2, "no data", size=10, extra=' fill="#888"'))
        else:
            parts += _box(stats, x, to_y, colours[name], name)
        n_label = f"n={stats['n'] if stats else 0}"
        if rotate:
            parts.append(_text(x + 4, label_y - 4, f"{name} ({n_label})", anchor="end",
                               extra=f' transform="rotate(-35 {_fmt(x + 4)} {_fmt(label_y - 4)})"'))
        else:
            parts.append(_text(x, label_y, name))
            parts.append(_text(x, label_y + 13, n_label, size=9, extra=' fill="#666"'))
    return parts


def box_plot_panels_svg(panels: Mapping[str, Mapping[str, Sequence[float]]], title: str, y_label: str,
                        y_range: tuple[float, float] = (0.0, 1.0)) -> str:
    """Side-by-side box-plot panels sharing one y axis (e.g. one panel per label setting).

    Args:
        panels: Panel title -> (group label -> values). A group keeps its colour in every panel.
        title: Title above the figure.
        y_label: Label of the y axis.
        y_range: Bottom and top of the y axis; values outside are drawn at the edge.

    Returns:
        A standalone SVG document.

    Raises:
        ValueError: for no panels, a panel without groups, or ``y_range`` with top <= bottom.
    """
    if not panels or any(not groups for groups in panels.values()):
        raise ValueError("box plot needs at least one panel and one group per panel")
    low, high = float(y_range[0]), float(y_range[1])
    ticks = nice_ticks(low, high)
    names = list(dict.fromkeys(name for groups in panels.values() for name in groups))
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    rotate = max(len(name) for name in names) > 10
    label_px = 6.2 * (max(len(name) for name in names) + 7)  # rotated labels carry " (n=..)"
    bottom = round(_TOP + _PLOT_H + (label_px * 0.58 + 16 if rotate else 36))
    left = max(_LEFT, label_px * 0.82 - _GROUP_W / 2 + 8) if rotate else _LEFT
    body, x0 = [], left
    for panel_title, groups in panels.items():
        body += _panel(groups, x0, panel_title, (low, high), colours, rotate)
        x0 += _panel_width(groups, panel_title) + _PANEL_GAP
    width = max(x0 - _PANEL_GAP + 12, 7.5 * len(title) + 20)
    axis = [_text(left - 6, _TOP + _PLOT_H * (high - t) / (high - low) + 4, _tick_label(t), size=10, anchor="end")
            for t in ticks]
    label_x, mid = left - 42, _TOP + _PLOT_H / 2
    axis.append(_text(label_x, mid, y_label, size=11, extra=f' transform="rotate(-90 {_fmt(label_x)} {_fmt(mid)})"'))
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_fmt(width)}" height="{bottom}" '
            f'viewBox="0 0 {_fmt(width)} {bottom}" role="img" aria-label={quoteattr(title)}>',
            f"<title>{escape(title)}</title>",
            '<rect width="100%" height="100%" fill="white"/>',
            _text(width / 2, 18, title, size=13, extra=' font-weight="bold"')]
    return "\n".join([*head, *axis, *body, "</svg>"]) + "\n"


def box_plot_svg(groups: Mapping[str, Sequence[float]], title: str, y_label: str,
                 y_range: tuple[float, float] = (0.0, 1.0)) -> str:
    """One box per group: median, quartiles, 1.5 IQR whiskers, outlier dots, group labels and y ticks.

    Args:
        groups: Group label -> values, drawn left to right in the mapping's order.
        title: Title above the plot.
        y_label: Label of the y axis.
        y_range: Bottom and top of the y axis.

    Returns:
        A standalone SVG document (a string).
    """
    return box_plot_panels_svg({"": groups}, title, y_label, y_range)
