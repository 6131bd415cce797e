"""The bundled DiffLoRA workflows on a real ComfyUI server: sampling a LoRA from a face with the demo DiffLoRA, and
the training chain (identity folder -> LoRA dataset -> LAE -> DiT -> sample)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]


def workflow(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())


def succeeded(hist: dict) -> dict:
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]
    return hist["outputs"]


def test_sample_workflow_turns_a_face_into_a_saved_lora_and_an_image(srv):
    from idlora.training.lora_format import load_lora
    out = succeeded(srv.run(workflow("idlora_difflora_sample"), timeout=300)[0])
    assert "100 DDIM steps" in out["5"]["text"][0] and "S_face" in out["5"]["text"][0]
    lora = load_lora(srv.base / "models" / "loras" / "idlora" / "idlora_difflora_example.safetensors")
    assert lora.metadata["idlora_method"] == "difflora" and {w.rank for w in lora.weights.values()} == {1}
    assert any(float(w.up.abs().max()) > 0 for w in lora.weights.values())
    [img] = out["10"]["images"]
    assert (srv.base / "output" / img["subfolder"] / img["filename"]).stat().st_size > 1000
    assert "FaceSim" in out["11"]["text"][0]


def test_train_workflow_builds_the_dataset_then_lae_then_dit_then_samples(srv):
    from idlora.training.difflora import load_difflora
    out = succeeded(srv.run(workflow("idlora_difflora_train"), timeout=600)[0])
    jobs = {k: srv.get(f"/idlora/jobs/{out[k]['idlora_job'][0]}")[1] for k in ("3", "4", "5")}
    assert [jobs[k]["kind"] for k in ("3", "4", "5")] == ["lora_dataset", "difflora_lae", "difflora_dit"]
    assert all(j["state"] == "succeeded" for j in jobs.values())
    assert jobs["3"]["result"]["identities"] == 2 and jobs["4"]["result"]["compression"] > 1
    model = load_difflora(srv.base / "models" / "difflora" / "idlora_difflora_example.safetensors")
    assert model.dit is not None and model.meta["identities"] == 2
    assert "100 DDIM steps" in out["9"]["text"][0]
    [img] = out["14"]["images"]
    assert (srv.base / "output" / img["subfolder"] / img["filename"]).stat().st_size > 1000
    # queued again: both identities are finished, so nothing is trained a second time
    again = succeeded(srv.run(workflow("idlora_difflora_train"), timeout=600)[0])
    assert "0 to train, 2 finished" in again["3"]["text"][0]
