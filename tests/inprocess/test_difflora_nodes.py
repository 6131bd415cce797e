"""DiffLoRA's load and sample nodes on ComfyUI's tiny SD1.5 U-Net, with the random-weight demo face (ArcFace
architecture, ONNX) and CLIP embedders: a tiny DiffLoRA is trained here with the core on LoRAs of the tiny model's
attention layout. The sampled LoRA patches the model, its kohya file gives the same output through the stock
LoraLoader, a seed gives one LoRA; wrong embedders, an LAE-only file and a failed upstream job are clear errors."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy
FACES = Path(__file__).resolve().parents[1] / "assets" / "faces"
CLIP_ARCH, CLIP_FILE = "idlora-demo-tiny-clip", "idlora_demo_random_clip.safetensors"
FACE_ID, IMAGE_ID = "arcface (idlora_demo)", f"open_clip {CLIP_ARCH} {CLIP_FILE}"
N_IDS, RANK = 6, 2


@pytest.fixture(scope="module")
def env(comfy):
    """The demo face / CLIP models linked into the temporary ComfyUI base, and the node module."""
    import folder_paths
    from idlora.nodes import difflora_nodes, face_nodes
    demo = os.environ.get("IDLORA_DEMO_MODELS")
    if not demo or not (Path(demo) / "clip" / CLIP_FILE).is_file():
        pytest.fail("IDLORA_DEMO_MODELS is not set to the demo models: run the tests with ./idlora test")
    face_nodes.insightface_roots()
    folder_paths.add_model_folder_path("insightface", str(Path(demo) / "insightface"))
    clip_dir = Path(folder_paths.models_dir) / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    for f in (Path(demo) / "clip").iterdir():
        if not (clip_dir / f.name).exists():
            (clip_dir / f.name).symlink_to(f)
    return difflora_nodes


@pytest.fixture(scope="module")
def embedder(env):
    from idlora.nodes.face_nodes import FaceEmbedder
    return FaceEmbedder.execute("arcface-onnx", "idlora_demo", "CPU").args[0]


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    from idlora.models.face_embed import read_rgb
    return torch.from_numpy(read_rgb(FACES / "obama.jpg").copy()).float()[None] / 255.0


@pytest.fixture(scope="module")
def patcher(comfy):
    import comfy_tiny
    return comfy_tiny.tiny_sd15(seed=0)


def attn_layout(patcher):
    from idlora.models.lora import PRESETS
    from idlora.nodes.comfy_adapter import module_shapes
    from idlora.training.lora_vector import LayerSpec, LoraLayout
    rx = re.compile(PRESETS["attn"])
    return LoraLayout([LayerSpec(n, s[0], (RANK, s[1]), (s[0], RANK), float(RANK))
                       for n, s in sorted(module_shapes(patcher).items()) if rx.search(n) and len(s) == 2])


def write_difflora(env, patcher, name: str, face_dim=512, image_dim=64, embedders=None, lae_only=False,
                   steps=10) -> str:
    """A tiny DiffLoRA trained for a few steps on LoRAs from a random linear map of 3-d identity codes."""
    from idlora.training.difflora import (DiTTrainConfig, DiTTrainer, LaeTrainConfig, LaeTrainer, encode_population,
                                          save_difflora, schedule_of)
    layout = attn_layout(patcher)
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(N_IDS, 3, generator=g)
    vectors = codes @ (0.05 * torch.randn(layout.length, 3, generator=g)).T
    lae = LaeTrainer(vectors, LaeTrainConfig(steps=steps, learning_rate=3e-3, batch_size=4, patch=16, levels=3,
                                             channels=16, latent_channels=2, heads=2, mlp_hidden=16))
    lae.run()
    meta = {"base_model": "sd15", "targets": "attn", "rank": RANK, "identities": N_IDS,
            "embedders": embedders or {"face": FACE_ID, "image": IMAGE_ID}}
    path = os.path.join(env.difflora_dir(), name)
    if lae_only:
        return save_difflora(path, layout, lae.module, meta=meta)
    latents = encode_population(lae.module, vectors)
    scale = float(latents.std())
    face = [torch.randn(2, face_dim, generator=g) for _ in range(N_IDS)]
    image = [torch.randn(2, image_dim, generator=g) for _ in range(N_IDS)]
    dit = DiTTrainer(latents / scale, face, image, DiTTrainConfig(steps=steps, hidden=16, depth=1, heads=2,
                                                                  batch_size=4, learning_rate=1e-3))
    dit.run()
    return save_difflora(path, layout, lae.module, dit.module, scale, schedule_of(dit.cfg), meta)


@pytest.fixture(scope="module")
def difflora(env, patcher):
    write_difflora(env, patcher, "tiny_difflora.safetensors")
    return env.LoadDiffLora.execute("tiny_difflora.safetensors")


def sample(env, patcher, handle, embedder, photo, seed=0, save_name="", steps=20):
    return env.SampleLoraFromFace.execute(patcher, handle, photo, embedder, CLIP_FILE, CLIP_ARCH, steps, seed, 1.0,
                                          save_name)


def forward(patcher, seed=5):
    import comfy_tiny
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    return comfy_tiny.diffusion_forward(patcher, x, 1.5, ctx).float()


def test_load_reports_the_file(difflora):
    text = difflora.ui["text"][0]
    assert "tiny_difflora.safetensors" in text and "rank 2" in text and FACE_ID in text and "512-d" in text
    assert difflora.args[0].dit is not None


def test_sampled_lora_patches_the_model_and_its_kohya_file_loads_in_the_stock_loader(env, patcher, difflora,
                                                                                     embedder, photo):
    import nodes
    out = sample(env, patcher, difflora.args[0], embedder, photo, seed=3, save_name="from face")
    patched, bundle, lora_name = out.args
    assert lora_name == "idlora/from_face.safetensors" and out.ui["lora_files"] == [lora_name]
    text = out.ui["text"][0]
    assert re.search(r"in \d+\.\d+ s \(20 DDIM steps, seed 3", text) and "S_face" in text and "S_img" in text
    s_face, s_img = (float(re.search(rf"{k} (\d\.\d+)", text).group(1)) for k in ("S_face", "S_img"))
    assert s_face + s_img == pytest.approx(1.0, abs=2e-3)
    assert len(bundle.weights) == len(attn_layout(patcher).layers) and bundle.metadata["idlora_method"] == "difflora"
    base = forward(patcher)
    mine = forward(patched)
    assert (mine - base).abs().max() > 1e-5, "the sampled LoRA should change the model's output"
    (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, lora_name, 1.0)
    diff = (forward(stock) - mine).abs().max().item()
    assert diff < 1e-5, f"stock LoraLoader vs the node's patch: max abs difference {diff:.3g}"


def test_a_seed_gives_one_lora(env, patcher, difflora, embedder, photo):
    a = sample(env, patcher, difflora.args[0], embedder, photo, seed=7).args[1]
    b = sample(env, patcher, difflora.args[0], embedder, photo, seed=7).args[1]
    c = sample(env, patcher, difflora.args[0], embedder, photo, seed=8).args[1]
    assert a.weights.keys() == b.weights.keys()
    for k in a.weights:
        assert torch.equal(a.weights[k].up, b.weights[k].up) and torch.equal(a.weights[k].down, b.weights[k].down)
    assert any(not torch.equal(a.weights[k].up, c.weights[k].up) for k in a.weights)
    assert sample(env, patcher, difflora.args[0], embedder, photo, seed=7).args[2] == ""  # not saved


def test_wrong_embedding_size_names_both_embedders(env, patcher, embedder, photo):
    write_difflora(env, patcher, "face128.safetensors", face_dim=128,
                   embedders={"face": "dlib-ish", "image": IMAGE_ID}, steps=1)
    handle = env.LoadDiffLora.execute("face128.safetensors").args[0]
    with pytest.raises(ValueError, match=r"face embedder arcface \(idlora_demo\) gives 512-d embeddings, but this "
                                         r"DiffLoRA was trained on 128-d face embeddings from dlib-ish"):
        sample(env, patcher, handle, embedder, photo)


def test_same_size_other_embedder_is_a_warning(env, patcher, embedder, photo, caplog):
    write_difflora(env, patcher, "other_clip.safetensors", embedders={"face": FACE_ID, "image": "open_clip X y"},
                   steps=1)
    handle = env.LoadDiffLora.execute("other_clip.safetensors").args[0]
    with caplog.at_level(logging.WARNING):
        sample(env, patcher, handle, embedder, photo, steps=2)
    assert any("the image embedder is" in r.getMessage() and "open_clip X y" in r.getMessage()
               for r in caplog.records)


def test_lae_only_file_and_no_face_are_clear_errors(env, patcher, difflora, embedder):
    from idlora.training.difflora import DiffLoraFileError
    write_difflora(env, patcher, "lae_only.safetensors", lae_only=True, steps=1)
    with pytest.raises(DiffLoraFileError, match="holds only a LoRA autoencoder .* IDLoRA Train DiffLoRA"):
        env.LoadDiffLora.execute("lae_only.safetensors")
    with pytest.raises(FileNotFoundError, match="not in .*difflora"):
        env.LoadDiffLora.execute("missing.safetensors")
    from idlora.models.face_embed import read_rgb
    no_face = torch.from_numpy(read_rgb(FACES / "no_face.jpg").copy()).float()[None] / 255.0
    with pytest.raises(ValueError, match="no face was found in the 'image' input"):
        sample(env, patcher, difflora.args[0], embedder, no_face)


def test_training_node_stops_with_the_error_of_the_job_it_waits_for(env, tmp_path):
    from idlora.nodes.job_service import manager
    from idlora.training.difflora import LaeTrainConfig
    from idlora.training.difflora_job import LaeTask
    bad = manager().submit(LaeTask(LaeTrainConfig(steps=1), str(tmp_path / "nope"), str(tmp_path / "x.safetensors"),
                                   "x.safetensors", ["a"]), name="doomed")
    manager().wait(bad.id, timeout=60)
    with pytest.raises(RuntimeError, match=rf"job {bad.id} \(doomed\) ended failed: .*nope.*resume"):
        env.TrainLoraAutoencoder.execute("whatever", 1, 1e-3, 1, 1.0, 16, 3, 16, 2, 0, "lae", job=bad.id)
    with pytest.raises(FileNotFoundError, match="LoRA dataset folder .*nope_either does not exist"):
        env.TrainLoraAutoencoder.execute("nope_either", 1, 1e-3, 1, 1.0, 16, 3, 16, 2, 0, "lae")
