"""`./idlora start --models-dir`: an existing ComfyUI models folder is used beside the embedded defaults."""
import sys
from pathlib import Path

import pytest

import server_util

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]


def test_models_dir_option_adds_external_models(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import bootstrap
    from conftest import comfy_dir

    external = tmp_path / "OtherComfyUI" / "models"
    (external / "checkpoints").mkdir(parents=True)
    (external / "loras").mkdir()
    (external / "checkpoints" / "my_model.safetensors").symlink_to(server_util.tiny_ckpt())
    (external / "loras" / "my_style.safetensors").write_bytes(b"")
    base = server_util.make_base(tmp_path / "base", server_util.tiny_ckpt())

    cfg = bootstrap.extra_model_paths(base, external)
    assert f"base_path: {external}" in cfg.read_text() and "checkpoints: checkpoints/" in cfg.read_text()
    srv = server_util.start(base, comfy_dir(), extra_args=["--extra-model-paths-config", str(cfg)])
    try:
        ckpts = srv.get("/object_info/CheckpointLoaderSimple")[1]["CheckpointLoaderSimple"]["input"]["required"]
        names = ckpts["ckpt_name"][0]
        assert "my_model.safetensors" in names and "idlora_tiny_sd15.safetensors" in names
        typ, opts = srv.get("/object_info/IDLoRALoadLoRA")[1]["IDLoRALoadLoRA"]["input"]["required"]["lora_name"]
        assert typ == "COMBO" and "my_style.safetensors" in opts["options"]
    finally:
        srv.stop()


def test_models_dir_must_exist(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import bootstrap
    with pytest.raises(SystemExit, match="is not a folder"):
        bootstrap.extra_model_paths(tmp_path, tmp_path / "nope")
