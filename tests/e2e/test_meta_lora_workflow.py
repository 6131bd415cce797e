"""The bundled Meta-LoRA workflow on a real ComfyUI server: stage 1 from the identity folder as a job, Load
Meta-Down, the augmentation preview, stage 2 on one photo, the collapsed LoRA through the stock LoraLoader, FaceSim;
and the bad inputs (an empty identity folder, a photo without a face, a Meta-Down of another base model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from server_util import last_error

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "api" / "idlora_meta_lora.json"


def workflow() -> dict:
    return json.loads(WORKFLOW.read_text())


def test_meta_lora_workflow_runs_end_to_end(srv):
    from idlora.training.lora_format import load_lora
    from idlora.training.meta_lora import load_meta_down
    hist, _ = srv.run(workflow(), timeout=600)
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]
    out = hist["outputs"]
    job = srv.get(f"/idlora/jobs/{out['2']['idlora_job'][0]}")[1]
    assert job["kind"] == "meta_lora_stage1" and job["state"] == "succeeded" and job["step"] == 12
    assert job["result"]["identities"] == 2
    weights, meta = load_meta_down(srv.base / "models" / "idlora" / "meta_down" / "idlora_meta_down_example.safetensors")
    assert meta["idlora_r1"] == "16" and meta["idlora_base_model"] == "sd15" and len(weights) == 8
    lora = load_lora(srv.base / "models" / "loras" / "idlora" / "idlora_meta_lora_example.safetensors")
    assert {w.down.shape[0] for w in lora.weights.values()} == {1}  # rank r2 = 1
    assert lora.metadata["idlora_method"] == "meta_lora"
    assert "15 crops" in out["6"]["text"][0] and "8 crops" in out["8"]["text"][0]
    [img] = out["16"]["images"]
    assert (srv.base / "output" / img["subfolder"] / img["filename"]).stat().st_size > 1000
    assert "FaceSim" in out["18"]["text"][0]
    # the baseline branch: LoRA + augmented inputs on the same crops, a plain rank-1 LoRA through the stock loader
    base = load_lora(srv.base / "models" / "loras" / "idlora" / "idlora_lora_aug_example.safetensors")
    assert base.metadata["idlora_method"] == "lora_aug" and {w.down.shape[0] for w in base.weights.values()} == {1}
    assert base.weights.keys() == lora.weights.keys()  # the Meta-Down's layers
    assert "8 crops, plain LoRA + augmented inputs" in out["21"]["text"][0] and "FaceSim" in out["27"]["text"][0]
    [img] = out["26"]["images"]
    assert (srv.base / "output" / img["subfolder"] / img["filename"]).stat().st_size > 1000
    # the evaluation loop: one row per (method, steps), each identity scored against its other photo only
    reports = srv.base / "output" / "idlora" / "reports"
    rows = (reports / "idlora_meta_lora_eval_loop.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["meta_lora", "2"], ["meta_lora", "4"], ["lora_aug", "2"],
                                                   ["lora_aug", "4"]]
    report = json.loads((reports / "idlora_meta_lora_eval_loop.json").read_text())
    assert {k: (v["reference"], v["others_scored"]) for k, v in report["identities"].items()} == {
        "astronaut": ("astronaut_1.jpg", ["astronaut_2_mirrored.jpg"]),
        "biden": ("biden_1.jpg", ["biden_2_mirrored.jpg"])}
    assert all(r["CLIP-T"]["count"] == 2 for r in report["rows"])  # the demo CLIP
    assert "| lora_aug | 4 |" in out["28"]["text"][0]


def test_stage1_paper_preset_refuses_a_contradicting_widget(srv):
    wf = {k: v for k, v in workflow().items() if k in ("1", "2")}
    wf["2"]["inputs"]["preset"] = "paper"
    hist, events = srv.run(wf, timeout=300)
    err = last_error(events)
    assert err["node_id"] == "2", err
    assert "preset 'paper' sets steps = 50000" in err["exception_message"], err["exception_message"]


def test_empty_identity_folder_is_named(srv):
    (srv.base / "input" / "bad_ids" / "alice").mkdir(parents=True)
    (srv.base / "input" / "bad_ids" / "bob").mkdir(parents=True)
    src = srv.base / "input" / "idlora_face_ref.jpg"
    (srv.base / "input" / "bad_ids" / "alice" / "a.jpg").write_bytes(src.read_bytes())
    wf = {k: v for k, v in workflow().items() if k in ("1", "2")}
    wf["2"]["inputs"]["dataset"] = "bad_ids"
    hist, events = srv.run(wf, timeout=300)
    err = last_error(events)
    assert err["node_id"] == "2" and "bob" in err["exception_message"], err["exception_message"]
    assert srv.alive()


def test_photo_without_a_face_is_named(srv):
    wf = {k: v for k, v in workflow().items() if k in ("5", "6", "7")}
    wf["5"]["inputs"]["image"] = "idlora_style_example.png"
    hist, events = srv.run(wf, timeout=300)
    err = last_error(events)
    assert err["node_id"] == "6" and "no face" in err["exception_message"].lower()
    assert "'photo' input" in err["exception_message"], err["exception_message"]


def test_meta_down_of_another_base_model_is_refused(srv):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    good = srv.base / "models" / "idlora" / "meta_down" / "idlora_meta_down_example.safetensors"
    assert good.exists(), "runs after the workflow test, which writes it"
    with safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
    meta["idlora_base_model"] = "sdxl"
    save_file(load_file(str(good)), str(good.with_name("sdxl_meta_down.safetensors")), metadata=meta)
    wf = {k: v for k, v in workflow().items() if k in ("1", "4", "5", "8")}
    wf["4"]["inputs"]["meta_down_name"] = "sdxl_meta_down.safetensors"
    wf["8"]["inputs"]["steps"] = 2
    wf["9"] = {"class_type": "IDLoRASaveLoRA", "inputs": {"lora": ["8", 0], "name": "never", "overwrite": True}}
    hist, events = srv.run(wf, timeout=300)
    err = last_error(events)
    assert err["node_id"] == "8", err
    assert "trained on base model 'sdxl', this model is 'sd15'" in err["exception_message"], err["exception_message"]
