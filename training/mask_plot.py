"""The active rank of merge masks per layer, drawn like DuoLoRA's Figure 4 (pure numpy + PIL).

For each layer the content merger m_c and the style merger m_s are vectors (ZipRank: one number per rank
component; ZipLoRA: one per output unit; naive: one scalar). A component is *active* when |m| > threshold, and a
mask's active rank is the count of active components. Figure 4 of the paper plots, for the content-dominant
(low-resolution) and the style-dominant (high-resolution) layers separately, how often each active rank occurs in
m_c and in m_s after merging; a good merge has Rank(m_c) > Rank(m_s) on content layers and the reverse on style
layers.

- ``mask_rank_table(masks, kinds, threshold)``: one row per layer, in U-Net order.
- ``mask_rank_summary(...)``: the same as a few lines of text.
- ``render_mask_ranks(...)``: an (H, W, 3) uint8 image: the two histograms (content-dominant and style-dominant
  layers) above a strip with one column per layer (content's active rank up, style's down).

``masks`` is ``{layer: {"c": [...], "s": [...]}}`` (``LoraMerger.masks()`` or the ``idlora_masks`` metadata of a
merged file); ``kinds`` is ``{layer: "content" | "style" | "other"}`` (a ``(kind, size)`` pair is accepted too, as
``LoraMerger.layer_kinds`` holds); layers missing from ``kinds`` count as "other".
"""
from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KINDS = ("content", "style", "other")
CONTENT_COLOR = (46, 104, 200)   # bars of the content merger m_c
STYLE_COLOR = (226, 112, 24)     # bars of the style merger m_s
_KIND_TINT = {"content": (226, 234, 248), "style": (251, 236, 222), "other": (238, 238, 238)}
_INK, _GRID, _WHITE = (20, 20, 20), (200, 200, 200), (255, 255, 255)
_UNITS = {"ziprank": "active rank", "ziplora": "active output units", "naive": "active weights"}
MIN_WIDTH, MIN_HEIGHT = 360, 240


# -- the table -------------------------------------------------------------------------------------

def unet_order(name: str) -> tuple:
    """Sort key putting layers in U-Net order: embeddings, input (down) blocks, the middle block, output (up) blocks,
    the rest; block and layer numbers compare as numbers. Knows ComfyUI's and diffusers' block names."""
    groups = (("time_embed", 0), ("label_emb", 0), ("time_embedding", 0), ("add_embedding", 0),
              ("input_blocks", 1), ("down_blocks", 1), ("middle_block", 2), ("mid_block", 2),
              ("output_blocks", 3), ("up_blocks", 3))
    head = name.split(".", 1)[0]
    group = next((g for prefix, g in groups if head == prefix), 4 if name else 0)
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[._]", name))
    return group, parts


def _kind(value) -> str:
    kind = value[0] if isinstance(value, (tuple, list)) else value
    if kind not in KINDS:
        raise ValueError(f"layer kind {kind!r} is unknown: use one of {KINDS}")
    return kind


def _vector(name: str, entry, tag: str) -> np.ndarray:
    label = "content" if tag == "c" else "style"
    if not isinstance(entry, dict) or tag not in entry:
        if isinstance(entry, dict) and f"{tag}_mean" in entry:
            raise ValueError(f"layer {name!r} has only the mean of its {label} mask ({tag}_mean), as a ZipLoRA merge's "
                             f"file metadata keeps it: plot the full masks (LoraMerger.masks()) instead")
        raise ValueError(f"layer {name!r}: expected {{'c': [...], 's': [...]}} (the content and style masks), got "
                         f"{type(entry).__name__} {str(entry)[:60]}")
    try:
        v = np.asarray(entry[tag], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"layer {name!r}: the {label} mask is not a list of numbers ({e})") from None
    if v.size == 0:
        raise ValueError(f"layer {name!r}: the {label} mask is empty")
    if not np.isfinite(v).all():
        raise ValueError(f"layer {name!r}: the {label} mask has non-finite values (a diverged merge?)")
    return v


def _check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold = {threshold!r} is invalid: use a number >= 0 (|m| > threshold is active)")


def mask_rank_table(masks: dict, kinds: dict | None = None, threshold: float = 0.5) -> list[dict]:
    """One row per layer, in U-Net order: name, kind, rank_c / rank_s (the masks' lengths), active_c / active_s
    (entries with |m| > threshold), mean_c / mean_s (the masks' plain means). ValueError on empty or malformed
    input."""
    _check_threshold(threshold)
    if not masks:
        raise ValueError("no masks to plot: pass {layer: {'c': [...], 's': [...]}} of a merge (LoraMerger.masks())")
    kinds = kinds or {}
    rows = []
    for name in sorted(masks, key=unet_order):
        c, s = _vector(name, masks[name], "c"), _vector(name, masks[name], "s")
        rows.append(dict(name=name, kind=_kind(kinds.get(name, "other")), rank_c=int(c.size), rank_s=int(s.size),
                         active_c=int((np.abs(c) > threshold).sum()), active_s=int((np.abs(s) > threshold).sum()),
                         mean_c=float(c.mean()), mean_s=float(s.mean())))
    return rows


def mask_rank_summary(masks: dict, kinds: dict | None = None, threshold: float = 0.5, method: str = "ziprank") -> str:
    """A few lines: per kind, the number of layers, the mean active counts of m_c and m_s, and in how many layers
    the dominant concept's mask has the larger active count (Figure 4's claim)."""
    rows = mask_rank_table(masks, kinds, threshold)
    unit = _units(method)
    lines = [f"{unit} (|m| > {threshold:g}) of the content merger m_c and the style merger m_s, {len(rows)} layers"]
    for kind in KINDS:
        group = [r for r in rows if r["kind"] == kind]
        if not group:
            continue
        ac = float(np.mean([r["active_c"] for r in group]))
        as_ = float(np.mean([r["active_s"] for r in group]))
        c_wins = sum(r["active_c"] > r["active_s"] for r in group)
        s_wins = sum(r["active_s"] > r["active_c"] for r in group)
        lines.append(f"{kind}: {len(group)} layers, mean {unit} m_c {ac:.2f} vs m_s {as_:.2f}; "
                     f"m_c larger in {c_wins}, m_s larger in {s_wins}, equal in {len(group) - c_wins - s_wins}")
    return "\n".join(lines)


def _units(method: str) -> str:
    if method not in _UNITS:
        raise ValueError(f"method = {method!r} is unknown: use one of {tuple(_UNITS)}")
    return _UNITS[method]


# -- the image -------------------------------------------------------------------------------------

def mask_plot_layout(width: int, height: int) -> dict[str, tuple[int, int, int, int]]:
    """Pixel boxes (x0, y0, x1, y1) of the plot areas: "content" and "style" (the histograms' bar areas) and
    "strip" (the per-layer bars; its vertical middle is the zero line)."""
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"the image must be at least {MIN_WIDTH}x{MIN_HEIGHT} px, got {width}x{height}")
    top = 40                                   # title and legend
    strip_h = max(60, int(height * 0.28))
    hist_bottom = height - strip_h - 44        # room for the bins' labels and the strip's caption
    left, gap, right = 40, 44, width - 12
    mid = (left + right) // 2
    hist_top = top + 22                        # room for the panel titles
    strip_top = hist_bottom + 44
    return {"content": (left, hist_top, mid - gap // 2, hist_bottom),
            "style": (mid + gap // 2 + 28, hist_top, right, hist_bottom),
            "strip": (left, strip_top, right, height - 14)}


def _fit(d: ImageDraw.ImageDraw, font, xy, options: tuple[str, ...], max_w: float) -> None:
    """Draw the first of ``options`` that fits in ``max_w`` px (the last one cut short if none does)."""
    for text in options:
        if d.textlength(text, font=font) <= max_w:
            break
    else:
        while text and d.textlength(text + "..", font=font) > max_w:
            text = text[:-1]
        text += ".."
    d.text(xy, text, fill=_INK, font=font)


def _bins(hi: int) -> list[tuple[int, int]]:
    """Inclusive integer bins covering 0..hi: one per value when there are few, else about 16 equal ones."""
    step = max(1, math.ceil((hi + 1) / 16))
    return [(lo, min(lo + step - 1, hi)) for lo in range(0, hi + 1, step)]


def _histogram(d: ImageDraw.ImageDraw, font, box, rows: list[dict], titles: tuple[str, ...], unit: str,
               bins: list[tuple[int, int]]) -> None:
    x0, y0, x1, y1 = box
    _fit(d, font, (x0, y0 - 18), titles, x1 - x0)
    d.line([(x0, y1), (x1, y1)], fill=_INK)
    d.line([(x0, y0), (x0, y1)], fill=_INK)
    if not rows:
        d.text((x0 + 8, (y0 + y1) // 2), "no layers of this kind", fill=_INK, font=font)
        return
    counts = {tag: [sum(lo <= r[f"active_{tag}"] <= hi for r in rows) for lo, hi in bins] for tag in ("c", "s")}
    top = max(max(counts["c"]), max(counts["s"]))
    for frac in (0.5, 1.0):
        y = y1 - (y1 - y0 - 4) * frac
        d.line([(x0 + 1, y), (x1, y)], fill=_GRID)
        d.text((x0 - 30, y - 6), f"{top * frac:g}", fill=_INK, font=font)
    slot = (x1 - x0 - 4) / len(bins)
    bar = max(1.0, slot * 0.4)
    label_every = max(1, math.ceil(len(bins) * 34 / max(1, x1 - x0)))
    for i, (lo, hi) in enumerate(bins):
        sx = x0 + 2 + i * slot + slot * 0.1
        for j, (tag, colour) in enumerate((("c", CONTENT_COLOR), ("s", STYLE_COLOR))):
            n = counts[tag][i]
            if n:
                h = max(1.0, (y1 - y0 - 4) * n / top)
                bx = sx + j * bar
                d.rectangle([bx, y1 - h, bx + max(bar - 1, 0), y1 - 1], fill=colour)
        if i % label_every == 0:
            d.text((sx, y1 + 3), str(lo) if lo == hi else f"{lo}-{hi}", fill=_INK, font=font)
    d.text((x1 - d.textlength(unit, font=font), y1 + 16), unit, fill=_INK, font=font)


def _strip(d: ImageDraw.ImageDraw, font, box, rows: list[dict], unit: str) -> None:
    x0, y0, x1, y1 = box
    _fit(d, font, (x0, y0 - 16), (f"per layer, U-Net order (input, middle, output blocks): m_c {unit} up, m_s down; "
                                  f"background: layer kind (blue content, orange style, grey other)",
                                  f"per layer, U-Net order: m_c {unit} up, m_s down; background: layer kind",
                                  f"per layer: m_c up, m_s down"), x1 - x0)
    zero = (y0 + y1) // 2
    half = (y1 - y0) / 2 - 1
    top = max(max(max(r["active_c"], r["active_s"]) for r in rows), 1)
    w = (x1 - x0) / len(rows)
    for i, r in enumerate(rows):
        a, b = x0 + i * w, x0 + (i + 1) * w - (1 if w >= 3 else 0)
        b = max(a, b - 1e-6)
        d.rectangle([a, y0, b, y1], fill=_KIND_TINT[r["kind"]])
        if r["active_c"]:
            d.rectangle([a, min(zero - half * r["active_c"] / top, zero - 1), b, zero - 1], fill=CONTENT_COLOR)
        if r["active_s"]:
            d.rectangle([a, zero + 1, b, max(zero + half * r["active_s"] / top, zero + 1)], fill=STYLE_COLOR)
    d.line([(x0, zero), (x1, zero)], fill=_INK)
    d.text((x0 - 30, y0), f"{top}", fill=_INK, font=font)
    d.text((x0 - 30, y1 - 10), f"{top}", fill=_INK, font=font)


def render_mask_ranks(masks: dict, kinds: dict | None = None, threshold: float = 0.5, width: int = 960,
                      height: int = 640, method: str = "ziprank", title: str | None = None) -> np.ndarray:
    """(height, width, 3) uint8 image of the masks' active ranks (Figure 4 of DuoLoRA), see the module doc.

    ``method`` names the unit: "ziprank" (active rank), "ziplora" (active output units), "naive"."""
    rows = mask_rank_table(masks, kinds, threshold)
    unit = _units(method)
    layout = mask_plot_layout(width, height)
    img = Image.new("RGB", (width, height), _WHITE)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    _fit(d, font, (12, 8), (title,) if title else (
        f"{unit} (|m| > {threshold:g}) of the content and style mergers, {len(rows)} layers; "
        f"bars: number of layers per {unit}", f"{unit} (|m| > {threshold:g}), {len(rows)} layers"), width - 24)
    lx = max(12, width - 250)
    for k, (label, colour) in enumerate((("content merger m_c", CONTENT_COLOR), ("style merger m_s", STYLE_COLOR))):
        x = lx + 120 * k
        d.rectangle([x, 26, x + 10, 34], fill=colour)
        d.text((x + 14, 24), label, fill=_INK, font=font)
    bins = _bins(max(max(r["rank_c"], r["rank_s"]) for r in rows))  # shared: the panels' x axes compare
    for kind, what in (("content", "content-dominant (low-resolution)"), ("style", "style-dominant (high-resolution)")):
        group = [r for r in rows if r["kind"] == kind]
        _histogram(d, font, layout[kind], group, (f"{what} layers: {len(group)}", f"{kind} layers: {len(group)}"),
                   unit, bins)
    _strip(d, font, layout["strip"], rows, unit)
    return np.asarray(img, dtype=np.uint8).copy()
