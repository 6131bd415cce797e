"""The bundled evaluation workflow on a real ComfyUI server: face detection preview, dlib FaceSim on two
public-domain photos of one person, the report files and the table image; no-face inputs over HTTP."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest


pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "api" / "idlora_evaluate.json"
FACE_NODES = {"IDLoRAFaceDetect", "IDLoRAFaceEmbedder", "IDLoRAIdentitySimilarity", "IDLoRAClipScore",
              "IDLoRADinoScore", "IDLoRAEvaluationReport"}


@pytest.fixture(scope="module")
def server_base(server_base):
    shutil.copyfile(ROOT / "tests" / "assets" / "faces" / "no_face.jpg", server_base / "input" / "no_face.jpg")
    return server_base


def workflow() -> dict:
    return json.loads(WORKFLOW.read_text())


def _saved(srv, entry: dict) -> Path:
    return srv.base / "output" / entry["subfolder"] / entry["filename"]


def test_face_nodes_are_registered(srv):
    status, info = srv.get("/object_info")
    assert status == 200 and FACE_NODES <= set(info)
    assert info["IDLoRAEvaluationReport"]["output_node"] is True
    assert info["IDLoRAFaceDetect"]["category"] == "IDLoRA/faces"
    assert info["IDLoRAIdentitySimilarity"]["output"][3] == "IDLORA_METRICS"


def test_evaluate_workflow_runs(srv):
    hist, _ = srv.run(workflow(), timeout=300)
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]
    out = hist["outputs"]
    report_dir = srv.base / "output" / "idlora" / "reports"
    data = json.loads((report_dir / "idlora_face_eval.json").read_text())
    facesim = data["metrics"]["FaceSim"]
    assert facesim["mean"] > 0.9 and facesim["count"] == 1 and facesim["no_face"] == 0  # obama vs obama2, dlib
    assert data["metrics"]["FaceL2"]["mean"] < 0.6 and data["metrics"]["R-FaceSim"]["mean"] is None
    rows = {r["metric"]: r for r in csv.DictReader((report_dir / "idlora_face_eval.csv").open())}
    assert float(rows["FaceSim"]["mean"]) == pytest.approx(facesim["mean"], abs=1e-4)
    assert out["7"]["idlora_reports"] == ["idlora/reports/idlora_face_eval.json", "idlora/reports/idlora_face_eval.csv"]
    assert "FaceSim 0.9" in out["7"]["text"][0]
    table, preview = out["8"]["images"], out["4"]["images"]
    assert len(table) == 1 and _saved(srv, table[0]).stat().st_size > 1000
    assert len(preview) == 1 and _saved(srv, preview[0]).stat().st_size > 1000
    from PIL import Image
    with Image.open(_saved(srv, preview[0])) as im:
        assert im.size == (250, 480)  # the generated photo, with its box drawn


def test_image_without_a_face_is_counted_not_scored(srv):
    wf = workflow()
    wf["1"]["inputs"]["image"] = "no_face.jpg"
    del wf["3"], wf["4"]  # Face Detect would stop the run (if_no_face = error); scored alone, it is counted
    wf["7"]["inputs"]["name"] = "no_face_eval"
    hist, _ = srv.run(wf, timeout=300)
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]
    data = json.loads((srv.base / "output" / "idlora" / "reports" / "no_face_eval.json").read_text())
    assert data["metrics"]["FaceSim"]["mean"] is None and data["metrics"]["FaceSim"]["no_face"] == 1


def test_face_detect_error_names_the_image_and_server_survives(srv):
    wf = workflow()
    wf["1"]["inputs"]["image"] = "no_face.jpg"
    hist, events = srv.run(wf, timeout=300)
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert errors and errors[-1]["node_id"] == "3"
    assert "no face found" in errors[-1]["exception_message"] and "image 0" in errors[-1]["exception_message"]
    assert srv.alive()
