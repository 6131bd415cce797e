"""The frontend's node help: every IDLoRA node has web/docs/<NodeId>.md, each file is what tools/node_docs.py
writes from the node's V3 schema today (a changed tooltip fails here until the docs are regenerated with
`.venv/bin/python tools/node_docs.py`), and a real server serves them where the frontend looks for them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "web" / "docs"
REGEN = "regenerate them with `.venv/bin/python tools/node_docs.py`"

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def nd(comfy):
    import node_docs  # tools/
    return node_docs


def test_every_node_has_a_doc_file(nd):
    declared = set(re.findall(r'node_id="(IDLoRA\w+)"', "".join(p.read_text() for p in (ROOT / "nodes").glob("*.py"))))
    listed = {cls.define_schema().node_id for _, cls in nd.node_classes()}
    assert declared == listed, "a node is declared but not listed in its module's NODES (or the other way round)"
    missing = sorted(n for n in listed if not (DOCS / f"{n}.md").is_file())
    assert not missing, f"no web/docs/<NodeId>.md for {missing}: {REGEN}"


def test_docs_are_up_to_date(nd):
    problems = nd.stale()
    assert not problems, f"web/docs/ differs from the node schemas ({REGEN}):\n  " + "\n  ".join(problems)


def test_a_doc_shows_inputs_outputs_and_the_readme_section(nd):
    text = (DOCS / "IDLoRATrainLoRA.md").read_text()
    assert text.startswith("# IDLoRA Train LoRA\n\nTrain a plain LoRA on images"), text[:200]
    assert "| `steps` | INT | `" in text and "(1 to 100000) | Optimizer steps. |" in text
    assert "| `prompt` | STRING (multiline) | `a photo of sks person` |" in text
    assert "| `target_pattern` (optional) | STRING | (empty) |" in text
    assert "| `model` | MODEL | (link) | The model to train on." in text
    assert "## Outputs" in text and "[Plain LoRA](../../README.md#plain-lora)" in text
    loader = (DOCS / "IDLoRALoadLoRA.md").read_text()
    assert "| `lora_name` | COMBO: a file on the server | the first file |" in loader  # not this machine's files
    headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(), re.M)}
    for title, anchor in nd.README_SECTIONS.values():
        assert anchor in headings, f"README has no section {title!r} (#{anchor})"


def test_a_changed_tooltip_makes_the_docs_stale(nd, monkeypatch, tmp_path):
    nd.write(tmp_path)
    assert nd.stale(tmp_path) == []
    from idlora.nodes.lora_nodes import TrainLoRA
    original = TrainLoRA.define_schema.__func__

    def changed(cls):
        schema = original(cls)
        schema.inputs[0].tooltip += " (changed)"
        return schema
    monkeypatch.setattr(TrainLoRA, "define_schema", classmethod(changed))
    (tmp_path / "IDLoRANoSuchNode.md").write_text("old")
    (tmp_path / "IDLoRASaveLoRA.md").unlink()
    assert nd.stale(tmp_path) == ["missing: IDLoRASaveLoRA.md", "out of date: IDLoRATrainLoRA.md",
                                  "no such node: IDLoRANoSuchNode.md"]


@pytest.mark.server
def test_the_server_serves_the_docs_where_the_frontend_looks(srv):
    """The frontend (nodeHelpService) fetches /extensions/<pack>/docs/<NodeId>/<locale>.md, then
    /extensions/<pack>/docs/<NodeId>.md, <pack> being the second part of the node's python_module."""
    status, info = srv.get("/object_info/IDLoRATrainLoRA")
    assert status == 200
    module = info["IDLoRATrainLoRA"]["python_module"]
    assert module.split(".")[:2] == ["custom_nodes", "IDLoRA"], module
    status, body = srv.get("/extensions/IDLoRA/docs/IDLoRATrainLoRA.md")
    assert status == 200 and body.decode().startswith("# IDLoRA Train LoRA"), (status, body[:200])
    assert srv.get("/extensions/IDLoRA/docs/IDLoRATrainLoRA/en.md")[0] == 404  # the frontend then falls back
