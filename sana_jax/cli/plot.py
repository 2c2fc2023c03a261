"""A PNG of a parity report: log10 relative error per activation, one line per (implementation, dtype)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_report(rows, names: list[str], path: str, title: str, target: float) -> None:
    """rows: parity Rows; names: activations in model order (x axis); a dashed line marks the fp32 target."""
    series = sorted({(r.impl, r.dtype) for r in rows}, key=lambda c: (c[1] != "float32", c))
    values = {(r.impl, r.dtype, r.name): r.rel for r in rows}
    width, height, left, right, top, bottom = 900, 480, 70, 220, 40, 120
    lo, hi = -9, 0  # log10 range of the y axis
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = width - left - right, height - top - bottom

    def y_of(rel):
        v = min(max(math.log10(rel) if rel > 0 else lo, lo), hi)
        return top + plot_h * (hi - v) / (hi - lo)

    def x_of(i):
        return left + plot_w * (i + 0.5) / max(len(names), 1)

    draw.text((left, 10), title, fill="black")
    for decade in range(lo, hi + 1):
        y = y_of(10.0 ** decade)
        draw.line([(left, y), (left + plot_w, y)], fill=(230, 230, 230))
        draw.text((8, y - 6), f"1e{decade}", fill="black")
    y_target = y_of(target)
    for x in range(left, left + plot_w, 12):
        draw.line([(x, y_target), (x + 6, y_target)], fill=(200, 0, 0))
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for i, name in enumerate(names):
        label = Image.new("RGBA", (bottom - 10, 12), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((0, 0), name, fill="black")
        label = label.rotate(90, expand=True)
        image.paste(label, (int(x_of(i)) - 6, top + plot_h + 4), label)
    for k, (impl, dtype) in enumerate(series):
        colour = _COLOURS[k % len(_COLOURS)]
        points = [(x_of(i), y_of(values[(impl, dtype, n)])) for i, n in enumerate(names)
                  if (impl, dtype, n) in values]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((left + plot_w + 12, top + 16 * k), f"{impl} {dtype}", fill=colour)
    draw.text((left + plot_w + 12, top + 16 * len(series) + 8), f"fp32 target {target:.0e}", fill=(200, 0, 0))
    image.save(path)
