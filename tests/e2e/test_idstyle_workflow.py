"""The bundled identity-stylization workflow on a real ComfyUI server: a photo and a style image become a
stylized portrait through the three-phase background job, the stock LoraLoaders and the content/style guider,
with FaceSim and a CLIP score beside it; a photo without a face is a clear error that names the image."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "api" / "idlora_identity_style.json"


def workflow() -> dict:
    return json.loads(WORKFLOW.read_text())


def test_identity_style_workflow_runs_end_to_end(srv):
    hist, events = srv.run(workflow(), timeout=600)
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]
    out = hist["outputs"]
    job_id = out["6"]["idlora_job"][0]
    status, job = srv.get(f"/idlora/jobs/{job_id}")
    assert status == 200 and job["state"] == "succeeded", job
    # identity_target stylized: the style LoRA first, then the content LoRA scored on the stylized x0
    assert job["phases"] == ["style_content", "style", "content"] and job["step"] == job["total"] == 32
    status, losses = srv.get(f"/idlora/jobs/{job_id}/loss")
    phases = [r["phase"] for r in (losses["losses"] if isinstance(losses, dict) else losses)]
    assert phases == ["style_content"] * 6 + ["style"] * 10 + ["content"] * 16
    assert 0 < job["result"]["identity_loss_last"] < 2
    loras = srv.base / "models" / "loras" / "idlora"
    assert (loras / "idlora_idstyle_example_content.safetensors").stat().st_size > 0
    assert (loras / "idlora_idstyle_example_style.safetensors").stat().st_size > 0
    for node in ("16", "23"):  # the two LoraLoaders path and the guided path each saved a portrait
        [img] = out[node]["images"]
        assert (srv.base / "output" / img["subfolder"] / img["filename"]).stat().st_size > 1000
    assert "FaceSim" in out["25"]["text"][0] and "CLIP-I (style)" in out["26"]["text"][0]
    assert json.loads((srv.base / "output" / "idlora" / "reports" / "idlora_idstyle_eval.json").read_text())


def test_photo_without_a_face_names_the_image(srv):
    wf = workflow()
    wf["2"]["inputs"]["image"] = "idlora_style_example.png"  # no face in it
    hist, events = srv.run(wf, timeout=300)
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert errors and errors[-1]["node_id"] == "6", errors
    msg = errors[-1]["exception_message"]
    assert "no face found in image 0" in msg and "'photo' input" in msg, msg
    assert srv.alive()


def test_style_image_with_a_face_is_fine_and_the_job_can_be_cancelled(srv):
    wf = workflow()
    train = {k: wf[k] for k in ("1", "2", "3", "5", "6")}
    train["4"] = {"class_type": "LoadImage", "inputs": {"image": "idlora_face_gen.jpg"}}  # a face as style
    train["6"]["inputs"].update(name="idstyle_cancel", content_steps=400, x0_start_step=100,
                                identity_target="reconstruction")  # the content phase first
    hist, _ = srv.run(train, timeout=300)
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]
    job_id = hist["outputs"]["6"]["idlora_job"][0]
    deadline = time.time() + 120
    while srv.get(f"/idlora/jobs/{job_id}")[1]["step"] < 2:
        assert time.time() < deadline
        time.sleep(0.2)
    status, _ = srv.request("POST", f"/idlora/jobs/{job_id}/cancel")
    assert status == 200
    while srv.get(f"/idlora/jobs/{job_id}")[1]["state"] != "cancelled":
        assert time.time() < deadline
        time.sleep(0.2)
    job = srv.get(f"/idlora/jobs/{job_id}")[1]
    assert job["phase"] == "content" and 2 <= job["step"] < 400
    assert not (srv.base / "models" / "loras" / "idlora" / "idstyle_cancel_content.safetensors").exists()


def test_a_block_preset_that_does_not_fit_flux_is_refused_before_the_job(srv):
    """The workflow's blocks 'attn' (U-Net attention) on the tiny Flux-dev: the node refuses at once, naming the
    blocks, the model family and the preset that fits; no job starts."""
    wf = {k: v for k, v in workflow().items() if k in ("1", "2", "3", "4", "5", "6")}
    wf["1"]["inputs"]["ckpt_name"] = "idlora_tiny_flux.safetensors"
    wf["30"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "idlora_tiny_clip_l.safetensors",
                                                        "type": "stable_diffusion", "device": "default"}}
    wf["6"]["inputs"]["clip"] = ["30", 0]
    assert wf["6"]["inputs"]["blocks"] == "attn"
    jobs_before = len(srv.get("/idlora/jobs")[1]["jobs"])
    hist, events = srv.run(wf, timeout=300)
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert errors and errors[-1]["node_id"] == "6", errors
    msg = errors[-1]["exception_message"]
    assert "blocks = 'attn' selects no layers of this model (flux)" in msg and "flux_attn" in msg, msg
    assert len(srv.get("/idlora/jobs")[1]["jobs"]) == jobs_before
    assert srv.alive()
