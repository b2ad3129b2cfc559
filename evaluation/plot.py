"""The reconstruction-editability plot of the paper's setups (Figure 7(a)), drawn with Pillow.

`draw_tradeoff_plot` takes the table of `evaluation.results.summarize` (one row per setup or reference,
with means and 95% intervals of both metrics) and writes a PNG whose text chunks hold the title and the
table as JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _axis_range(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(values), max(values)
    pad = 0.08 * (hi - lo) if hi - lo > 1e-9 else max(0.01, 0.05 * abs(lo))
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, target: int = 5) -> tuple[list[float], int]:
    """Round tick values (steps of 1, 2 or 5 x 10^k) and the decimals to print them with."""
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    ticks = [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
    return ticks, max(0, -math.floor(math.log10(step)))


PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def draw_tradeoff_plot(table: list[dict], path: str | Path, title: str) -> None:
    """Scatter of text similarity (x) against image similarity (y), 95% intervals as error bars: setups
    as circles, references as squares, a legend on the right (Figure 7(a) of the paper)."""
    width, height, left, right, top, bottom = 960, 640, 90, 250, 50, 70
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(15), _font(13)
    x0, x1 = _axis_range([r[k] for r in table for k in ("text_similarity", "text_ci_low", "text_ci_high")])
    y0, y1 = _axis_range([r[k] for r in table for k in ("image_similarity", "image_ci_low", "image_ci_high")])

    def px(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    xticks, xdec = _ticks(x0, x1)
    for x in xticks:
        draw.line([(px(x), top), (px(x), height - bottom)], fill=(225, 225, 225))
        draw.text((px(x), height - bottom + 6), f"{x:.{xdec}f}", fill="black", font=small, anchor="mt")
    yticks, ydec = _ticks(y0, y1)
    for y in yticks:
        draw.line([(left, py(y)), (width - right, py(y))], fill=(225, 225, 225))
        draw.text((left - 6, py(y)), f"{y:.{ydec}f}", fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text(((left + width - right) / 2, 12), title, fill="black", font=font, anchor="mt")
    draw.text(
        ((left + width - right) / 2, height - 20),
        "Text similarity (editability)",
        fill="black",
        font=font,
        anchor="ms",
    )
    label = Image.new("RGB", (height - top - bottom, 24), "white")
    ImageDraw.Draw(label).text(
        (label.width / 2, 12), "Image similarity (reconstruction)", fill="black", font=font, anchor="mm"
    )
    img.paste(label.rotate(90, expand=True), (8, top))

    for i, row in enumerate(table):
        color = PALETTE[i % len(PALETTE)]
        x, y = row["text_similarity"], row["image_similarity"]
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        cx, cy = px(x), py(y)
        for lo, hi, horizontal in (
            (row["text_ci_low"], row["text_ci_high"], True),
            (row["image_ci_low"], row["image_ci_high"], False),
        ):
            if horizontal:
                draw.line([(px(lo), cy), (px(hi), cy)], fill=color, width=2)
                for end in (px(lo), px(hi)):
                    draw.line([(end, cy - 4), (end, cy + 4)], fill=color, width=2)
            else:
                draw.line([(cx, py(lo)), (cx, py(hi))], fill=color, width=2)
                for end in (py(lo), py(hi)):
                    draw.line([(cx - 4, end), (cx + 4, end)], fill=color, width=2)
        _marker(draw, cx, cy, color, row["kind"] == "reference")
        ly = top + 10 + 24 * i
        _marker(draw, width - right + 20, ly, color, row["kind"] == "reference")
        draw.text((width - right + 32, ly), row["label"], fill="black", font=small, anchor="lm")
    from ldm.image_grid import save_image

    save_image(np.asarray(img), path, text={"title": title, "rows": json.dumps(table)})


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float, color, square: bool) -> None:
    box = [x - 6, y - 6, x + 6, y + 6]
    (draw.rectangle if square else draw.ellipse)(box, fill=color, outline="black")
