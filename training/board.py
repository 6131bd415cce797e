"""A comparison board: one column per method (its images, its label, its scores underneath), and the same table
as text. Pure numpy / PIL (PIL's default font); the ComfyUI node is nodes/board_nodes.py."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

MISSING = "n/a"
NO_FACE = "no face"


def metric_keys(columns: Sequence[Optional[Mapping[str, Mapping]]]) -> list[str]:
    """Every metric name of any column, in order of first appearance."""
    keys: list[str] = []
    for metrics in columns:
        for k in metrics or {}:
            if k not in keys:
                keys.append(k)
    return keys


def metric_value(m: Optional[Mapping]) -> str:
    """One MetricResult dict as short text: '0.9612', '0.9612 (1 no face)', 'no face' (nothing scored because no
    generated image had a face) or 'n/a' (not computed, or not connected)."""
    if not m:
        return MISSING
    no_face = int(m.get("no_face") or 0)
    if m.get("mean") is None:
        return NO_FACE if no_face else MISSING
    text = f"{float(m['mean']):.4f}"
    return text + (f" ({no_face} no face)" if no_face else "")


def metric_lines(columns: Sequence[Optional[Mapping[str, Mapping]]]) -> list[list[str]]:
    """Per column, one 'name: value' line per metric of any column (so that the rows line up): a column without
    that metric (or without metrics) says n/a."""
    keys = metric_keys(columns)
    return [[f"{k}: {metric_value((metrics or {}).get(k))}" for k in keys] for metrics in columns]


def summary_table(labels: Sequence[str], columns: Sequence[Optional[Mapping[str, Mapping]]]) -> str:
    """The scores as a text table: a header row, then one row per method ('|'-separated, padded)."""
    keys = metric_keys(columns)
    rows = [["method", *keys]] + [[label, *[metric_value((m or {}).get(k)) for k in keys]]
                                  for label, m in zip(labels, columns)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"a board image must be (H, W, 3), got shape {a.shape}: pass one RGB image per tile")
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]


def _fit(font, text: str, width: int) -> str:
    """The text, cut with '…' to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def comparison_board(images: Sequence, labels: Sequence[str], metric_lines: Sequence[Sequence[str]] = (),
                     size: int = 384, columns: int = 0, font_size: int = 16, title: str = "") -> np.ndarray:
    """An (H, W, 3) uint8 board: per method one cell with its images (a (H, W, 3) array or a list of them,
    stacked vertically, each fitted into a ``size`` square on white), its label, and its ``metric_lines``
    underneath. ``columns``: cells per row (0: all in one row)."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(images)
    if n == 0:
        raise ValueError("no images for the comparison board: connect at least image_1")
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} image columns: give one label per column")
    lines = [list(metric_lines[i]) if i < len(metric_lines) else [] for i in range(n)]
    stacks = [[_as_uint8(x) for x in (imgs if isinstance(imgs, (list, tuple)) else [imgs])] for imgs in images]
    font = ImageFont.load_default(size=font_size)
    title_font = ImageFont.load_default(size=font_size + 4)
    pad, line = 8, font_size + 6
    tiles = max(len(s) for s in stacks)
    text_h = pad + line * (1 + max(len(x) for x in lines)) + pad
    cell_w, cell_h = size + 2 * pad, pad + tiles * (size + pad) + text_h
    per_row = min(n, columns) if columns and columns > 0 else n
    rows = -(-n // per_row)
    top = (font_size + 4 + 2 * pad) if title else 0
    board = Image.new("RGB", (per_row * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(board)
    if title:
        draw.text((pad, pad), _fit(title_font, title, board.width - 2 * pad), fill=(0, 0, 0), font=title_font)
    for i, (stack, label) in enumerate(zip(stacks, labels)):
        x0, y0 = (i % per_row) * cell_w + pad, top + (i // per_row) * cell_h + pad
        for j, arr in enumerate(stack):
            img = Image.fromarray(arr)
            scale = size / max(img.width, img.height)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.LANCZOS)
            ty = y0 + j * (size + pad)
            board.paste(img, (x0 + (size - img.width) // 2, ty + (size - img.height) // 2))
        y = y0 + tiles * (size + pad)
        draw.text((x0, y), _fit(font, str(label), size), fill=(0, 0, 0), font=font)
        for k, text in enumerate(lines[i]):
            color = (150, 150, 150) if text.endswith(MISSING) or text.endswith(NO_FACE) else (40, 40, 40)
            draw.text((x0, y + line * (k + 1)), _fit(font, text, size), fill=color, font=font)
        if i % per_row:
            draw.line((x0 - pad, y0 - pad, x0 - pad, y0 - pad + cell_h), fill=(210, 210, 210))
    return np.array(board, dtype=np.uint8)
