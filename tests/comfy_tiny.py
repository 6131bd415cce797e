"""Tiny, seeded ComfyUI models for in-process unit tests.

These helpers ASSUME ComfyUI is already importable and configured (the test
conftest puts ComfyUI on sys.path, sets ``comfy.cli_args.args.cpu = True`` and
imports ``utils.extra_config`` before anything here is called). Nothing in this
module touches sys.path or ComfyUI's args, except the ``__main__`` self-check.

Everything runs on CPU in fp32. Parameters are filled deterministically: each
tensor gets its own ``torch.Generator`` seeded from ``(seed, crc32(key))``
(key = the name in ``BaseModel.state_dict()``, e.g. ``diffusion_model.out.2.weight``,
or in the VAE's ``first_stage_model.state_dict()``), so values do not depend on
parameter order. Init rule: ndim >= 2 ~ N(0, 1/sqrt(fan_in)), fan_in =
prod(shape[1:]); embeddings ~ N(0, 0.02); GroupNorm/LayerNorm weights = 1;
biases and other 1-D tensors = 0. (Same rule as tools/tiny_checkpoint.py.)

Note: parameters of a model built under ``torch.inference_mode()`` are
inference tensors. ComfyUI's LoRA weight patching still works on them outside
inference mode (it swaps in new Parameters rather than writing in place), but
in-place updates and autograd on them fail outside inference mode. Build the
models outside inference mode unless a test wants exactly that situation.
"""

from __future__ import annotations

import logging

import torch

from tiny_checkpoint import UNET_COMMON  # tools/
from seeded import fill_seeded_, seeded_state_dict  # tools/

logger = logging.getLogger(__name__)

# U-Net configs in the form comfy.model_detection.detect_unet_config produces
# (per-input-block transformer_depth, per-output-block transformer_depth_output).
# SD15.__init__ adds num_heads=8/num_head_channels=-1; SDXL (BASE) adds
# num_heads=-1/num_head_channels=64.
TINY_SD15_UNET = {  # in-process: 1.1 M params (the checkpoint's U-Net is tools/tiny_checkpoint.TINY_SD15_UNET)
    **UNET_COMMON,
    "adm_in_channels": None,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 64,
    "use_linear_in_transformer": False,
}

SDXL_POOLED_DIM = 64
SDXL_CONTEXT_DIM = 64
TINY_SDXL_UNET = {
    **UNET_COMMON,
    "num_classes": "sequential",
    # SDXL.encode_adm = pooled (P) + 6 Timestep(256) size/crop embeddings.
    "adm_in_channels": SDXL_POOLED_DIM + 6 * 256,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": SDXL_CONTEXT_DIM,
    "use_linear_in_transformer": True,
}

# comfy.sd.VAE(config=...) builds AutoencoderKL(**config["params"]).
# 4 levels -> 8x down/up-scaling, 4 latent channels (matches comfy.sd.VAE's
# defaults: downscale_ratio 8, latent_channels 4).
TINY_VAE_CONFIG = {
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 64,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 1, 1, 1],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    }
}

CPU = torch.device("cpu")


# ---------------------------------------------------------------- models

def _patcher_from_config(model_config_cls, unet_config: dict, seed: int, weight_dtype=None):
    """``weight_dtype``: store the weights in it, computing in fp32 (ComfyUI's manual cast), as ComfyUI loads a file
    of bf16 or fp8 weights on the CPU."""
    import comfy.model_patcher

    model_config = model_config_cls(dict(unet_config))
    if weight_dtype is not None:
        model_config.set_inference_dtype(weight_dtype, torch.float32)
    model = model_config.get_model({}, "")
    # Only the U-Net's weights are ours to fill: model_sampling / noise_augmentor
    # buffers are computed schedules.
    fill_seeded_(model.diffusion_model, seed, prefix="diffusion_model.")
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def tiny_sd15(seed: int = 0):
    """~1 M-parameter SD1.5-structured model (comfy.supported_models.SD15) as a ModelPatcher."""
    import comfy.supported_models

    return _patcher_from_config(comfy.supported_models.SD15, TINY_SD15_UNET, seed)


def tiny_sdxl(seed: int = 0):
    """Tiny SDXL-structured model (comfy.supported_models.SDXL, EPS) as a ModelPatcher.

    context dim 64, pooled dim 64 (adm_in_channels = 64 + 1536); see tiny_sdxl_cond/sdxl_adm.
    """
    import comfy.supported_models

    return _patcher_from_config(comfy.supported_models.SDXL, TINY_SDXL_UNET, seed)


# A Flux-architecture DiT built from ComfyUI's own classes, small enough for in-process tests: hidden 64 with 2
# heads of 32 (axes 8 + 12 + 12), 1 double and 1 single block, CLIP-L-sized text/pooled inputs cut to 32. Not what
# detection would accept from a file (it fixes 3072 / 24 heads): that is the tiny Flux *checkpoint*'s job.
TINY_FLUX_DIT = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
    "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}
FLUX_CONTEXT_DIM = FLUX_POOLED_DIM = 32


def tiny_flux(seed: int = 0, guidance: bool = True, weight_dtype=None):
    """A Flux-dev-structured model (comfy.supported_models.Flux; FluxSchnell with ``guidance=False``) as a
    ModelPatcher: ModelType.FLUX, ModelSamplingFlux, 16 latent channels."""
    import comfy.supported_models

    cls = comfy.supported_models.Flux if guidance else comfy.supported_models.FluxSchnell
    return _patcher_from_config(cls, {**TINY_FLUX_DIT, "guidance_embed": guidance}, seed, weight_dtype)


def tiny_flux_cond(batch: int = 1, seed: int = 0, tokens: int = 8) -> dict:
    """Random Flux conditioning rows: {"context": (B, tokens, 32), "y": (B, 32)}."""
    gen = torch.Generator().manual_seed(int(seed))
    return {"context": torch.randn((batch, tokens, FLUX_CONTEXT_DIM), generator=gen),
            "y": torch.randn((batch, FLUX_POOLED_DIM), generator=gen)}


def tiny_sdxl_cond(batch: int = 1, seed: int = 0):
    """Random SDXL-style conditioning: (context (B, 77, 64), pooled (B, 64)), N(0, 1)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    context = torch.randn((batch, 77, SDXL_CONTEXT_DIM), generator=gen)
    pooled = torch.randn((batch, SDXL_POOLED_DIM), generator=gen)
    return context, pooled


def sdxl_adm(patcher, pooled: torch.Tensor, width: int = 64, height: int = 64, crop_w: int = 0, crop_h: int = 0,
             target_width=None, target_height=None) -> torch.Tensor:
    """The ``y`` vector ComfyUI feeds an SDXL U-Net: ``model.encode_adm(pooled_output=..., width=..., ...)``.

    Shape (B, 64 + 1536) for the tiny SDXL. width/height are in pixels.
    """
    return patcher.model.encode_adm(
        pooled_output=pooled,
        width=width,
        height=height,
        crop_w=crop_w,
        crop_h=crop_h,
        target_width=width if target_width is None else target_width,
        target_height=height if target_height is None else target_height,
    )


def tiny_vae(seed: int = 0, latent_channels: int = 4):
    """Tiny KL VAE (comfy.sd.VAE): 8x spatial scaling, 4 latent channels (16: the Flux / SD3 VAE's), ~0.37 M params.

    ``vae.encode(images (B, H, W, 3) in [0, 1]) -> (B, C, H/8, W/8)``; ``vae.decode`` the reverse.
    """
    import comfy.ldm.models.autoencoder
    import comfy.sd

    params = TINY_VAE_CONFIG["params"]
    ddconfig = {**params["ddconfig"], "z_channels": latent_channels}
    config = {"params": {"embed_dim": latent_channels, "ddconfig": ddconfig}}
    with torch.device("meta"):
        meta = comfy.ldm.models.autoencoder.AutoencoderKL(
            embed_dim=latent_channels, ddconfig=dict(config["params"]["ddconfig"])
        )
    sd = seeded_state_dict(meta, seed)
    return comfy.sd.VAE(sd=sd, config=config, device=CPU, dtype=torch.float32)


# ---------------------------------------------------------------- forward

def diffusion_forward(patcher, x: torch.Tensor, sigma, context: torch.Tensor, y=None) -> torch.Tensor:
    """Raw ``diffusion_model`` output (eps for EPS models) for the noisy latent ``x`` at ``sigma``.

    Makes the same call as ``BaseModel._apply_model``: ``xc = calculate_input(sigma, x)``,
    ``t = timestep(sigma)``, ``diffusion_model(xc, t, context=context, y=y)``, after
    ``comfy.model_management.load_models_gpu([patcher])`` so that the patcher's weight
    patches (LoRAs) are applied. ``sigma``: float or tensor of shape () / (B,).
    The patcher's ``model_options["transformer_options"]`` (e.g. attention patches)
    are passed through, as the sampler would.
    """
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    model = patcher.model
    ms = model.model_sampling
    dtype = model.manual_cast_dtype if model.manual_cast_dtype is not None else model.get_dtype()
    device = patcher.load_device

    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    if sigma.numel() == 1 and x.shape[0] != 1:
        sigma = sigma.expand(x.shape[0])
    sigma = sigma.to(device)
    transformer_options = dict(patcher.model_options.get("transformer_options", {}))
    transformer_options["sigmas"] = sigma
    with torch.no_grad():
        xc = ms.calculate_input(sigma, x.to(device)).to(dtype)
        t = ms.timestep(sigma).float()
        out = model.diffusion_model(
            xc,
            t,
            context=context.to(device=device, dtype=dtype),
            y=None if y is None else y.to(device=device, dtype=dtype),
            transformer_options=transformer_options,
        )
    return out


# ---------------------------------------------------------------- self-check

def _self_check(comfy_dir: str) -> None:
    import sys
    import time

    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    import utils.extra_config  # noqa: F401
    import comfy.model_management
    import comfy.sd

    def n_params(m):
        return sum(p.numel() for p in m.parameters())

    def finite(t):
        return bool(torch.isfinite(t).all())

    gen = torch.Generator().manual_seed(123)

    # SD1.5
    sd15 = tiny_sd15(seed=0)
    ctx = torch.randn((2, 77, 64), generator=gen)
    x = torch.randn((2, 4, 8, 8), generator=gen) * 14.6
    t0 = time.perf_counter()
    base = diffusion_forward(sd15, x, 14.6, ctx)
    logger.info("sd15: %d params, out %s finite=%s std=%.3f (%.3fs)", n_params(sd15.model.diffusion_model),
                tuple(base.shape), finite(base), base.std().item(), time.perf_counter() - t0)
    assert base.shape == x.shape and finite(base) and base.std() > 0
    again = diffusion_forward(tiny_sd15(seed=0), x, 14.6, ctx)
    assert torch.equal(base, again), "tiny_sd15 not deterministic"
    other = diffusion_forward(tiny_sd15(seed=1), x, 14.6, ctx)
    assert not torch.equal(base, other), "seed has no effect"

    # LoRA through ComfyUI's loader with native keys changes the raw output.
    target = "diffusion_model.input_blocks.1.1.proj_in"  # 1x1 conv (32 -> 32)
    w = sd15.model.state_dict()[target + ".weight"]
    rank = 4
    lora_sd = {
        target + ".lora_up.weight": torch.randn((w.shape[0], rank, 1, 1), generator=gen) * 0.5,
        target + ".lora_down.weight": torch.randn((rank, w.shape[1], 1, 1), generator=gen) * 0.5,
    }
    lora_patcher, _ = comfy.sd.load_lora_for_models(sd15, None, lora_sd, 1.0, 0)
    assert target + ".weight" in lora_patcher.patches, "LoRA key not mapped"
    patched = diffusion_forward(lora_patcher, x, 14.6, ctx)
    diff = (patched - base).abs().max().item()
    logger.info("sd15 + LoRA: max |delta| = %.4g", diff)
    assert diff > 1e-4, "LoRA patch had no effect in diffusion_forward"
    restored = diffusion_forward(sd15, x, 14.6, ctx)
    assert torch.allclose(restored, base, atol=1e-5), "weights not restored after unpatching"

    # SDXL
    sdxl = tiny_sdxl(seed=0)
    context, pooled = tiny_sdxl_cond(batch=2, seed=0)
    y = sdxl_adm(sdxl, pooled, width=64, height=64)
    out = diffusion_forward(sdxl, x, 1.0, context, y=y)
    logger.info("sdxl: %d params, y %s, out %s finite=%s std=%.3f", n_params(sdxl.model.diffusion_model),
                tuple(y.shape), tuple(out.shape), finite(out), out.std().item())
    assert out.shape == x.shape and finite(out) and out.std() > 0
    conds = sdxl.model.extra_conds(pooled_output=pooled, width=64, height=64, cross_attn=context, device=CPU)
    assert torch.equal(conds["y"].cond, y)

    # VAE
    vae = tiny_vae(seed=0)
    img = torch.rand((1, 64, 64, 3), generator=gen)
    t0 = time.perf_counter()
    lat = vae.encode(img)
    dec = vae.decode(lat)
    logger.info("vae: %d params, latent %s, decoded %s, finite=%s (%.3fs)", n_params(vae.first_stage_model),
                tuple(lat.shape), tuple(dec.shape), finite(dec), time.perf_counter() - t0)
    assert tuple(lat.shape) == (1, 4, 8, 8) and tuple(dec.shape) == (1, 64, 64, 3) and finite(lat) and finite(dec)

    # Built under inference_mode -> inference tensors.
    with torch.inference_mode():
        inf = tiny_sd15(seed=0)
    is_inf = all(p.is_inference() for p in inf.model.diffusion_model.parameters())
    logger.info("parameters of a model built under inference_mode are inference tensors: %s", is_inf)
    comfy.model_management.unload_all_models()
    logger.info("self-check OK")


def tiny_patcher(arch: str):
    """The tiny "sd15", "sdxl" or "flux" ModelPatcher (seed 0)."""
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "flux": tiny_flux}[arch](seed=0)


def tiny_cond(arch: str, patcher, n: int, seed: int) -> dict:
    """Random denoiser conditioning for ``n`` samples: context, and SDXL's ``y`` (pooled + size embeddings)."""
    g = torch.Generator().manual_seed(seed)
    if arch == "sd15":
        return {"context": torch.randn(n, 77, 64, generator=g)}
    if arch == "flux":
        return tiny_flux_cond(n, seed)
    context, pooled = tiny_sdxl_cond(n, seed)
    y = patcher.model.encode_adm(pooled_output=pooled, width=64, height=64, crop_w=0, crop_h=0,
                                 target_width=64, target_height=64, device=torch.device("cpu"))
    return {"context": context, "y": y}


def meta_unets() -> dict:
    """The full-size SD1.5 and SDXL U-Nets (ComfyUI's UNetModel) on the meta device: names and shapes, no memory."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from tiny_checkpoint import FULL_UNETS  # tools/
    with torch.device("meta"):
        return {k: UNetModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)
                for k, cfg in FULL_UNETS.items()}


# The tiny model files `./idlora test` generates once per machine (tools/tiny_checkpoint.py --model, cached by
# tools/bootstrap.py): env var with the file's path -> (ComfyUI models sub-folder, the name `./idlora start` gives it).
TINY_MODEL_FILES = {
    "IDLORA_TINY_FLUX": ("checkpoints", "idlora_tiny_flux.safetensors"),  # Flux-dev DiT (535 M, fp8) + VAE
    "IDLORA_TINY_SD3": ("checkpoints", "idlora_tiny_sd3.safetensors"),  # SD3 MMDiT (1.3 M) + VAE
    "IDLORA_TINY_CLIP_L": ("text_encoders", "idlora_tiny_clip_l.safetensors"),  # CLIPLoader, stable_diffusion
}


def link_tiny_model_files(models_dir) -> dict:
    """Symlink the tiny Flux / SD3 checkpoints and the tiny CLIP-L into ``models_dir`` (e.g.
    ``folder_paths.models_dir``) under their `./idlora start` names; return env var -> that name (what the stock
    loaders take). Fails the test when an env var is not set (the tests run through ./idlora test)."""
    import os
    from pathlib import Path

    import pytest

    out = {}
    for var, (folder, name) in TINY_MODEL_FILES.items():
        src = os.environ.get(var)
        if not src or not Path(src).is_file():
            pytest.fail(f"{var} is not set to the tiny model file: run the tests with ./idlora test")
        dst = Path(models_dir) / folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() and dst.resolve() != Path(src).resolve():
            dst.unlink()
        if not dst.exists():
            dst.symlink_to(src)
        out[var] = name
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Self-check of the tiny ComfyUI test models.")
    parser.add_argument("--comfy", required=True, help="ComfyUI directory (the one containing comfy/)")
    ns = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    _self_check(ns.comfy)

