#!/usr/bin/env python3
"""Convert ComfyUI workflows between the API format and the UI (canvas) format.

    python tools/workflow_convert.py to-ui  API.json OBJECT_INFO.json OUT.json
    python tools/workflow_convert.py to-api UI.json  OBJECT_INFO.json OUT.json
    python tools/workflow_convert.py regen OBJECT_INFO.json   # every workflows/*.json from workflows/api/

``OBJECT_INFO.json`` is ``GET /object_info`` of a server that has the pack. ``to-api`` is what the
frontend does on "Export (API)", and the tests use it to check that a bundled UI workflow and its
API twin do not drift apart.

The UI file is laid out as a person would (``layout``; tests/unit/test_workflow_layout.py checks it):
- one group per stage: an API node's optional ``_meta.group`` names it, else it is derived from the
  graph (upstream of a node that makes a LoRA: "Train"; scoring nodes and what follows: "Score";
  the rest: "Generate"); groups go left to right in data-flow order and never overlap;
- inside a group, one column per depth (links inside the group only), nodes ordered by where their
  inputs are; a column is as wide as its widest node, and every node is as large as its slots,
  widgets, text box and image preview need in the frontend (``node_size``);
- an API node's ``_meta.note`` becomes a MarkdownNote right under it, as wide as the column and as
  high as its text needs, so nothing overlaps.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
SEED_CONTROL = "fixed"  # value the frontend stores after widgets with control_after_generate


def _inputs(spec: dict) -> list[tuple[str, object, dict]]:
    order = spec.get("input_order") or {g: list(spec["input"].get(g, {})) for g in ("required", "optional")}
    out = []
    for group in ("required", "optional"):
        for name in order.get(group, []):
            entry = spec["input"][group][name]
            out.append((name, entry[0], entry[1] if len(entry) > 1 else {}))
    return out


def _is_widget(typ: object) -> bool:
    return isinstance(typ, list) or typ in WIDGET_TYPES


def _has_control(name: str, typ: object, opts: dict) -> bool:
    """Whether the frontend stores a 'control after generate' value after this widget: asked for by the node, or,
    unless the node says otherwise, every INT named seed or noise_seed (the frontend's own default rule)."""
    return bool(opts.get("control_after_generate", typ == "INT" and name in ("seed", "noise_seed")))


def _widget_values(node: dict, spec: dict) -> list:
    values = []
    for name, typ, opts in _inputs(spec):
        if not _is_widget(typ):
            continue
        v = node["inputs"].get(name)
        if isinstance(v, list):  # linked widget: keep a placeholder value, the link wins
            v = typ[0] if isinstance(typ, list) and typ else opts.get("default")
        if v is None:
            v = opts.get("default")
        values.append(v)
        if _has_control(name, typ, opts):
            values.append(SEED_CONTROL)
        if opts.get("image_upload"):
            values.append("image")
    return values


def _depths(api: dict, within: set | None = None) -> dict[str, int]:
    """Longest-path depth of each node (counting only links from nodes in ``within``, when given)."""
    depth: dict[str, int] = {}

    def visit(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values()
                   if isinstance(v, list) and (within is None or v[0] in within)]
            depth[nid] = 1 + max((visit(u) for u in ups), default=-1)
        return depth[nid]
    for nid in (api if within is None else within):
        visit(nid)
    return depth


# -- layout ------------------------------------------------------------------------------------------------------
# LiteGraph's metrics in the frontend this ComfyUI expects (comfyui-frontend-package 1.32.9: LiteGraphGlobal.ts,
# LGraphNode.computeSize/#arrangeWidgets, BaseWidget, LGraphGroup). ``pos`` is the top-left of a node's body; its
# title bar (TITLE_H) lies above it. Body height = slot rows * SLOT_H + each widget's height + WIDGET_GAP + 8.
TITLE_H, SLOT_H, WIDGET_H, WIDGET_GAP, WIDGETS_PAD = 30, 20, 20, 4, 8
MULTILINE_H = 96        # a prompt textarea (the frontend's DOM widget minimum is 50 px): room for 4-5 lines
PREVIEW_H = 220         # the image preview widget (LoadImage at once, SaveImage after a run) is 220 px at least
MULTILINE_MIN = (400, 200)  # the frontend's own minimum size of a node with a multiline text widget
CHAR_W = 7.5            # average px per character at the node font size (14 px)
WIDGET_CHROME = 42 + 2 * (15 + 6 + 10)  # BaseWidget.minValueWidth + 2 * (margin + arrowMargin + arrowWidth)
NOTE_MIN_H = 90         # the frontend grows a MarkdownNote to 88 px at least (measured in 1.32.9)
NOTE_MIN_W = 320       # a column with notes is at least this wide, so that a note's text needs few lines
COL_GAP, ROW_GAP, NOTE_GAP = 70, 40, 24  # px between columns; between a body and the next title bar; above a note
GROUP_PAD, GROUP_TITLE_H, GROUP_GAP = 24, 34, 80  # LGraphGroup title: font_size 24 * 1.4
GROUP_COLORS = ["#3f789e", "#b06634", "#8A8", "#a1309b", "#b58b2a", "#88A", "#8AA", "#A88"]  # LGraphCanvas palette
TRAIN_WORDS = ("Train", "Stage1", "Personalize", "BuildLoraDataset", "Merge")  # a class that makes a LoRA
SCORE_WORDS = ("Similarity", "ClipScore", "DinoScore", "FIDScore", "CSDScore", "DreamSimScore", "ImageReward",
               "EvaluationReport", "ComparisonBoard")


def _up(v: float, step: int = 10) -> int:
    return int(-(-v // step) * step)


def _is_socket(typ: object, opts: dict) -> bool:
    return not _is_widget(typ) or bool(opts.get("forceInput"))


def node_size(spec: dict, title: str) -> list[int]:
    """The size a node needs to show its slots and widgets (and an image preview, where it gets one)."""
    ins = _inputs(spec)
    rows = max(sum(_is_socket(t, o) for _, t, o in ins), len(spec["output"]), 1)
    h = rows * SLOT_H + WIDGETS_PAD
    w = max(140, TITLE_H * 1.33 + len(title) * (CHAR_W + 1))
    slot_w = [max([len(n) for n, t, o in ins if _is_socket(t, o)] or [0]),
              max([len(n) for n in spec.get("output_name", [])] or [0])]
    w = max(w, sum(slot_w) * CHAR_W + 2 * SLOT_H + 5)
    multiline = preview = False
    for name, typ, opts in ins:
        if _is_socket(typ, opts):
            preview |= typ == "IMAGE" and bool(spec.get("output_node"))  # SaveImage / PreviewImage
            continue
        w = max(w, 210)  # LiteGraph.NODE_WIDTH * 1.5 for a node with widgets
        if typ == "STRING" and opts.get("multiline"):
            h, multiline = h + MULTILINE_H + WIDGET_GAP, True
            continue
        h += WIDGET_H + WIDGET_GAP
        value = opts.get("default", typ[0] if isinstance(typ, list) and typ else "")
        w = max(w, min(420, (len(name) + len(str(value))) * CHAR_W + WIDGET_CHROME))
        if _has_control(name, typ, opts):
            h += WIDGET_H + WIDGET_GAP
        if opts.get("image_upload"):
            h += WIDGET_H + WIDGET_GAP
            preview = True
    if preview:
        h += PREVIEW_H + WIDGET_GAP
    if multiline:
        w, h = max(w, MULTILINE_MIN[0]), max(h, MULTILINE_MIN[1])
    return [_up(w), _up(h + 6)]


def note_height(text: str, width: int) -> int:
    """Rendered height of a MarkdownNote's text at ``width`` (14 px text, about 22 px a line, 12 px padding)."""
    per_line = max(16, int((width - 32) / 7.2))
    lines = sum(max(1, -(-len(par) // per_line)) for par in text.split("\n"))
    return max(NOTE_MIN_H, _up(24 + lines * 22))


def _groups(api: dict, info: dict) -> dict[str, str]:
    """Each node's group: its ``_meta.group``, else derived from the graph: nodes upstream of (or) a node that makes
    a LoRA are "Train", the scoring nodes and everything downstream of them "Score", the rest "Generate"."""
    down: dict[str, set] = {nid: set() for nid in api}
    for nid, node in api.items():
        for v in node["inputs"].values():
            if isinstance(v, list):
                down[v[0]].add(nid)

    def closure(start: set, step) -> set:
        seen, todo = set(start), list(start)
        while todo:
            for m in step(todo.pop()):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen
    ups = lambda n: [v[0] for v in api[n]["inputs"].values() if isinstance(v, list)]  # noqa: E731
    train = closure({n for n, x in api.items() if any(w in x["class_type"] for w in TRAIN_WORDS)}, ups)
    score = closure({n for n, x in api.items() if any(w in x["class_type"] for w in SCORE_WORDS)}, down.__getitem__)
    derived = {n: "Train" if n in train else "Score" if n in score else "Generate" for n in api}
    return {n: (x.get("_meta") or {}).get("group") or derived[n] for n, x in api.items()}


def layout(api: dict, info: dict) -> tuple[dict, dict, list]:
    """Positions and sizes: one group per stage, groups left to right in data-flow order; inside a group, one
    column per depth (links inside the group only), each node followed by its note. Returns (node pos/size by
    API id, note pos/size by API id, groups)."""
    order = list(api)
    group_of = _groups(api, info)
    names = list(dict.fromkeys(group_of[n] for n in order))
    # groups in data-flow order: a group comes after every group that feeds it (ties and cycles: file order)
    feeds = {g: set() for g in names}
    for nid, node in api.items():
        for v in node["inputs"].values():
            if isinstance(v, list) and group_of[v[0]] != group_of[nid]:
                feeds[group_of[nid]].add(group_of[v[0]])
    ranked: list[str] = []
    while len(ranked) < len(names):
        ready = [g for g in names if g not in ranked and feeds[g] <= set(ranked)]
        ranked.append(ready[0] if ready else next(g for g in names if g not in ranked))
    sizes = {nid: node_size(info[x["class_type"]], (x.get("_meta") or {}).get("title") or x["class_type"])
             for nid, x in api.items()}
    notes = {nid: x["_meta"]["note"] for nid, x in api.items() if (x.get("_meta") or {}).get("note")}
    place, note_place, groups = {}, {}, []
    gx = 0
    for gi, g in enumerate(ranked):
        members = [n for n in order if group_of[n] == g]
        depth = _depths(api, set(members))
        cols = [[n for n in members if depth[n] == d] for d in range(max(depth.values()) + 1)]
        x = gx + GROUP_PAD
        top = GROUP_TITLE_H + GROUP_PAD
        bottom = top
        centre: dict[str, float] = {}
        for col in cols:
            width = max([sizes[n][0] for n in col] + [NOTE_MIN_W for n in col if n in notes])

            def bary(n: str) -> float:  # mean height of the node's already placed inputs (fewer crossings)
                ys = [centre[v[0]] for v in api[n]["inputs"].values() if isinstance(v, list) and v[0] in centre]
                return sum(ys) / len(ys) if ys else float("inf")
            y = top
            first = x == gx + GROUP_PAD
            for n in col if first else sorted(col, key=lambda n: (bary(n), order.index(n))):
                w, h = width, sizes[n][1]
                if not first and bary(n) != float("inf"):  # level with its inputs where there is room
                    y = max(y, _up(bary(n) - (TITLE_H + h) / 2))
                place[n] = ([x, y + TITLE_H], [w, h])
                centre[n] = y + (TITLE_H + h) / 2
                y += TITLE_H + h
                if n in notes:
                    nh = note_height(notes[n], w)
                    note_place[n] = ([x, y + NOTE_GAP + TITLE_H], [w, nh])
                    y += NOTE_GAP + TITLE_H + nh
                y += ROW_GAP
            bottom = max(bottom, y - ROW_GAP)
            x += width + COL_GAP
        gw = x - COL_GAP + GROUP_PAD - gx
        groups.append({"id": gi + 1, "title": g, "bounding": [gx, 0, gw, bottom + GROUP_PAD],
                       "color": GROUP_COLORS[gi % len(GROUP_COLORS)], "font_size": 24, "flags": {}})
        gx += gw + GROUP_GAP
    return place, note_place, groups


def to_ui(api: dict, info: dict) -> dict:
    depth = _depths(api)
    place, note_place, groups = layout(api, info)
    nodes, links = [], []
    ids = {nid: int(nid) for nid in api}
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, node in sorted(api.items(), key=lambda kv: (depth[kv[0]], int(kv[0]))):
        spec = info[node["class_type"]]
        # every input slot, as the frontend saves them: the sockets, then one slot per widget
        ins = _inputs(spec)
        slots = [s for s in ins if _is_socket(s[1], s[2])] + \
                [s for s in ins if not _is_socket(s[1], s[2]) and not s[2].get("socketless")]
        inputs = []
        for name, typ, opts in slots:
            v = node["inputs"].get(name)
            link_id = None
            if isinstance(v, list):
                link_id = len(links) + 1
                src, slot = v
                src_type = info[api[src]["class_type"]]["output"][slot]
                links.append([link_id, ids[src], slot, ids[nid], len(inputs), src_type])
                out_links.setdefault((src, slot), []).append(link_id)
            entry = {"name": name, "type": "COMBO" if isinstance(typ, list) else typ, "link": link_id}
            if not _is_socket(typ, opts):
                entry["widget"] = {"name": name}
            inputs.append(entry)
        pos, size = place[nid]
        nodes.append({
            "id": ids[nid], "type": node["class_type"], "pos": pos, "size": size, "flags": {}, "order": len(nodes),
            "mode": 0, "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": _widget_values(node, spec),
            **({"title": node["_meta"]["title"]} if node.get("_meta", {}).get("title") else {}),
        })
    by_id = {n["id"]: n for n in nodes}
    for nid, node in api.items():
        spec = info[node["class_type"]]
        by_id[ids[nid]]["outputs"] = [
            {"name": spec["output_name"][i], "type": t if isinstance(t, str) else "COMBO",
             "links": out_links.get((nid, i), []), "slot_index": i}
            for i, t in enumerate(spec["output"])]
    next_id = max(ids.values()) + 1
    for nid, (pos, size) in note_place.items():
        nodes.append({"id": next_id, "type": "MarkdownNote", "pos": pos, "size": size, "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                      "widgets_values": [api[nid]["_meta"]["note"]], "color": "#432", "bgcolor": "#653"})
        next_id += 1
    return {"last_node_id": next_id - 1, "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": groups, "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}}, "version": 0.4}


def to_api(ui: dict, info: dict) -> dict:
    link_src = {lk[0]: (str(lk[1]), lk[2]) for lk in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL or node.get("mode", 0) in (2, 4):  # notes, muted, bypassed
            continue
        spec = info[node["type"]]
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, typ, opts in _inputs(spec):
            if _is_widget(typ):
                v = values.pop(0) if values else opts.get("default")
                if _has_control(name, typ, opts) and values:
                    values.pop(0)
                if opts.get("image_upload") and values:
                    values.pop(0)
                if name not in linked:
                    inputs[name] = v
            if name in linked:
                src, slot = link_src[linked[name]]
                inputs[name] = [src, slot]
        entry = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[str(node["id"])] = entry
    return api


def main(argv: list[str]) -> None:
    cmd, *paths = argv
    load = lambda p: json.load(open(p))  # noqa: E731
    if cmd == "to-ui":
        api_p, info_p, out_p = paths
        result = to_ui(load(api_p), load(info_p))
    elif cmd == "regen":
        (info_p,) = paths
        root = Path(__file__).resolve().parent.parent / "workflows"
        for api_p in sorted((root / "api").glob("*.json")):
            _dump(to_ui(load(api_p), load(info_p)), root / api_p.name)
        return
    elif cmd == "to-api":
        ui_p, info_p, out_p = paths
        result = to_api(load(ui_p), load(info_p))
    else:
        raise SystemExit(__doc__)
    _dump(result, out_p)


def _dump(obj: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
