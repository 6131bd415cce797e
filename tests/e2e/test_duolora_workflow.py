"""The bundled DuoLoRA workflow on a real ComfyUI server: two LoRAs of unequal rank are trained, merged with
DuoLoRA and naively, saved, loaded by the stock LoraLoader and sampled; the mask inspector draws the ranks; a merge
as a background job; and the bad inputs (no LoRA, an empty prompt, a LoRA of another model) are clear errors."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from server_util import last_error

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "api" / "idlora_duolora.json"


def workflow() -> dict:
    return json.loads(WORKFLOW.read_text())


def test_duolora_workflow_runs_and_exports_a_standard_lora(srv):
    from idlora.training.lora_format import load_lora
    hist, _ = srv.run(workflow(), timeout=600)
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]
    out = hist["outputs"]
    loras = srv.base / "models" / "loras" / "idlora"
    duo, naive = (load_lora(loras / f"idlora_{m}_example.safetensors") for m in ("duolora", "naive"))
    assert duo.metadata["idlora_method"] == "merge_duolora" and naive.metadata["idlora_method"] == "merge_naive"
    assert max(w.rank for w in naive.weights.values()) == 12  # content rank 8 + style rank 4, nothing pruned
    masks = json.loads(duo.metadata["idlora_masks"])
    assert all(len(m["c"]) == 8 and len(m["s"]) == 4 for m in masks.values())
    for node in ("18", "27", "12"):
        [img] = out[node]["images"]
        assert (srv.base / "output" / img["subfolder"] / img["filename"]).stat().st_size > 1000
    assert "content" in out["10"]["text"][0] and "style" in out["10"]["text"][0]


def test_merge_as_a_background_job(srv):
    wf = workflow()
    keep = {"1", "2", "3", "4", "5", "6", "7", "8"}
    wf = {k: v for k, v in wf.items() if k in keep}
    wf["8"]["inputs"].update(mode="background", name="duolora_job", method="ziplora")
    wf["30"] = {"class_type": "IDLoRAWaitForJob", "inputs": {"job": ["8", 2], "which": "main"}}
    wf["31"] = {"class_type": "IDLoRAMaskInspector", "inputs": {"lora": ["30", 0], "threshold": 0.5}}
    hist, events = srv.run(wf, timeout=600)
    err = last_error(events)  # ZipLoRA keeps only mask means: the inspector says so instead of drawing garbage
    assert err["node_id"] == "31" and "ZipLoRA" in err["exception_message"], err
    job_id = hist["outputs"]["8"]["idlora_job"][0]
    deadline = time.time() + 300
    while (job := srv.get(f"/idlora/jobs/{job_id}")[1])["state"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.5)
    assert job["state"] == "succeeded" and job["kind"] == "duolora" and job["result"]["method"] == "ziplora"
    assert (srv.base / "models" / "loras" / "idlora" / "duolora_job.safetensors").exists()


@pytest.mark.parametrize("change,needle", [
    ({"content_lora": None}, "no content LoRA"),
    ({"mixed_prompt": "  "}, "mixed_prompt is empty"),
])
def test_bad_inputs_are_named(srv, change, needle):
    wf = {k: v for k, v in workflow().items() if k in {"1", "2", "3", "4", "5", "6", "7", "8", "9"}}
    for key, value in change.items():
        if value is None:
            del wf["8"]["inputs"][key]
        else:
            wf["8"]["inputs"][key] = value
    hist, events = srv.run(wf, timeout=300)
    err = last_error(events)
    assert err["node_id"] == "8" and needle in err["exception_message"], err["exception_message"]
    assert srv.alive()


def test_lora_of_another_model_is_refused(srv):
    from safetensors.torch import save_file
    import torch
    alien = srv.base / "models" / "loras" / "alien.safetensors"
    save_file({"lora_unet_not_a_layer_of_sd15.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_not_a_layer_of_sd15.lora_up.weight": torch.zeros(320, 4)}, str(alien))
    wf = {k: v for k, v in workflow().items() if k in {"1", "2", "3", "4", "5", "6", "8", "9"}}
    del wf["8"]["inputs"]["style_lora"]
    wf["8"]["inputs"]["style_lora_name"] = "alien.safetensors"
    hist, events = srv.run(wf, timeout=300)
    err = last_error(events)
    assert err["node_id"] == "8" and "style LoRA does not fit this model" in err["exception_message"], err
