#!/usr/bin/env python
"""Thumbnails of the bundled workflows for ComfyUI's template browser: workflows/<name>.jpg.

The frontend shows a custom node pack's templates with the image ``/api/workflow_templates/<pack>/<name>.jpg``
beside each ``<name>.json``. This draws one from the workflow's own layout (groups, nodes with their titles, notes,
links), so it follows every change of ``tools/workflow_convert.py`` without a browser:

    python tools/workflow_thumbnails.py            # (re)write workflows/*.jpg
    python tools/workflow_thumbnails.py --check    # exit 1 when one is missing or stale

Needs only Pillow.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from PIL import Image, ImageColor, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
SIZE = (640, 360)
MARGIN = 16
TITLE_H = 30  # LiteGraph's title bar above a node's pos
BACKGROUND, NODE, NODE_TITLE, NOTE, LINK, TEXT = "#202020", "#353535", "#2a2a2a", "#593930", "#7a8a9a", "#e0e0e0"
IDLORA = "#2f5b3f"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _boxes(wf: dict) -> list[tuple[float, float, float, float]]:
    out = [tuple(g["bounding"]) for g in wf.get("groups", [])]
    out += [(n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H) for n in wf["nodes"]]
    return out


def thumbnail(wf: dict) -> Image.Image:
    """The workflow drawn to SIZE: groups as coloured panels with their titles, nodes as boxes with theirs."""
    boxes = _boxes(wf)
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    scale = min((SIZE[0] - 2 * MARGIN) / (x1 - x0), (SIZE[1] - 2 * MARGIN) / (y1 - y0))
    ox = (SIZE[0] - (x1 - x0) * scale) / 2 - x0 * scale
    oy = (SIZE[1] - (y1 - y0) * scale) / 2 - y0 * scale

    def rect(x, y, w, h):
        return [ox + x * scale, oy + y * scale, ox + (x + w) * scale, oy + (y + h) * scale]

    img = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(img)
    small, label = _font(max(8, int(26 * scale))), _font(max(9, int(40 * scale)))
    for g in wf.get("groups", []):
        r = rect(*g["bounding"])
        draw.rectangle(r, fill=_dim(g.get("color", "#3f789e")), outline=g.get("color", "#3f789e"))
        draw.text((r[0] + 4, r[1] + 2), g["title"], fill=TEXT, font=label)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link in wf.get("links", []):
        a, b = nodes.get(link[1]), nodes.get(link[3])
        if a and b:
            pa = (ox + (a["pos"][0] + a["size"][0]) * scale, oy + (a["pos"][1] + 10) * scale)
            pb = (ox + b["pos"][0] * scale, oy + (b["pos"][1] + 10) * scale)
            draw.line([pa, pb], fill=LINK, width=1)
    for n in wf["nodes"]:
        note = "Note" in n["type"]
        body = rect(n["pos"][0], n["pos"][1], *n["size"])
        head = rect(n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], TITLE_H)
        draw.rectangle(body, fill=NOTE if note else NODE)
        draw.rectangle(head, fill=IDLORA if n["type"].startswith("IDLoRA") else NODE_TITLE)
        if not note:
            text = _fit(draw, n.get("title") or n["type"], small, head[2] - head[0] - 6)
            draw.text((head[0] + 3, head[1] + 1), text, fill=TEXT, font=small)
    return img


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """``text``, cut with '…' to fit ``width`` px."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


def _dim(color: str) -> tuple[int, int, int]:
    r, g, b = ImageColor.getrgb(color)[:3]
    return r // 3, g // 3, b // 3


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85, optimize=True)
    return buf.getvalue()


def expected() -> dict[Path, bytes]:
    return {p.with_suffix(".jpg"): jpeg(thumbnail(json.loads(p.read_text()))) for p in sorted(WORKFLOWS.glob("*.json"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="report missing or stale thumbnails, write nothing")
    a = ap.parse_args(argv)
    stale = [p for p, data in expected().items() if not p.exists() or p.read_bytes() != data]
    if a.check:
        for p in stale:
            print(f"stale or missing: {p.relative_to(ROOT)}")
        return 1 if stale else 0
    for p, data in expected().items():
        if p in stale:
            p.write_bytes(data)
            print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
