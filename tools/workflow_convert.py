#!/usr/bin/env python3
"""Convert ComfyUI workflows between the API format and the UI (canvas) format.

    python tools/workflow_convert.py to-ui  API.json OBJECT_INFO.json OUT.json
    python tools/workflow_convert.py to-api UI.json  OBJECT_INFO.json OUT.json
    python tools/workflow_convert.py regen OBJECT_INFO.json   # every workflows/*.json from workflows/api/

``OBJECT_INFO.json`` is ``GET /object_info`` of a server that has the pack. The UI
file is laid out left to right by dependency depth, and carries MarkdownNote nodes
(frontend-only) with each API node's ``_meta.note`` text. ``to-api`` is what the
frontend does on "Export (API)", and the tests use it to check that a bundled UI
workflow and its API twin do not drift apart.
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


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((visit(u) for u in ups), default=-1)
        return depth[nid]
    for nid in api:
        visit(nid)
    return depth


def to_ui(api: dict, info: dict) -> dict:
    notes = {nid: n["_meta"]["note"] for nid, n in api.items() if n.get("_meta", {}).get("note")}
    depth = _depths(api)
    rows: dict[int, int] = {}
    nodes, links = [], []
    ids = {nid: int(nid) for nid in api}
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, node in sorted(api.items(), key=lambda kv: (depth[kv[0]], int(kv[0]))):
        spec = info[node["class_type"]]
        col, row = depth[nid], rows.get(depth[nid], 0)
        rows[col] = row + 1
        inputs = []
        for name, typ, _ in _inputs(spec):
            v = node["inputs"].get(name)
            if not isinstance(v, list):
                continue
            link_id = len(links) + 1
            src, slot = v
            src_type = info[api[src]["class_type"]]["output"][slot]
            links.append([link_id, ids[src], slot, ids[nid], len(inputs), src_type])
            out_links.setdefault((src, slot), []).append(link_id)
            entry = {"name": name, "type": "COMBO" if isinstance(typ, list) else typ, "link": link_id}
            if _is_widget(typ):
                entry["widget"] = {"name": name}
            inputs.append(entry)
        nodes.append({
            "id": ids[nid], "type": node["class_type"], "pos": [40 + col * 380, 40 + row * 330],
            "size": [340, 280], "flags": {}, "order": len(nodes), "mode": 0, "inputs": inputs,
            "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
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
    for nid, text in notes.items():
        anchor = by_id[ids[nid]]
        nodes.append({"id": next_id, "type": "MarkdownNote", "pos": [anchor["pos"][0], anchor["pos"][1] - 10 + 290],
                      "size": [340, 120], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [],
                      "outputs": [], "properties": {}, "widgets_values": [text], "color": "#432",
                      "bgcolor": "#653"})
        next_id += 1
    return {"last_node_id": next_id - 1, "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}}, "version": 0.4}


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
