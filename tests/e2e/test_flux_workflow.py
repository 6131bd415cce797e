"""The bundled Flux LoRA workflows (blocking and background) on a real ComfyUI server with the tiny Flux-dev
checkpoint: train, save a kohya Flux LoRA, apply it with the stock LoraLoader, sample an image."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]


def _workflow(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())


def _lora_keys(path: Path) -> tuple[set[str], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), f.metadata() or {}


def _check_run(srv, hist: dict, image_node: str) -> None:
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]
    images = hist["outputs"][image_node]["images"]
    assert len(images) == 1 and (srv.base / "output" / images[0]["subfolder"] / images[0]["filename"]).exists()


def _check_flux_file(path: Path) -> None:
    keys, meta = _lora_keys(path)
    stems = {k.split(".")[0] for k in keys}
    assert stems == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
                     "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_txt_attn_proj",
                     "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"}
    assert meta["idlora_base_model"] == "flux" and meta["idlora_prediction_type"] == "flow"


def test_flux_workflow_trains_saves_and_samples(srv):
    hist, events = srv.run(_workflow("idlora_flux_lora"))
    _check_run(srv, hist, "13")
    progress = [e["data"] for e in events if e["type"] == "progress" and e["data"].get("node") == "5"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 4
    saved = hist["outputs"]["6"]["lora_files"][0]
    assert saved == "idlora/idlora_flux_example.safetensors"
    _check_flux_file(srv.base / "models" / "loras" / saved)


def test_flux_background_workflow_runs_as_a_job(srv):
    hist, _ = srv.run(_workflow("idlora_flux_lora_background"))
    _check_run(srv, hist, "13")
    path = srv.base / "models" / "loras" / "idlora" / "idlora_flux_background_example.safetensors"
    assert path.exists()
    _check_flux_file(path)
    code, listing = srv.get("/idlora/jobs")
    job = next(j for j in listing["jobs"] if j["name"] == "idlora_flux_background_example")
    assert job["state"] == "succeeded" and job["step"] == job["total"] == 6


def test_flux_meta_lora_workflow_runs_end_to_end(srv):
    """The Meta-LoRA paper's setting on the tiny Flux-dev: stage 1 on the bundled identities as a job, stage 2 on one
    photo, the collapsed rank-1 LoRA with kohya Flux keys through the stock LoraLoaderModelOnly, an image, FaceSim."""
    from idlora.training.lora_format import load_lora
    from idlora.training.meta_lora import load_meta_down

    hist, _ = srv.run(_workflow("idlora_flux_meta_lora"), timeout=600)
    _check_run(srv, hist, "16")
    out = hist["outputs"]
    job = srv.get(f"/idlora/jobs/{out['2']['idlora_job'][0]}")[1]
    assert job["kind"] == "meta_lora_stage1" and job["state"] == "succeeded" and job["step"] == 8
    weights, meta = load_meta_down(srv.base / "models" / "idlora" / "meta_down" /
                                   "idlora_flux_meta_down_example.safetensors")
    assert meta["idlora_base_model"] == "flux" and meta["idlora_targets"] == "flux_attn" and len(weights) == 6
    path = srv.base / "models" / "loras" / "idlora" / "idlora_flux_meta_lora_example.safetensors"
    _check_flux_file(path)
    lora = load_lora(path)
    assert {w.down.shape[0] for w in lora.weights.values()} == {1} and lora.metadata["idlora_method"] == "meta_lora"
    assert "FaceSim" in out["18"]["text"][0]


def test_a_unet_preset_on_flux_is_refused_before_the_background_job(srv):
    """targets 'attn' (U-Net attention) in the background Flux workflow: the node refuses at once, naming the
    value, Flux and the presets that fit; no job starts."""
    from server_util import last_error

    wf = _workflow("idlora_flux_lora_background")
    train = next(k for k, v in wf.items() if v["class_type"] == "IDLoRATrainLoRA")
    wf[train]["inputs"]["targets"] = "attn"
    jobs_before = len(srv.get("/idlora/jobs")[1]["jobs"])
    hist, events = srv.run(wf, timeout=300)
    err = last_error(events)
    assert err["node_id"] == train, err
    msg = err["exception_message"]
    assert "targets = 'attn' is a preset for U-Net" in msg and "flux_attn" in msg and "(this model: flux)" in msg, msg
    assert len(srv.get("/idlora/jobs")[1]["jobs"]) == jobs_before and srv.alive()


def test_flux_duolora_workflow_merges_two_flux_loras(srv):
    """Two Flux LoRAs trained in the workflow, merged by DuoLoRA with block-pattern layer priors (double blocks:
    content, single blocks: style), saved as a kohya Flux file, applied by the stock LoraLoaderModelOnly, sampled."""
    from idlora.training.lora_format import load_lora

    hist, _ = srv.run(_workflow("idlora_flux_duolora"), timeout=600)
    _check_run(srv, hist, "18")
    path = srv.base / "models" / "loras" / "idlora" / "idlora_flux_duolora_example.safetensors"
    _check_flux_file(path)
    merged = load_lora(path)
    assert merged.metadata["idlora_method"] == "merge_duolora"
    masks = json.loads(merged.metadata["idlora_masks"])
    assert len(masks) == 6 and all(len(m["c"]) == 4 and len(m["s"]) == 4 for m in masks.values())
    [img] = hist["outputs"]["12"]["images"]  # the mask inspector's chart
    assert (srv.base / "output" / img["subfolder"] / img["filename"]).stat().st_size > 1000


def test_flux_identity_style_workflow_trains_both_loras_and_samples(srv):
    """Identity stylization on the tiny Flux-dev: the three-phase job (identity term on the stylized flow x0 through
    the Flux VAE), two kohya Flux LoRAs through stacked stock LoraLoaderModelOnly, an image, FaceSim and the CLIP
    score."""
    hist, _ = srv.run(_workflow("idlora_flux_identity_style"), timeout=600)
    _check_run(srv, hist, "16")
    out = hist["outputs"]
    job = srv.get(f"/idlora/jobs/{out['6']['idlora_job'][0]}")[1]
    assert job["state"] == "succeeded" and job["phases"] == ["style_content", "style", "content"], job
    assert job["step"] == job["total"] == 8
    loras = srv.base / "models" / "loras" / "idlora"
    for part in ("content", "style"):
        _check_flux_file(loras / f"idlora_flux_idstyle_example_{part}.safetensors")
    assert "FaceSim" in out["25"]["text"][0] and "CLIP-I (style)" in out["26"]["text"][0]
