"""A loss curve drawn with PIL: raw values in grey, a moving average in blue."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(values: list[float], width: int = 768, height: int = 384) -> np.ndarray:
    """(height, width, 3) float32 image in [0, 1]. An empty history gives a labelled blank plot."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 16, 24, height - 32
    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        d.text((left + 8, top + 8), "no loss values", fill=(0, 0, 0))
        return np.asarray(img, dtype=np.float32) / 255.0
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(values)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(n - 1, 1))
        y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
        return x, y

    def line(series: list[float], colour: tuple[int, int, int], w: int) -> None:
        pts = [xy(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        if len(pts) == 1:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        elif pts:
            d.line(pts, fill=colour, width=w)

    line(values, (170, 170, 170), 1)
    line(moving_average(values, max(1, n // 20)), (30, 90, 200), 2)
    d.text((4, top - 4), f"{hi:.4g}", fill=(0, 0, 0))
    d.text((4, bottom - 8), f"{lo:.4g}", fill=(0, 0, 0))
    d.text((left, bottom + 8), "step 1", fill=(0, 0, 0))
    d.text((right - 70, bottom + 8), f"step {n}", fill=(0, 0, 0))
    d.text((left + 8, 4), f"loss (last {values[-1]:.4g}, mean of last 10% {np.mean(finite[-max(1, n // 10):]):.4g})",
           fill=(0, 0, 0))
    return np.asarray(img, dtype=np.float32) / 255.0
