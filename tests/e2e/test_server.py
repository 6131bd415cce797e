"""A real ComfyUI server (main.py --cpu) with the pack: the bundled workflow over HTTP + websocket,
bad inputs, and the saved LoRA file checked against the trainer's own forward."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import server_util

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "api" / "idlora_train_lora.json"


def workflow(**overrides) -> dict:
    wf = json.loads(WORKFLOW.read_text())
    for path, value in overrides.items():
        node, key = path.split("__")
        wf[node]["inputs"][key] = value
    return wf


def test_pack_nodes_are_registered_with_tooltips(srv):
    status, info = srv.get("/object_info")
    assert status == 200
    ours = {k: v for k, v in info.items() if k.startswith("IDLoRA")}
    assert {"IDLoRATrainLoRA", "IDLoRASaveLoRA", "IDLoRALoadLoRA", "IDLoRAApplyLoRA", "IDLoRALossPlot"} <= set(ours)
    for node_id, spec in ours.items():
        for group in ("required", "optional"):
            for name, (_, opts) in spec["input"].get(group, {}).items():
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_workflow_is_served_as_template(srv):
    status, templates = srv.get("/workflow_templates")
    assert status == 200 and "idlora_train_lora" in templates.get("IDLoRA", [])
    status, body = srv.get("/api/workflow_templates/IDLoRA/idlora_train_lora.json")
    assert status == 200 and "nodes" in body and "links" in body


def test_bundled_workflow_runs(srv):
    hist, events = srv.run(workflow())
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]
    # the training node reported progress over the websocket, one event per step
    progress = [e["data"] for e in events if e["type"] == "progress" and e["data"].get("node") == "3"]
    assert len(progress) >= 30 and progress[-1]["value"] == progress[-1]["max"] == 30
    out = hist["outputs"]
    images = out["11"]["images"]
    assert len(images) == 1 and (srv.base / "output" / images[0]["subfolder"] / images[0]["filename"]).exists()
    assert out["13"]["images"], "the loss plot was saved"
    saved = out["4"]["lora_files"][0]
    assert saved == "idlora/idlora_example.safetensors"
    assert (srv.base / "models" / "loras" / saved).exists()


def test_saved_lora_reproduces_trainer_forward_in_stock_loader(srv, comfy, tmp_path):
    """The file the server wrote, loaded by the stock LoraLoaderModelOnly on the tiny checkpoint's U-Net,
    gives the trainer's own forward (LoRA as a side branch) to float precision."""
    import comfy.sd
    import comfy_tiny
    import folder_paths
    import nodes
    from idlora.models.lora import LoraNetwork, select_targets
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.lora_format import load_lora

    path = srv.base / "models" / "loras" / "idlora" / "idlora_example.safetensors"
    if not path.exists():
        srv.run(workflow())
    bundle = load_lora(path)
    meta = bundle.metadata
    assert meta["idlora_method"] == "lora" and meta["idlora_base_model"] == "sd15"
    assert json.loads(meta["idlora_config"])["rank"] == 8

    model = comfy.sd.load_checkpoint_guess_config(str(server_util.tiny_ckpt()), output_vae=False, output_clip=False)[0]
    diffusion = ComfyDiffusion(model)
    net = LoraNetwork(select_targets(diffusion.denoiser, meta["idlora_targets"]), rank=8)
    by_stem = {diffusion.lora_stems[k]: k for k in net.names}  # SD1.x: kohya's diffusers-layout stems
    for stem, w in bundle.weights.items():
        net.layer(by_stem[stem]).set_weights(w.down, w.up, w.alpha)
    g = torch.Generator().manual_seed(0)
    x, sigma, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([3.0]), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad(), net.attached():
        ours = diffusion.net_forward(x, sigma, {"context": ctx})

    folder_paths.add_model_folder_path("loras", str(path.parent.parent), is_default=True)
    (stock_model,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "idlora/idlora_example.safetensors", 1.0)
    stock = comfy_tiny.diffusion_forward(stock_model, x, sigma, ctx)
    torch.testing.assert_close(stock.float(), ours.float(), rtol=1e-4, atol=1e-4)
    base = comfy_tiny.diffusion_forward(model, x, sigma, ctx)
    assert (stock - base).abs().max() > 1e-5, "the trained LoRA changes the output"


def _error_of(srv, prompt: dict) -> str:
    """Run a prompt expected to fail; return its error text (validation or execution)."""
    status, body = srv.queue(prompt)
    if status != 200:
        return json.dumps(body)
    hist, events = srv.run(prompt)
    errs = [e["data"] for e in events if e["type"] == "execution_error"]
    assert errs, f"expected an execution error, got status {hist.get('status')}"
    return errs[-1]["exception_message"]


def _small(prompt: dict) -> dict:
    """Drop the sampling part: only what training and saving need."""
    return {k: v for k, v in prompt.items() if k in ("1", "2", "3", "4")}


def _write_bad_files(loras: Path) -> None:
    from safetensors.torch import save_file
    loras.mkdir(parents=True, exist_ok=True)
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, str(loras / "not_a_lora.safetensors"))
    good = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4)}
    save_file(good, str(loras / "truncated.safetensors"))
    data = (loras / "truncated.safetensors").read_bytes()
    (loras / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    sdxl = {}  # SDXL-shaped kohya keys: wrong widths where names overlap, unknown names elsewhere
    for stem, (o, i) in {"input_blocks_1_1_transformer_blocks_0_attn1_to_q": (640, 640),
                         "input_blocks_1_1_transformer_blocks_0_attn2_to_k": (320, 2048),
                         "input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
                         "middle_block_1_transformer_blocks_9_attn1_to_q": (1280, 1280)}.items():
        sdxl[f"lora_unet_{stem}.lora_down.weight"] = torch.zeros(4, i)
        sdxl[f"lora_unet_{stem}.lora_up.weight"] = torch.zeros(o, 4)
    save_file(sdxl, str(loras / "sdxl_lora.safetensors"))


def _apply_prompt(lora_name: str) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "idlora_tiny_sd15.safetensors"}},
            "2": {"class_type": "IDLoRAApplyLoRA", "inputs": {"model": ["1", 0], "strength": 1.0,
                                                              "lora_name": lora_name}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}


def _train_prompt(**inputs) -> dict:
    wf = _small(workflow(**{"3__steps": 2}))
    for k, v in inputs.items():
        node, key = ("4", "name") if k == "name" else ("3", k)
        wf[node]["inputs"][key] = v
    return wf


BAD_INPUTS = [
    ("prompt count", lambda: _train_prompt(prompt="one\ntwo\nthree"), "prompt has 3 lines but images has 1"),
    ("rank 0", lambda: _train_prompt(rank=0), "rank"),
    ("negative rank", lambda: _train_prompt(rank=-4), "rank"),
    ("escape name", lambda: _train_prompt(name="../escape"), "../escape"),
    ("not a LoRA", lambda: _apply_prompt("not_a_lora.safetensors"), "holds no LoRA weights"),
    ("truncated", lambda: _apply_prompt("truncated.safetensors"), "truncated"),
    ("other architecture", lambda: _apply_prompt("sdxl_lora.safetensors"), "of 4 LoRA modules match this model"),
]


@pytest.mark.parametrize("case,make,expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_clear_errors_server_survives(srv, case, make, expected):
    _write_bad_files(srv.base / "models" / "loras")
    msg = _error_of(srv, make())
    assert expected in msg, msg
    assert srv.alive() and srv.get("/object_info/IDLoRASaveLoRA")[0] == 200
    assert not list((srv.base / "models" / "loras").rglob("escape*"))


def test_empty_image_batch_is_a_clear_error(comfy):
    """No stock node makes a 0-image batch, so the node is called directly with one."""
    from idlora.nodes.lora_nodes import TrainLoRA
    from idlora.training.lora_trainer import TrainingInputError
    with pytest.raises(TrainingInputError, match="images .*empty.*connect at least one image"):
        TrainLoRA.execute(model=None, clip=None, vae=None, images=torch.zeros(0, 64, 64, 3), prompt="x", steps=1,
                          learning_rate=1e-4, rank=4, alpha=0.0, targets="attn", batch_size=1, seed=0,
                          gradient_checkpointing=False, precision="auto")


UI_WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


@pytest.mark.parametrize("ui_path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_ui_workflow_and_api_twin_do_not_drift(srv, ui_path):
    """The UI file, converted as the frontend's "Export (API)" does, is the API twin."""
    from workflow_convert import to_api
    strip = lambda api: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}  # noqa: E731
    twin = ROOT / "workflows" / "api" / ui_path.name
    assert twin.exists(), f"{ui_path.name} has no API twin in workflows/api/"
    info = srv.get("/object_info")[1]
    assert strip(to_api(json.loads(ui_path.read_text()), info)) == strip(json.loads(twin.read_text()))


def test_every_api_twin_has_a_ui_workflow():
    assert {p.name for p in (ROOT / "workflows" / "api").glob("*.json")} == {p.name for p in UI_WORKFLOWS}
