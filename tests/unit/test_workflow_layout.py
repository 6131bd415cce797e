"""The bundled UI workflows (workflows/*.json) are laid out like a person would: no node overlaps another (title
bars included), no note covers a node, groups do not overlap and each node lies inside at most one of them, and
every node is at least as large as its slots and widgets need, so the frontend does not grow it on load over its
neighbours. Pure python: the files alone are read.

Metrics are LiteGraph's in the frontend ComfyUI 0.3.75 expects (comfyui-frontend-package 1.32.9): a node's ``pos``
is the top-left of its body and its title bar (30 px) lies above it; a body needs 20 px per slot row (the larger of
its socket inputs and its outputs), 20 + 4 px per widget plus 8 px; a multiline text widget is a DOM widget of 50 px
at least; the frontend grows a note to 88 px; an image preview (LoadImage shows one at once) is 220 px at least. The
real frontend keeps the bundled workflows' node sizes as they are on load (checked in Chromium when this was written).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))

TITLE_H, SLOT_H, WIDGET_H, WIDGET_GAP, WIDGETS_PAD = 30, 20, 20, 4, 8
DOM_MIN_H, PREVIEW_H, GROUP_TITLE_H = 50, 220, 34
NOTE_MIN_H = 88  # the frontend grows a MarkdownNote (one slot row, its 56 px markdown widget) to this on load
NOTES = {"Note", "MarkdownNote"}
MULTILINE = {"CLIPTextEncode", "IDLoRATrainLoRA", "IDLoRAClipScore", "IDLoRAImageReward",
             "IDLoRAMetaLoRAEvaluate"}  # node types with a multiline text widget
PREVIEW = {"LoadImage"}  # shows its image (a 220 px preview widget) as soon as the workflow loads


def rect(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node, its title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, x + w, y + h


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(r, box) -> bool:
    return box[0] <= r[0] and r[2] <= box[2] and box[1] + GROUP_TITLE_H <= r[1] and r[3] <= box[3]


def needed_height(node: dict) -> int:
    if node["type"] in NOTES:
        return NOTE_MIN_H
    sockets = [i for i in node.get("inputs", []) if "widget" not in i]
    rows = max(len(sockets), len(node.get("outputs", [])), 1)
    widgets = node.get("widgets_values") or []
    h = rows * SLOT_H + len(widgets) * (WIDGET_H + WIDGET_GAP) + (WIDGETS_PAD if widgets else 0)
    if node["type"] in MULTILINE:
        h += DOM_MIN_H - WIDGET_H
    if node["type"] in PREVIEW:
        h += PREVIEW_H + WIDGET_GAP
    return h


def layout_problems(wf: dict) -> list[str]:
    problems = []
    nodes = wf["nodes"]
    name = lambda n: f"{n['id']}:{n.get('title') or n['type']}"  # noqa: E731
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if overlaps(rect(a), rect(b)):
                kind = "note" if a["type"] in NOTES or b["type"] in NOTES else "node"
                problems.append(f"{kind} overlap: {name(a)} {rect(a)} and {name(b)} {rect(b)}")
    boxes = []
    for g in wf.get("groups", []):
        x, y, w, h = g["bounding"]
        boxes.append((g["title"], (x, y, x + w, y + h)))
    if not boxes:
        problems.append("no groups")
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            if overlaps(a, b):
                problems.append(f"groups {ta!r} and {tb!r} overlap")
    for n in nodes:
        r = rect(n)
        touching = [t for t, box in boxes if overlaps(r, box)]
        if len(touching) > 1:
            problems.append(f"{name(n)} lies in {len(touching)} groups: {touching}")
        elif touching and not inside(r, dict(boxes)[touching[0]]):
            problems.append(f"{name(n)} sticks out of group {touching[0]!r} (or covers its title)")
        need = needed_height(n)
        if n["size"][1] < need:
            problems.append(f"{name(n)} is {n['size'][1]} px high, its slots and widgets need {need}")
        if n["type"] in MULTILINE and n["size"][0] < 300:
            problems.append(f"{name(n)} is {n['size'][0]} px wide, too narrow for its text box")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_layout(path):
    problems = layout_problems(json.loads(path.read_text()))
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_every_node_is_in_a_group():
    for path in WORKFLOWS:
        wf = json.loads(path.read_text())
        boxes = [(x, y, x + w, y + h) for x, y, w, h in (g["bounding"] for g in wf["groups"])]
        loose = [n["id"] for n in wf["nodes"] if not any(inside(rect(n), b) for b in boxes)]
        assert not loose, f"{path.name}: nodes outside every group: {loose}"


def test_checks_catch_a_bad_layout():
    wf = json.loads((ROOT / "workflows" / "idlora_train_lora.json").read_text())
    by_type = {n["type"]: n for n in wf["nodes"]}
    train, note = by_type["IDLoRATrainLoRA"], by_type["MarkdownNote"]
    note["pos"] = [train["pos"][0] + 10, train["pos"][1] + 10]
    by_type["LoadImage"]["size"] = [340, 120]
    wf["groups"].append({"title": "stray", "bounding": [wf["groups"][0]["bounding"][0] + 5, 0, 100, 100]})
    text = "\n".join(layout_problems(wf))
    assert "note overlap" in text and "IDLoRA Train LoRA" in text, text
    assert "Training image is 120 px high" in text, text
    assert "groups 'Train' and 'stray' overlap" in text or "'stray' overlap" in text, text
