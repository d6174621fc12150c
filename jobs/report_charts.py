"""Inline SVG charts for ``tokenmill report``: drawn here, no script, nothing fetched.

Each function returns one ``<svg>`` element as text; numbers are placed with plain arithmetic so the
page opens from disk in any browser.
"""

from __future__ import annotations

from html import escape

PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d",
           "#bab0ac"]


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _fmt(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:.1f}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.3g}"


def _legend(names: list[str], x: float, y: float) -> list[str]:
    out = []
    for i, name in enumerate(names):
        out.append(f'<rect x="{x}" y="{y + 16 * i}" width="10" height="10" fill="{color(i)}"/>'
                   f'<text x="{x + 14}" y="{y + 9 + 16 * i}" font-size="11">{escape(str(name))}</text>')
    return out


def bars(groups: list[str], series: dict[str, list[float]], title: str, width: int = 640, stacked: bool = True,
         target: dict[str, float] | None = None) -> str:
    """Bars per group (stacked series, or side by side); ``target``: a dashed line per series at a share."""
    height, left, top, bottom, legend = 240, 56, 24, 52, 130
    plot_w, plot_h = width - left - legend, height - top - bottom
    names = list(series)
    totals = [sum(series[n][g] for n in names) if stacked else max((series[n][g] for n in names), default=0)
              for g in range(len(groups))]
    top_value = max(totals + [1e-9])
    step = plot_w / max(len(groups), 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
           f'<text x="{left}" y="14" font-size="13" font-weight="bold">{escape(title)}</text>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>',
           f'<text x="{left - 6}" y="{top + 4}" font-size="10" text-anchor="end">{_fmt(top_value)}</text>',
           f'<text x="{left - 6}" y="{top + plot_h}" font-size="10" text-anchor="end">0</text>']
    for g, group in enumerate(groups):
        x, base = left + g * step + step * 0.15, top + plot_h
        w = step * 0.7 / (1 if stacked else max(len(names), 1))
        for i, name in enumerate(names):
            h = plot_h * series[name][g] / top_value
            bx = x if stacked else x + i * w
            y = base - h if stacked else top + plot_h - h
            out.append(f'<rect x="{bx:.1f}" y="{y:.1f}" width="{max(w, 1):.1f}" height="{h:.1f}" fill="{color(i)}">'
                       f'<title>{escape(f"{group} · {name}: {series[name][g]:,.4g}")}</title></rect>')
            if stacked:
                base -= h
        label = group if len(group) <= 14 else group[:13] + "…"
        out.append(f'<text x="{left + g * step + step / 2:.1f}" y="{top + plot_h + 14}" font-size="10" '
                   f'text-anchor="middle">{escape(label)}</text>')
    if target and stacked:
        level = top + plot_h
        for i, name in enumerate(names):
            level -= plot_h * target.get(name, 0.0) * (top_value and 1 / top_value)
            out.append(f'<line x1="{left}" y1="{level:.1f}" x2="{left + plot_w}" y2="{level:.1f}" '
                       f'stroke="{color(i)}" stroke-dasharray="4 3"/>')
    out += _legend(names, left + plot_w + 14, top)
    out.append("</svg>")
    return "".join(out)


def lines(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, width: int = 640,
          marks: list[tuple[float, str, str]] | None = None, log_y: bool = False) -> str:
    """Line per series over a shared x axis; ``marks``: (x, label, colour) vertical lines (rollbacks…)."""
    import math

    height, left, top, bottom, legend = 240, 56, 24, 40, 130
    plot_w, plot_h = width - left - legend, height - top - bottom
    points = [p for s in series.values() for p in s if math.isfinite(p[1]) and (p[1] > 0 or not log_y)]
    if not points:
        return f'<p class="empty">{escape(title)}: nothing recorded yet</p>'
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(fy(p[1]) for p in points), max(fy(p[1]) for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x: float) -> float:
        return left + plot_w * (x - x0) / (x1 - x0)

    def sy(y: float) -> float:
        return top + plot_h * (1 - (fy(y) - y0) / (y1 - y0))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
           f'<text x="{left}" y="14" font-size="13" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>',
           f'<text x="{left - 6}" y="{top + 4}" font-size="10" text-anchor="end">{_fmt(10 ** y1 if log_y else y1)}</text>',
           f'<text x="{left - 6}" y="{top + plot_h}" font-size="10" text-anchor="end">{_fmt(10 ** y0 if log_y else y0)}</text>',
           f'<text x="{left}" y="{top + plot_h + 14}" font-size="10">{_fmt(x0)}</text>',
           f'<text x="{left + plot_w}" y="{top + plot_h + 14}" font-size="10" text-anchor="end">{_fmt(x1)}</text>',
           f'<text x="{left + plot_w / 2}" y="{top + plot_h + 28}" font-size="10" text-anchor="middle">'
           f'{escape(x_label)}</text>']
    for x, label, stroke in marks or []:
        out.append(f'<line x1="{sx(x):.1f}" y1="{top}" x2="{sx(x):.1f}" y2="{top + plot_h}" stroke="{stroke}" '
                   f'stroke-dasharray="3 2"><title>{escape(label)}</title></line>')
    for i, (name, pts) in enumerate(series.items()):
        good = [p for p in pts if math.isfinite(p[1]) and (p[1] > 0 or not log_y)]
        if good:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            out.append(f'<polyline fill="none" stroke="{color(i)}" stroke-width="1.5" points="{path}">'
                       f'<title>{escape(str(name))}</title></polyline>')
    out += _legend(list(series), left + plot_w + 14, top)
    out.append("</svg>")
    return "".join(out)
