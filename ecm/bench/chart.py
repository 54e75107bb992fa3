"""The PNG chart of ``ecm-bench``: seconds per image per backend, one panel per model, the floor marked."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

WIDTH, LABEL_W, MARGIN, BAR_H, GAP = 1100, 280, 20, 22, 8
BAR, FLOOR, GRID, TEXT = (70, 120, 190), (210, 40, 40), (225, 225, 225), (20, 20, 20)


def log_ticks(low: float, high: float) -> list[float]:
    """Ticks at 1, 2 and 5 times the powers of ten from the decade below ``low`` to the one above ``high``."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    ticks = [m * 10.0**e for e in range(first, last) for m in (1, 2, 5)]
    return [*ticks, 10.0**last]


def draw_chart(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars of each model's s/img per backend on a log scale, a red mark at each row's analytic floor."""
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    models = list(result["models"].values())
    panel_h = [60 + len(m["rows"]) * (BAR_H + GAP) + 30 for m in models]
    height = 50 + sum(panel_h)
    img = Image.new("RGB", (WIDTH, height), "white")
    d = ImageDraw.Draw(img)
    m = result["machine"]
    d.text((MARGIN, 12), "ecm-bench: seconds per image, batch 1, log scale (bar: best round; red mark: analytic "
           f"floor at {m['matmul_gflops']:.0f} GFLOP/s, {m['memory_gbps']:.1f} GB/s)", fill=TEXT, font=font)
    y = 50
    plot_w = WIDTH - LABEL_W - 2 * MARGIN - 70
    for model, h in zip(models, panel_h):
        d.text((MARGIN, y), f"{model['title']}: {model['description']}", fill=TEXT, font=font)
        values = [v for r in model["rows"] for v in (r["s_per_img"], r["floor_s"])]
        ticks = log_ticks(min(values), max(values))
        x0, y_bars = MARGIN + LABEL_W, y + 30
        y_end = y_bars + len(model["rows"]) * (BAR_H + GAP)

        def at(seconds: float, x0: float = x0, ticks: list[float] = ticks) -> float:
            return x0 + plot_w * math.log(seconds / ticks[0]) / math.log(ticks[-1] / ticks[0])

        for t in ticks:
            x = at(t)
            d.line([(x, y_bars - 4), (x, y_end)], fill=GRID)
            d.text((x - 10, y_end + 2), f"{t:g}", fill=TEXT, font=small)
        for i, r in enumerate(model["rows"]):
            yb = y_bars + i * (BAR_H + GAP)
            d.text((MARGIN, yb + 3), r["label"], fill=TEXT, font=font)
            d.rectangle([x0, yb, at(r["s_per_img"]), yb + BAR_H], fill=BAR)
            xf = at(r["floor_s"])
            d.line([(xf, yb - 3), (xf, yb + BAR_H + 3)], fill=FLOOR, width=3)
            d.text((at(r["s_per_img"]) + 6, yb + 3), f"{r['s_per_img']:.3g} s ({r['x_floor']:.1f}x floor)",
                   fill=TEXT, font=small)
        y += h
    img.save(path)
