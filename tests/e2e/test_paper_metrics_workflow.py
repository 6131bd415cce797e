"""The bundled paper-metrics workflow (workflows/api/idlora_paper_metrics.json) on a real ComfyUI server: FID,
CSD-s, DreamSim and ImageReward on the example images, all into one Evaluation Report, over HTTP.

The weights are seeded random files of the real architectures under the released names (tests/paper_metric_util.py),
written into this server's models/<fid|csd|dreamsim|image_reward> folders before anything is queued and removed
afterwards. What holds for any weights is checked: every metric reaches the report with a finite value in its range,
FID of the generated set against itself is 0 and against another set is not, DreamSim of each image against itself is
0 and against the photo is not; a missing weight file stops the prompt with the node's error naming the file and the
folder, and the server keeps serving.

DreamSim runs as the workflow ships it, the ``ensemble`` type (DINO, CLIP and OpenCLIP ViT-B/16 files).
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

import paper_metric_util as pmu

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "api" / "idlora_paper_metrics.json"
METRIC_NODES = {"IDLoRAFIDScore": "FID", "IDLoRACSDScore": "CSD-s", "IDLoRADreamSimScore": "DreamSim",
                "IDLoRAImageReward": "ImageReward"}
METRIC_FOLDERS = ("fid", "csd", "dreamsim", "image_reward")
DREAMSIM_TYPE = "ensemble"  # the bundled workflow's type (DreamSim's default)


@pytest.fixture(scope="module")
def weights(server_base):
    """The four metrics' random-weight files in the server's models folders; what was written is removed at the
    end of the module."""
    models = server_base / "models"
    before = {p for d in METRIC_FOLDERS for p in (models / d).rglob("*")} | \
        {models / d for d in METRIC_FOLDERS if (models / d).exists()}
    pmu.write_inception(models / "fid")
    pmu.write_csd(models / "csd")
    pmu.write_dreamsim_ensemble(models / "dreamsim")
    pmu.write_image_reward(models / "image_reward")
    yield models
    for d in METRIC_FOLDERS:
        for p in sorted((models / d).rglob("*"), reverse=True) + [models / d]:
            if p.exists() and p not in before:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def node_id(wf: dict, class_type: str) -> str:
    (nid,) = [k for k, v in wf.items() if v["class_type"] == class_type]
    return nid


def workflow() -> dict:
    """The bundled API workflow as it is."""
    wf = json.loads(WORKFLOW.read_text())
    assert wf[node_id(wf, "IDLoRADreamSimScore")]["inputs"]["dreamsim_type"] == DREAMSIM_TYPE
    return wf


def report(srv, name: str) -> dict:
    return json.loads((srv.base / "output" / "idlora" / "reports" / f"{name}.json").read_text())["metrics"]


def _ok(hist: dict) -> None:
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]


@pytest.fixture(scope="module")
def first_run(srv, weights):
    """The workflow run once (the later tests change a few inputs; ComfyUI's cache reruns only what changed)."""
    wf = workflow()
    hist, _ = srv.run(wf, timeout=600)
    _ok(hist)
    return wf, hist, report(srv, wf[node_id(wf, "IDLoRAEvaluationReport")]["inputs"]["name"])


def test_metric_nodes_are_registered(srv):
    status, info = srv.get("/object_info")
    assert status == 200 and set(METRIC_NODES) <= set(info)
    for cls in METRIC_NODES:
        assert info[cls]["category"] == "IDLoRA/metrics" and info[cls]["output"][2] == "IDLORA_METRICS"
    wf = json.loads(WORKFLOW.read_text())
    report_inputs = wf[node_id(wf, "IDLoRAEvaluationReport")]["inputs"]
    assert {wf[report_inputs[f"metrics_{i}"][0]]["class_type"] for i in range(1, 5)} == set(METRIC_NODES)


def test_workflow_scores_every_metric_into_the_report(srv, first_run):
    wf, hist, metrics = first_run
    assert set(metrics) == set(METRIC_NODES.values())
    for name, m in metrics.items():
        assert isinstance(m["mean"], float) and math.isfinite(m["mean"]), (name, m)
    fid, csd, dreamsim, reward = (metrics[k] for k in ("FID", "CSD-s", "DreamSim", "ImageReward"))
    assert fid["mean"] > 0 and fid["count"] == 2 and fid["detail"]["reference_count"] == 2
    assert -1 <= csd["mean"] <= 1 and csd["count"] == 2  # 2 generated images x 1 style image
    assert 0 < dreamsim["mean"] <= 2 and dreamsim["count"] == 2
    assert DREAMSIM_TYPE in dreamsim["detail"]["model"] and dreamsim["detail"]["pairs"] == "all"
    assert len(reward["values"]) == 2 and reward["mean"] == pytest.approx(sum(reward["values"]) / 2, abs=1e-6)
    assert reward["values"][0] != pytest.approx(reward["values"][1], abs=1e-6)  # one prompt line per image

    out = hist["outputs"]
    rep = node_id(wf, "IDLoRAEvaluationReport")
    name = wf[rep]["inputs"]["name"]
    assert out[rep]["idlora_reports"] == [f"idlora/reports/{name}.json", f"idlora/reports/{name}.csv"]
    summary = out[rep]["text"][0]
    assert all(f"{k} {metrics[k]['mean']:.4f}" in summary for k in metrics), summary
    rows = {r["metric"]: r for r in csv.DictReader((srv.base / "output" / out[rep]["idlora_reports"][1]).open())}
    assert {k: float(rows[k]["mean"]) for k in metrics} == pytest.approx({k: m["mean"] for k, m in metrics.items()},
                                                                         abs=1e-4)
    for cls, key in METRIC_NODES.items():  # each metric node shows its value on the canvas
        assert out[node_id(wf, cls)]["text"][0].startswith(f"{key} "), out[node_id(wf, cls)]
    (table,) = out[node_id(wf, "SaveImage")]["images"]
    saved = srv.base / "output" / table["subfolder"] / table["filename"]
    assert saved.stat().st_size > 1000


def test_fid_and_dreamsim_of_images_against_themselves_are_zero(srv, first_run):
    wf, _, before = first_run
    wf = json.loads(json.dumps(wf))
    generated = wf[node_id(wf, "IDLoRAFIDScore")]["inputs"]["images"]
    wf[node_id(wf, "IDLoRAFIDScore")]["inputs"]["reference_images"] = generated
    wf[node_id(wf, "IDLoRADreamSimScore")]["inputs"].update(reference_images=generated, pairs="paired")
    wf[node_id(wf, "IDLoRAEvaluationReport")]["inputs"]["name"] = "paper_metrics_self"
    hist, _ = srv.run(wf, timeout=600)
    _ok(hist)
    after = report(srv, "paper_metrics_self")
    assert before["FID"]["mean"] > 1 and abs(after["FID"]["mean"]) < 1e-3 * before["FID"]["mean"], \
        (after["FID"], before["FID"])
    assert abs(after["DreamSim"]["mean"]) < 1e-4 < before["DreamSim"]["mean"]
    assert after["DreamSim"]["detail"]["pairs"] == "paired"
    for key in ("CSD-s", "ImageReward"):  # unchanged inputs: the same numbers
        assert after[key]["mean"] == pytest.approx(before[key]["mean"], abs=1e-6)


def test_missing_weight_file_names_the_file_and_folder_and_server_survives(srv, first_run, weights):
    wf, _, _ = first_run
    wf = json.loads(json.dumps(wf))
    ir = node_id(wf, "IDLoRAImageReward")
    wf[ir]["inputs"]["prompt"] = "a photo of a person"  # a changed input, so that ComfyUI runs the node again
    wf[node_id(wf, "IDLoRAEvaluationReport")]["inputs"]["name"] = "paper_metrics_missing"
    folder = weights / "image_reward"
    aside = weights / "ImageReward.pt.aside"
    (folder / "ImageReward.pt").rename(aside)
    try:
        hist, events = srv.run(wf, timeout=600)
    finally:
        aside.rename(folder / "ImageReward.pt")
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert errors and errors[-1]["node_id"] == ir, errors
    assert errors[-1]["exception_type"].endswith("ModelFilesMissing"), errors[-1]["exception_type"]
    msg = errors[-1]["exception_message"]
    assert f"ImageReward needs ImageReward.pt in models/image_reward/ (searched: {folder}" in msg, msg
    assert "never downloads" in msg, msg
    assert hist["status"]["status_str"] == "error"
    assert not (srv.base / "output" / "idlora" / "reports" / "paper_metrics_missing.json").exists()
    assert srv.alive()
    hist, _ = srv.run(wf, timeout=600)  # the file is back: the same prompt now runs
    _ok(hist)
    assert len(report(srv, "paper_metrics_missing")["ImageReward"]["values"]) == 2
