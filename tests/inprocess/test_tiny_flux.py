"""The tiny Flux-dev and SD3 checkpoints and the tiny CLIP-L text encoder that `./idlora test` generates
(tools/tiny_checkpoint.py; paths in IDLORA_TINY_FLUX, IDLORA_TINY_SD3, IDLORA_TINY_CLIP_L): the stock loaders detect
them as Flux (guidance_embed) / SD3, and the stock graph CheckpointLoaderSimple + CLIPLoader (stable_diffusion) ->
CLIPTextEncode -> KSampler -> VAEDecode runs on them on the CPU and gives an image of the asked size.

The files sit in the temporary ComfyUI base under the names `./idlora start` gives them (models/checkpoints,
models/text_encoders). The Flux DiT is 0.5 B params (detection fixes its width): one KSampler step at 64 px is one
forward pass, a few seconds on 2 cores."""
from __future__ import annotations

import gc
import os

import pytest
import torch

pytestmark = pytest.mark.comfy

SIDE = 64  # px: an 8 x 8 latent, 4 x 4 patches


@pytest.fixture(scope="module")
def names(comfy):
    """Each tiny file linked into the temporary base's models folder; env var -> the name the loaders take. The
    models ComfyUI still holds are let go after the module (the Flux DiT is 2.1 GB in float32 on the CPU)."""
    import comfy.model_management
    import comfy_tiny
    import folder_paths
    yield comfy_tiny.link_tiny_model_files(folder_paths.models_dir)
    comfy.model_management.unload_all_models()
    gc.collect()


@pytest.fixture(scope="module")
def clip(names):
    import nodes
    return nodes.CLIPLoader().load_clip(names["IDLORA_TINY_CLIP_L"], "stable_diffusion")[0]


@pytest.fixture(scope="module")
def positive(clip):
    """CLIPTextEncode of a prompt with the tiny CLIP-L: (1, 77, 768) hidden states + the (1, 768) pooled output."""
    import nodes
    return nodes.CLIPTextEncode().encode(clip, "a portrait photo of a person")[0]


def sample_and_decode(model, positive, vae, steps: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """EmptyLatentImage -> KSampler (euler, cfg 1: one forward per step, the negative is not evaluated, so the
    positive stands in for it) -> VAEDecode."""
    import nodes
    latent = nodes.EmptyLatentImage().generate(SIDE, SIDE, 1)[0]  # 4 channels: KSampler widens an empty latent
    out = nodes.KSampler().sample(model, seed, steps, 1.0, "euler", "simple", positive, positive, latent,
                                  denoise=1.0)[0]
    image = nodes.VAEDecode().decode(vae, out)[0]
    return out["samples"], image


def test_clip_l_file_is_the_sd15_checkpoints_clip_with_a_projection(clip, names):
    """CLIPLoader reads the file as ComfyUI's CLIP-L (SD1ClipModel); its text model is the tiny SD1.5
    checkpoint's, and the text projection (for the pooled output Flux and SD3 take as ``y``) is loaded, not left
    uninitialised."""
    import comfy.sd
    from comfy.sd1_clip import SD1ClipModel
    from safetensors import safe_open
    assert isinstance(clip.cond_stage_model, SD1ClipModel)
    path = os.environ["IDLORA_TINY_CLIP_L"]
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        assert comfy.sd.detect_te_model(dict.fromkeys(keys)) == comfy.sd.TEModel.CLIP_L
        proj = f.get_tensor("text_projection.weight")
        loaded = clip.cond_stage_model.clip_l.transformer.text_projection.weight
        assert torch.equal(loaded.float(), proj.float())
        ckpt = os.environ.get("IDLORA_TINY_CKPT")
        if ckpt:
            with safe_open(ckpt, "pt") as g:
                for k in ("text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.5.mlp.fc1.weight",
                          "text_model.final_layer_norm.weight"):
                    assert torch.equal(f.get_tensor(k), g.get_tensor("cond_stage_model.transformer." + k)), k
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True)
    assert cond.shape == (1, 77, 768) and pooled.shape == (1, 768)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()


def test_tiny_flux_dev_loads_and_runs_the_stock_graph(names, positive):
    import comfy.supported_models
    import nodes
    model, ckpt_clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(names["IDLORA_TINY_FLUX"])
    cfg = model.model.model_config
    assert type(cfg) is comfy.supported_models.Flux  # not FluxSchnell: Flux-dev
    assert cfg.unet_config["guidance_embed"] is True
    assert (cfg.unet_config["depth"], cfg.unet_config["depth_single_blocks"]) == (1, 1)
    assert (cfg.unet_config["context_in_dim"], cfg.unet_config["vec_in_dim"]) == (768, 768)
    assert ckpt_clip is None  # no text encoder in the file: CLIPLoader brings the tiny CLIP-L
    assert vae.latent_channels == 16 and vae.downscale_ratio == 8
    samples, image = sample_and_decode(model, positive, vae)
    assert samples.shape == (1, 16, SIDE // 8, SIDE // 8) and torch.isfinite(samples).all()
    assert image.shape == (1, SIDE, SIDE, 3) and torch.isfinite(image).all()
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0


def test_tiny_sd3_loads_and_runs_the_stock_graph(names, positive):
    import comfy.supported_models
    import nodes
    model, ckpt_clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(names["IDLORA_TINY_SD3"])
    cfg = model.model.model_config
    assert type(cfg) is comfy.supported_models.SD3
    assert cfg.unet_config["adm_in_channels"] == 768
    assert cfg.unet_config["context_embedder_config"]["params"]["in_features"] == 768
    assert ckpt_clip is None and vae.latent_channels == 16
    samples, image = sample_and_decode(model, positive, vae, steps=2)
    assert samples.shape == (1, 16, SIDE // 8, SIDE // 8) and torch.isfinite(samples).all()
    assert image.shape == (1, SIDE, SIDE, 3) and torch.isfinite(image).all() and image.std() > 0


def test_a_lora_trained_on_the_tiny_sd3_lowers_its_held_out_flow_loss(names, positive):
    """SD3 (ComfyUI's ModelType.FLOW, MMDiT) goes through the same flow path as Flux: the sd3_attn preset, the
    images encoded by the checkpoint's 16-channel VAE, the conditioning input, the logit-normal default."""
    import nodes
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.diffusion import add_noise, default_timestep_sampling, target
    from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, prepare_data

    model, _, vae = nodes.CheckpointLoaderSimple().load_checkpoint(names["IDLORA_TINY_SD3"])
    with torch.inference_mode(False):
        diffusion = ComfyDiffusion(model, None, vae)
        assert diffusion.prediction_type == "flow" and default_timestep_sampling(diffusion) == "logit_normal"
        images = torch.rand(2, SIDE, SIDE, 3, generator=torch.Generator().manual_seed(0))
        data = prepare_data(diffusion, images, "a photo", conditioning=positive)
        assert data.latents.shape == (2, 16, SIDE // 8, SIDE // 8) and set(data.cond) == {"context", "y"}
        trainer = LoraTrainer(diffusion, data, LoraTrainConfig(steps=25, learning_rate=1e-2, rank=4,
                                                               targets="sd3_attn"))
        g = torch.Generator().manual_seed(5)
        noise, sigma = torch.randn(data.latents.shape, generator=g), torch.tensor([0.3, 0.7])

        def held_out() -> float:
            with torch.no_grad(), trainer.network.attached():
                x_t = add_noise("flow", data.latents, noise, sigma)
                out = diffusion.net_forward(x_t, sigma, data.cond).float()
            return float(torch.nn.functional.mse_loss(out, target("flow", data.latents, noise, sigma)))
        before = held_out()
        trainer.run()
        assert held_out() < 0.95 * before
