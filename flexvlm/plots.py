"""Result pictures drawn with PIL (no plotting library needed): accuracy against cost, the paper's
Figure 1 kind of picture."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 720, 480, 60
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def accuracy_flops_plot(rows: list[dict], title: str = "accuracy vs cost per sample", log_x: bool = False) -> Image.Image:
    """A scatter of ``accuracy`` (with ``accuracy_std`` as an error bar) against ``mflops_per_sample``,
    one colour per mode and selection strategy, each point labelled with its ``config``. ``log_x``:
    a logarithmic cost axis, for costs that span orders of magnitude (several model sizes)."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    scale = math.log10 if log_x else (lambda v: v)
    xs = [scale(r["mflops_per_sample"]) for r in rows]
    spread = (max(xs) - min(xs)) or 1.0
    x_low, x_high = min(xs) - 0.05 * spread, max(xs) + 0.05 * spread
    left, right, top, bottom = MARGIN, WIDTH - 200, MARGIN // 2, HEIGHT - MARGIN

    def at(x: float, y: float) -> tuple[float, float]:
        """Pixel position of cost ``x`` (already on the axis' scale) and accuracy ``y``."""
        return (left + (x - x_low) / (x_high - x_low) * (right - left), bottom - y * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    for y in _ticks(0.0, 1.0, 6):
        draw.line([at(x_low, y), (at(x_low, y)[0] - 4, at(x_low, y)[1])], fill="black")
        draw.text((left - 34, at(x_low, y)[1] - 6), f"{y:.1f}", fill="black")
    for x in _ticks(x_low, x_high):
        draw.line([at(x, 0.0), (at(x, 0.0)[0], bottom + 4)], fill="black")
        draw.text((at(x, 0.0)[0] - 12, bottom + 8), f"{10 ** x if log_x else x:.1f}", fill="black")
    axis = "MFLOPs per sample" + (" (log scale)" if log_x else "")
    draw.text(((left + right) // 2 - 60, HEIGHT - 24), axis, fill="black")
    draw.text((8, top - 12), "accuracy", fill="black")
    draw.text((left, 4), title, fill="black")
    kinds = sorted({(r["mode"], r["selection"]) for r in rows})
    colour = {kind: COLOURS[i % len(COLOURS)] for i, kind in enumerate(kinds)}
    for i, row in enumerate(sorted(rows, key=lambda r: r["mflops_per_sample"])):
        cost = scale(row["mflops_per_sample"])
        x, y = at(cost, row["accuracy"])
        fill = colour[(row["mode"], row["selection"])]
        std = row.get("accuracy_std") or 0.0
        if std:
            low, high = max(0.0, row["accuracy"] - std), min(1.0, row["accuracy"] + std)  # within the axes
            draw.line([at(cost, low), at(cost, high)], fill=fill, width=2)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=fill, outline="black")
        # labels of neighbours staggered up and down, so that points at one accuracy stay legible
        draw.text((x + 7, y - 6 + 11 * (i % 3 - 1)), row["config"], fill=(60, 60, 60))
    for i, (mode, selection) in enumerate(kinds):  # the legend, right of the axes
        y = top + 10 + 18 * i
        draw.ellipse([right + 16, y, right + 26, y + 10], fill=colour[(mode, selection)], outline="black")
        draw.text((right + 32, y - 1), mode if selection == "-" else f"{mode} / {selection}", fill="black")
    return image
