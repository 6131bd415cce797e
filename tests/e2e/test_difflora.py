"""DiffLoRA on a real ComfyUI server, over HTTP: the training chain in one prompt (Build LoRA Dataset -> Train LoRA
Autoencoder -> Train DiffLoRA, each node waiting for the previous job), Wait for Job -> Load DiffLoRA -> Sample LoRA
from Face -> the saved kohya file through the stock LoraLoader -> an image; then a re-queued build skips the
finished identities and rebuilds only a changed one, and an LAE job is cancelled and resumed.

The face and CLIP embedders are the random-weight demo models (plumbing only); three identities of two photos."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from server_util import ended, job_status, last_error, wait_for

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
FACES = ROOT / "tests" / "assets" / "faces"
WORKFLOW_ASSETS = ROOT / "workflows" / "assets"
SERVER_ENV = {"IDLORA_CHECKPOINT_EVERY": "5"}
STEPS = 60  # of the cancelled LAE job (0.03 to 0.3 s each on a busy 2-core machine)
CLIP = {"clip_checkpoint": "idlora_demo_random_clip.safetensors", "architecture": "idlora-demo-tiny-clip"}


@pytest.fixture(scope="module")
def ids(srv) -> Path:
    """input/dl_ids: three identities of two photos each."""
    root = srv.base / "input" / "dl_ids"
    for name in ("astro", "obama", "obama3"):
        (root / name).mkdir(parents=True, exist_ok=True)
    astro = srv.base / "input" / "idlora_meta_identities" / "astronaut"
    for f in ("astronaut_1.jpg", "astronaut_2_mirrored.jpg"):
        shutil.copy(astro / f, root / "astro" / f)
    for f in ("obama.jpg", "obama2.jpg"):
        shutil.copy(FACES / f, root / "obama" / f)
    shutil.copy(FACES / "obama3.jpg", root / "obama3" / "a.jpg")
    ImageOps.mirror(Image.open(FACES / "obama3.jpg")).save(root / "obama3" / "b.jpg")
    return root


def build_nodes(dataset_name: str = "dl_e2e") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "idlora_tiny_sd15.safetensors"}},
        "2": {"class_type": "IDLoRAFaceEmbedder", "inputs": {"backend": "arcface-onnx", "pack": "idlora_demo",
                                                             "device": "CPU"}},
        "3": {"class_type": "IDLoRABuildLoraDataset", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "folder": "dl_ids", "face_embedder": ["2", 0],
            **CLIP, "trainer": "lora", "steps": 3, "rank": 2, "targets": "attn", "learning_rate": 1e-3, "seed": 0,
            "resolution": 128, "class_word": "person", "shard_index": 0, "shard_count": 1, "name": dataset_name}},
    }


def lae_node(steps: int = 20, name: str = "dl_lae") -> dict:
    return {"class_type": "IDLoRATrainLoraAutoencoder", "inputs": {
        "dataset": ["3", 0], "job": ["3", 1], "steps": steps, "learning_rate": 3e-3, "batch_size": 2,
        "wp_weight": 1.0, "patch": 16, "levels": 3, "channels": 16, "latent_channels": 2, "seed": 0, "name": name}}


def chain() -> dict:
    return {
        **build_nodes(),
        "4": lae_node(),
        "5": {"class_type": "IDLoRATrainDiffLoRA", "inputs": {
            "dataset": ["3", 0], "lae": ["4", 0], "job": ["4", 1], "steps": 20, "learning_rate": 1e-3,
            "batch_size": 4, "hidden": 16, "depth": 1, "heads": 2, "seed": 0, "name": "dl_difflora"}},
        "6": {"class_type": "IDLoRAWaitForJob", "inputs": {"job": ["5", 1], "which": "difflora"}},
        "7": {"class_type": "IDLoRALoadDiffLoRA", "inputs": {"difflora_name": ["6", 1]}},
        "8": {"class_type": "LoadImage", "inputs": {"image": "idlora_face_ref.jpg"}},
        "9": {"class_type": "IDLoRASampleLoraFromFace", "inputs": {
            "model": ["1", 0], "difflora": ["7", 0], "image": ["8", 0], "face_embedder": ["2", 0], **CLIP,
            "steps": 20, "seed": 0, "strength": 1.0, "save_name": "dl_face"}},
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": ["9", 2],
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["10", 1], "text": "a photo of a person"}},
        "12": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "13": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "normal",
                                                    "positive": ["11", 0], "negative": ["11", 0],
                                                    "latent_image": ["12", 0], "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "idlora/difflora"}},
    }


def ok(hist: dict) -> None:
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]


def test_training_chain_then_sampling(srv, ids):
    from idlora.training.difflora import load_difflora
    from idlora.training.lora_format import load_lora
    hist, _ = srv.run(chain(), timeout=300)
    ok(hist)
    out = hist["outputs"]
    assert out["3"]["text"] == ["3 identities: 3 to train, 0 finished"]
    build = job_status(srv, out["3"]["idlora_job"][0])
    assert build["kind"] == "lora_dataset" and build["state"] == "succeeded"
    assert build["result"]["trained"] == ["astro", "obama", "obama3"] and build["step"] == 9
    dataset = srv.base / "models" / "idlora" / "lora_datasets" / "dl_e2e"
    assert Path(build["result"]["dataset"]) == dataset and (dataset / "manifest.json").exists()
    lae = job_status(srv, out["4"]["idlora_job"][0])
    assert lae["kind"] == "difflora_lae" and lae["result"]["lae"] == "dl_lae.safetensors"
    assert lae["result"]["compression"] > 1 and lae["result"]["relative_error_mean"] >= 0
    dit = job_status(srv, out["5"]["idlora_job"][0])
    assert dit["kind"] == "difflora_dit" and dit["state"] == "succeeded" and dit["step"] == 20
    model = load_difflora(srv.base / "models" / "difflora" / "dl_difflora.safetensors")
    assert model.dit is not None and model.meta["identities"] == 3 and model.meta["base_model"] == "sd15"
    assert model.meta["embedders"] == {"face": "arcface (idlora_demo)",
                                       "image": "open_clip idlora-demo-tiny-clip idlora_demo_random_clip.safetensors"}
    assert "dl_difflora.safetensors" in out["7"]["text"][0]
    assert "S_face" in out["9"]["text"][0] and "saved idlora/dl_face.safetensors" in out["9"]["text"][0]
    lora = load_lora(srv.base / "models" / "loras" / "idlora" / "dl_face.safetensors")
    assert lora.metadata["idlora_method"] == "difflora" and lora.ranks == {2}
    [img] = out["15"]["images"]
    assert (srv.base / "output" / img["subfolder"] / img["filename"]).stat().st_size > 100


def test_requeued_build_skips_finished_and_rebuilds_only_a_changed_identity(srv, ids):
    dataset = srv.base / "models" / "idlora" / "lora_datasets" / "dl_e2e"
    assert (dataset / "obama" / "entry.json").exists(), "runs after the chain test, which builds the dataset"
    untouched = (dataset / "astro" / "lora.safetensors").stat().st_mtime_ns
    # nothing to train: no job, and the LAE node then starts at once on the finished dataset
    hist, _ = srv.run({**build_nodes(), "4": lae_node(steps=2, name="dl_lae2")}, timeout=120)
    ok(hist)
    out = hist["outputs"]
    assert out["3"]["text"] == ["3 identities: 0 to train, 3 finished"] and "idlora_job" not in out["3"]
    assert wait_for(srv, out["4"]["idlora_job"][0], ended)["state"] == "succeeded"
    # one identity's images change: only it is trained again
    img = srv.base / "input" / "dl_ids" / "obama3" / "b.jpg"
    Image.open(img).rotate(3).save(img)
    hist, _ = srv.run(build_nodes(), timeout=120)
    ok(hist)
    assert hist["outputs"]["3"]["text"] == ["3 identities: 1 to train, 2 finished"]
    st = wait_for(srv, hist["outputs"]["3"]["idlora_job"][0], ended)
    assert st["state"] == "succeeded" and st["result"]["trained"] == ["obama3"], st
    assert (dataset / "astro" / "lora.safetensors").stat().st_mtime_ns == untouched


def test_lae_job_cancel_then_resume(srv, ids):
    lae_file = srv.base / "models" / "difflora" / "dl_lae_cut.safetensors"
    hist, _ = srv.run({**build_nodes(), "4": lae_node(steps=STEPS, name="dl_lae_cut")}, timeout=120)
    ok(hist)
    job_id = hist["outputs"]["4"]["idlora_job"][0]
    wait_for(srv, job_id, lambda s: s["step"] >= 10 or ended(s))
    code, body = srv.request("POST", f"/idlora/jobs/{job_id}/cancel")
    assert code == 200, body
    st = wait_for(srv, job_id, ended)
    assert st["state"] == "cancelled" and 10 <= st["step"] < STEPS, st
    assert (Path(st["folder"]) / "checkpoint.pt").exists() and not lae_file.exists()
    code, body = srv.request("POST", f"/idlora/jobs/{job_id}/resume")
    assert code == 200, body
    st = wait_for(srv, job_id, ended)
    assert st["state"] == "succeeded" and st["resumes"] == 1 and st["step"] == STEPS, st
    assert lae_file.exists() and st["result"]["steps"] == STEPS
    steps = [r["step"] for r in srv.get(f"/idlora/jobs/{job_id}/loss")[1]["losses"]]
    assert steps == list(range(1, STEPS + 1)), "the resumed run continues the step count"


def test_wrong_inputs_are_named(srv, ids):
    wf = build_nodes("dl_bad")
    wf["3"]["inputs"]["trainer"] = "meta_lora"
    hist, events = srv.run(wf, timeout=120)
    err = last_error(events)
    assert err["node_id"] == "3" and "meta_down is not connected" in err["exception_message"]
    (srv.base / "input" / "dl_faceless" / "drawing").mkdir(parents=True, exist_ok=True)  # a drawing, no face
    shutil.copy(WORKFLOW_ASSETS / "idlora_example.png", srv.base / "input" / "dl_faceless" / "drawing" / "1.png")
    wf = build_nodes("dl_faceless")
    wf["3"]["inputs"]["folder"] = "dl_faceless"
    hist, events = srv.run(wf, timeout=120)
    err = last_error(events)
    assert "identity 'drawing': no face was found in any of its 1 images" in err["exception_message"], err
    assert not (srv.base / "models" / "idlora" / "lora_datasets" / "dl_faceless").exists()
    from idlora.models.lae import LaeConfig, LoraAutoencoder
    from idlora.training.difflora import save_difflora
    from idlora.training.lora_vector import LayerSpec, LoraLayout
    layout = LoraLayout([LayerSpec("a.to_q", 8, (1, 8), (8, 1), 1.0)])
    save_difflora(srv.base / "models" / "difflora" / "dl_lae_only.safetensors", layout,
                  LoraAutoencoder(LaeConfig(layout.length, patch=4, levels=1, channels=8, heads=2, mlp_hidden=8)))
    wf = {"1": {"class_type": "IDLoRALoadDiffLoRA", "inputs": {"difflora_name": "dl_lae_only.safetensors"}}}
    wf["2"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
    hist, events = srv.run(wf, timeout=60)
    err = last_error(events)
    assert "holds only a LoRA autoencoder" in err["exception_message"], err


def test_demo_difflora_samples_a_lora(srv):
    """The random-weight demo DiffLoRA that ./idlora start links into models/difflora (for the bundled workflow)."""
    demo = "idlora_demo_random_difflora.safetensors"
    if not (srv.base / "models" / "difflora" / demo).exists():
        pytest.skip("no demo DiffLoRA among the demo models")
    wf = {k: v for k, v in chain().items() if k in ("1", "2", "8", "9")}
    wf["7"] = {"class_type": "IDLoRALoadDiffLoRA", "inputs": {"difflora_name": demo}}
    wf["9"]["inputs"].update(save_name="", steps=100)
    hist, _ = srv.run(wf, timeout=120)
    ok(hist)
    text = hist["outputs"]["9"]["text"][0]
    assert "100 DDIM steps" in text and "S_face" in text and "saved" not in text, text


def test_nodes_are_registered_with_tooltips(srv):
    status, info = srv.get("/object_info")
    assert status == 200
    ids = ("IDLoRABuildLoraDataset", "IDLoRATrainLoraAutoencoder", "IDLoRATrainDiffLoRA", "IDLoRALoadDiffLoRA",
           "IDLoRASampleLoraFromFace")
    for node_id in ids:
        spec = info[node_id]
        for group in ("required", "optional"):
            for name, (_, opts) in spec["input"].get(group, {}).items():
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
    which = info["IDLoRAWaitForJob"]["input"]["optional"]["which"]
    assert {"dataset", "lae", "difflora"} <= set(which[0] if isinstance(which[0], list) else which[1]["options"])
