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


class _Axes:
    """Accuracy (0 to 1) against a cost or budget axis: the frame, the ticks, the labels."""

    def __init__(self, xs: list[float], x_label: str, title: str, log_x: bool) -> None:
        self.image = Image.new("RGB", (WIDTH, HEIGHT), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.scale = math.log10 if log_x else (lambda v: v)
        scaled = [self.scale(x) for x in xs]
        spread = (max(scaled) - min(scaled)) or 1.0
        self.x_low, self.x_high = min(scaled) - 0.05 * spread, max(scaled) + 0.05 * spread
        self.left, self.right, self.top, self.bottom = MARGIN, WIDTH - 200, MARGIN // 2, HEIGHT - MARGIN
        draw = self.draw
        draw.rectangle([self.left, self.top, self.right, self.bottom], outline="black")
        for y in _ticks(0.0, 1.0, 6):
            x0, y0 = self.at_scaled(self.x_low, y)
            draw.line([(x0, y0), (x0 - 4, y0)], fill="black")
            draw.text((self.left - 34, y0 - 6), f"{y:.1f}", fill="black")
        for x in _ticks(self.x_low, self.x_high):
            x0, y0 = self.at_scaled(x, 0.0)
            draw.line([(x0, y0), (x0, self.bottom + 4)], fill="black")
            value = 10**x if log_x else x
            draw.text((x0 - 12, self.bottom + 8), f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}", fill="black")
        draw.text(((self.left + self.right) // 2 - 60, HEIGHT - 24), x_label + (" (log scale)" if log_x else ""),
                  fill="black")
        draw.text((8, self.top - 12), "accuracy", fill="black")
        draw.text((self.left, 4), title, fill="black")

    def at_scaled(self, x: float, y: float) -> tuple[float, float]:
        """Pixel position of ``x`` (already on the axis' scale) and accuracy ``y``."""
        return (self.left + (x - self.x_low) / (self.x_high - self.x_low) * (self.right - self.left),
                self.bottom - y * (self.bottom - self.top))

    def point(self, x: float, accuracy: float, std: float, fill: tuple[int, int, int]) -> tuple[float, float]:
        """A dot with its +- std bar (within the axes) -> its pixel position."""
        cost = self.scale(x)
        if std:
            low, high = max(0.0, accuracy - std), min(1.0, accuracy + std)
            self.draw.line([self.at_scaled(cost, low), self.at_scaled(cost, high)], fill=fill, width=2)
        px, py = self.at_scaled(cost, accuracy)
        self.draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=fill, outline="black")
        return px, py

    def legend(self, names: list[str], colours: dict[str, tuple[int, int, int]]) -> None:
        for i, name in enumerate(names):  # right of the axes
            y = self.top + 10 + 18 * i
            self.draw.ellipse([self.right + 16, y, self.right + 26, y + 10], fill=colours[name], outline="black")
            self.draw.text((self.right + 32, y - 1), name, fill="black")


COSTS = {  # a row's cost key -> its axis label
    "mflops_per_sample": "MFLOPs per sample",
    "prefill_ms": "measured ms per sample to the first token",
    "decode_ms": "measured ms per sample per later token",
}


def accuracy_cost_plot(rows: list[dict], title: str = "accuracy vs cost per sample", log_x: bool = False,
                        cost: str = "mflops_per_sample") -> Image.Image:
    """A scatter of ``accuracy`` (with ``accuracy_std`` as an error bar) against a cost of each row
    (``cost``, a key of ``COSTS``: FLOPs by default, or a measured time), one colour per mode and
    selection strategy, each point labelled with its ``config``. ``log_x``: a logarithmic cost axis,
    for costs that span orders of magnitude (several model sizes)."""
    axes = _Axes([r[cost] for r in rows], COSTS[cost], title, log_x)
    kinds = sorted({r["mode"] if r["selection"] == "-" else f"{r['mode']} / {r['selection']}" for r in rows})
    colour = {kind: COLOURS[i % len(COLOURS)] for i, kind in enumerate(kinds)}
    for i, row in enumerate(sorted(rows, key=lambda r: r[cost])):
        kind = row["mode"] if row["selection"] == "-" else f"{row['mode']} / {row['selection']}"
        x, y = axes.point(row[cost], row["accuracy"], row.get("accuracy_std") or 0.0, colour[kind])
        # labels of neighbours staggered up and down, so that points at one accuracy stay legible
        axes.draw.text((x + 7, y - 6 + 11 * (i % 3 - 1)), row["config"], fill=(60, 60, 60))
    axes.legend(kinds, colour)
    return axes.image


def accuracy_lines_plot(series: dict[str, list[tuple[float, float, float]]],
                        title: str = "accuracy vs budget", x_label: str = "share of the high-res tokens kept",
                        log_x: bool = True) -> Image.Image:
    """One line per method: ``series`` method -> (budget or cost, accuracy, std) points, the paper's
    Figure-1 kind of picture (a method with one point is a dot); a logarithmic axis by default (budgets
    from 2.5 % to 40 %, costs over orders of magnitude)."""
    axes = _Axes([b for points in series.values() for b, _, _ in points], x_label, title, log_x)
    colour = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(series)}
    for name, points in series.items():
        pixels = [axes.point(b, accuracy, std, colour[name]) for b, accuracy, std in sorted(points)]
        if len(pixels) > 1:
            axes.draw.line(pixels, fill=colour[name], width=2)
    axes.legend(list(series), colour)
    return axes.image
