"""Every bundled workflow (workflows/*.json, UI format) in headless Chromium (Debian's) on the real ComfyUI frontend,
as a user loads it: no missing node types, no validation warnings, and the graph the frontend turns into an API
prompt validates against the server's /object_info (links, combo values such as file names, number ranges).
A screenshot per workflow goes to test_artifacts/workflow_<name>.png.

What counts as a problem (``load_and_check``):
- the frontend's own list of missing node types (its ``afterConfigureGraph`` extension hook gets it), graph nodes
  whose type is not in ``LiteGraph.registered_node_types`` or that LiteGraph flagged ``has_errors``, a node count
  that differs from the file's;
- any dialog left open (the "missing nodes" / "missing models" dialogs, a load error) and any warn/error toast
  (the frontend's workflow schema and link validation reports through toasts); uncaught page errors;
- ``app.graphToPrompt()`` throwing, or its prompt failing ``validate_prompt`` (below), which mirrors ComfyUI's
  ``execution.validate_inputs`` without executing anything;
- that prompt differing from the workflow's API twin (workflows/api/<same name>) in any node's class or inputs.
``test_checks_catch_a_broken_workflow`` proves the checks fire on a broken copy of a workflow.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test_artifacts"
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# the same browser setup as test_panel.py
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # never reach the API prompt

# Registered once per page: records the missing node types the frontend itself collected in loadGraphData.
HOOK_JS = """() => {
    if (window.__idloraWfHook) return;
    window.__idloraWfHook = true;
    window.__idloraMissing = null;
    window.app.registerExtension({
        name: "idlora.tests.workflowLoad",
        afterConfigureGraph(missing) {
            window.__idloraMissing = (missing || []).map(m => typeof m === "string" ? m : m.type);
        },
    });
}"""

LOAD_JS = """async ([wf, name]) => {
    window.__idloraMissing = null;
    await window.app.loadGraphData(wf, true, true, name);
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    const registered = window.LiteGraph.registered_node_types;
    const nodes = window.app.graph.nodes;
    const out = {
        missing: window.__idloraMissing,
        nodeCount: nodes.length,
        unregistered: nodes.filter(n => !(n.type in registered)).map(n => `${n.id}:${n.type}`),
        flagged: nodes.filter(n => n.has_errors).map(n => `${n.id}:${n.type}`),
    };
    try {
        out.prompt = (await window.app.graphToPrompt()).output;
    } catch (e) {
        out.promptError = String(e && e.stack || e);
    }
    return out;
}"""

OPEN_UI_JS = """() => ({
    dialogs: Array.from(document.querySelectorAll('.p-dialog')).map(e => e.innerText.trim().slice(0, 500)),
    toasts: Array.from(document.querySelectorAll('.p-toast-message-warn, .p-toast-message-error'))
        .map(e => e.innerText.trim().slice(0, 500)),
})"""


def chromium_path() -> str:
    path = shutil.which("chromium")
    if not path:
        pytest.fail("Debian's chromium is not installed: ./idlora test installs it (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def frontend(srv):
    """One page on the server's frontend, reused for every workflow; yields (page, page_errors list)."""
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url, wait_until="domcontentloaded")
        page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager "
                               "&& window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types)"
                               ".includes('KSampler')", timeout=120_000)
        page.evaluate(HOOK_JS)
        errors.clear()  # start-up noise is test_panel's business; only errors during a load count here
        yield page, errors
        browser.close()


@pytest.fixture(scope="module")
def object_info(srv) -> dict:
    status, info = srv.get("/object_info")
    assert status == 200
    return info


# -- prompt validation against /object_info (mirrors execution.validate_inputs) ---------------------------------
def _types_match(received, expected) -> bool:
    if received == expected or not isinstance(received, str) or not isinstance(expected, str):
        return True
    if "*" in (received, expected):
        return True
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return bool(got & want)


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def _check_value(where: str, typ, opts: dict, v) -> str | None:
    options = typ if isinstance(typ, list) else opts.get("options") if typ == "COMBO" else None
    if options is not None:
        if v not in options:
            shown = options if len(options) <= 8 else options[:8] + ["..."]
            return f"{where}: {v!r} is not one of {shown}"
    elif typ == "INT":
        if isinstance(v, bool) or not isinstance(v, int):
            return f"{where}: {v!r} is not an INT"
    elif typ == "FLOAT":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"{where}: {v!r} is not a FLOAT"
    elif typ == "BOOLEAN":
        if not isinstance(v, bool):
            return f"{where}: {v!r} is not a BOOLEAN"
    elif typ == "STRING":
        if not isinstance(v, str):
            return f"{where}: {v!r} is not a STRING"
    if typ in ("INT", "FLOAT"):
        if "min" in opts and v < opts["min"]:
            return f"{where}: {v!r} is below the minimum {opts['min']}"
        if "max" in opts and v > opts["max"]:
            return f"{where}: {v!r} is above the maximum {opts['max']}"
    return None


def validate_prompt(prompt: dict, info: dict) -> list[str]:
    """Problems of an API prompt against /object_info: unknown nodes, missing or unknown inputs, links to nothing
    or of the wrong type, widget values of the wrong type, out of range, or not among a combo's options."""
    problems = []
    for nid, node in prompt.items():
        ct = node.get("class_type")
        if ct not in info:
            problems.append(f"node {nid} ({node.get('_meta', {}).get('title')}): unknown class_type {ct!r}")
            continue
        spec = info[ct]["input"]
        declared = {**spec.get("optional", {}), **spec.get("required", {})}
        inputs = node.get("inputs", {})
        for name in inputs:
            if name not in declared:
                problems.append(f"node {nid} {ct}: unknown input {name!r}")
        for group in ("required", "optional"):
            for name, entry in spec.get(group, {}).items():
                typ, opts = entry[0], (entry[1] if len(entry) > 1 else {}) or {}
                where = f"node {nid} {ct}.{name}"
                if name not in inputs:
                    if group == "required":
                        problems.append(f"{where}: required input missing")
                    continue
                v = inputs[name]
                if _is_link(v):
                    src = prompt.get(v[0])
                    if src is None or src.get("class_type") not in info:
                        problems.append(f"{where}: linked to node {v[0]}, which is not in the prompt")
                        continue
                    outs = info[src["class_type"]]["output"]
                    if v[1] >= len(outs):
                        problems.append(f"{where}: linked to output {v[1]} of {src['class_type']}, which has "
                                        f"{len(outs)}")
                    elif not _types_match(outs[v[1]], "COMBO" if isinstance(typ, list) else typ):
                        problems.append(f"{where}: {src['class_type']} output {outs[v[1]]} does not fit {typ}")
                    continue
                problem = _check_value(where, typ, opts, v)
                if problem:
                    problems.append(problem)
    return problems


def load_and_check(page, errors: list, wf: dict, name: str, info: dict, shot: Path) -> tuple[list[str], dict]:
    """Load a UI workflow like a user would; return (problems, API prompt). Leaves a screenshot at ``shot``."""
    page.keyboard.press("Escape")  # a dialog left over from an earlier load
    errors.clear()
    res = page.evaluate(LOAD_JS, [wf, name])
    page.wait_for_timeout(400)  # dialogs and toasts render on the next ticks
    ui = page.evaluate(OPEN_UI_JS)
    page.screenshot(path=str(shot))
    problems = []
    if res["missing"] is None:
        problems.append("the frontend did not finish configuring the graph (afterConfigureGraph never ran)")
    elif res["missing"]:
        problems.append(f"missing node types (frontend): {res['missing']}")
    if res["unregistered"]:
        problems.append(f"nodes of unregistered types: {res['unregistered']}")
    if res["flagged"]:
        problems.append(f"nodes LiteGraph flagged has_errors: {res['flagged']}")
    if res["nodeCount"] != len(wf["nodes"]):
        problems.append(f"{res['nodeCount']} nodes on the canvas, {len(wf['nodes'])} in the file")
    problems += [f"dialog open: {d}" for d in ui["dialogs"]]
    problems += [f"toast: {t}" for t in ui["toasts"]]
    problems += [f"page error: {e}" for e in errors]
    prompt = res.get("prompt") or {}
    if "promptError" in res:
        problems.append(f"app.graphToPrompt() failed: {res['promptError']}")
    else:
        problems += validate_prompt(prompt, info)
        expected = {str(n["id"]) for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY and n.get("mode", 0) == 0}
        if set(prompt) != expected:
            problems.append(f"prompt nodes {sorted(prompt, key=int)} != the file's executable nodes "
                            f"{sorted(expected, key=int)}")
    return problems, prompt


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_without_missing_nodes_or_validation_errors(frontend, object_info, path):
    page, errors = frontend
    wf = json.loads(path.read_text())
    problems, prompt = load_and_check(page, errors, wf, path.name, object_info,
                                      ARTIFACTS / f"workflow_{path.stem}.png")
    twin_path = ROOT / "workflows" / "api" / path.name
    if twin_path.exists() and prompt:  # what the frontend queues is exactly the API twin
        twin = json.loads(twin_path.read_text())
        for nid in sorted(set(twin) | set(prompt), key=lambda k: int(k) if k.isdigit() else 0):
            got = {k: prompt.get(nid, {}).get(k) for k in ("class_type", "inputs")}
            want = {k: twin.get(nid, {}).get(k) for k in ("class_type", "inputs")}
            if got != want:
                problems.append(f"node {nid}: the frontend's prompt {json.dumps(got)[:400]} differs from the API "
                                f"twin's {json.dumps(want)[:400]}")
    assert not problems, f"{path.name} in the frontend:\n  " + "\n  ".join(problems)


def test_checks_catch_a_broken_workflow(frontend, object_info, tmp_path):
    """A copy with an unknown node type, a checkpoint that is not on the server, a widget value out of range; and
    in its prompt, a link to a node that is not there and a wrong link type: each is reported."""
    page, errors = frontend
    wf = json.loads((ROOT / "workflows" / "idlora_train_lora.json").read_text())
    by_type = {n["type"]: n for n in wf["nodes"]}
    by_type["IDLoRALossPlot"]["type"] = "IDLoRANoSuchNode"
    by_type["CheckpointLoaderSimple"]["widgets_values"] = ["not_on_the_server.safetensors"]
    by_type["EmptyLatentImage"]["widgets_values"][0] = -64
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(wf))
    problems, _ = load_and_check(page, errors, json.loads(broken.read_text()), broken.name, object_info,
                                 tmp_path / "broken.png")
    text = "\n".join(problems)
    assert "missing node types (frontend): ['IDLoRANoSuchNode']" in text, text
    assert "nodes LiteGraph flagged has_errors" in text, text
    assert "dialog open: " in text and "IDLoRANoSuchNode" in text.split("dialog open: ", 1)[1], text
    assert "'not_on_the_server.safetensors' is not one of" in text, text
    assert "EmptyLatentImage.width: -64 is below the minimum" in text, text
    assert "unknown class_type" in text, text  # the missing node still lands in the prompt, with no class
    page.keyboard.press("Escape")
    _, prompt = load_and_check(page, errors, json.loads((ROOT / "workflows" / "idlora_train_lora.json").read_text()),
                               "idlora_train_lora.json", object_info, tmp_path / "again.png")
    decode = next(n for n in prompt.values() if n["class_type"] == "VAEDecode")
    decode["inputs"]["samples"] = ["999", 0]
    decode["inputs"]["vae"] = [next(k for k, n in prompt.items() if n["class_type"] == "EmptyLatentImage"), 0]
    text = "\n".join(validate_prompt(prompt, object_info))
    assert "VAEDecode.samples: linked to node 999, which is not in the prompt" in text, text
    assert "VAEDecode.vae: EmptyLatentImage output LATENT does not fit VAE" in text, text
