"""Generate a tiny, randomly initialised SD1.5-structured checkpoint (or a tiny Flux-dev / SD3 one, or a CLIP-L).

The SD1.5 file (the default) is a single fp16 safetensors checkpoint that ComfyUI's stock
``CheckpointLoaderSimple`` loads and detects as SD1.5
(``comfy.supported_models.SD15``). It contains:

* the full CLIP-L text encoder (``cond_stage_model.transformer.text_model.*``),
* the full SD VAE (``first_stage_model.*``, ch=128, ch_mult=[1, 2, 4, 4]),
* the smallest U-Net that ComfyUI's model detection still accepts as SD1.5
  (``model.diffusion_model.*``, see ``TINY_SD15_UNET``).

Weights are random (seeded), so images are noise: the checkpoint is only meant
for loader, LoRA-patching and workflow tests/demos.

Usage (with the python of an environment where ComfyUI's requirements are
installed)::

    python tools/tiny_checkpoint.py --comfy /path/to/ComfyUI --out tiny.safetensors [--seed 0]

On success the only output on stdout is the path of the written file.

Other tiny models (``--model``; repeat ``--model M --out PATH`` pairs to write
several files in one run, one path per line on stdout)::

    python tools/tiny_checkpoint.py --comfy DIR --model flux --out tiny_flux.safetensors \
        --model clip_l --out tiny_clip_l.safetensors --model sd3 --out tiny_sd3.safetensors

* ``flux``: a Flux-dev checkpoint (``model.diffusion_model.`` DiT + ``vae.``
  VAE, no text encoder) that ``CheckpointLoaderSimple`` detects as
  ``comfy.supported_models.Flux`` (guidance_embed True). Detection fixes the
  width (img_in: hidden 3072 = 24 heads x sum(axes_dim [16, 56, 56])) but
  counts the blocks, so the DiT has 1 double and 1 single block (depth=1,
  depth_single_blocks=1); txt_in and vector_in take 768 (CLIP-L hidden states
  and pooled output). 535.3 M params, 90 % of them in the two blocks.
  The VAE is the full-size Flux VAE (83.8 M params): comfy.sd.VAE fixes
  ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2 for a KL VAE and reads only
  the latent channels (16) from the state dict.
* ``clip_l``: the tiny SD1.5 checkpoint's CLIP-L text encoder (same seeded
  fp16 values) in the ``text_model.*`` + ``text_projection.weight`` layout
  that the stock ``CLIPLoader`` (type ``stable_diffusion``) reads from
  models/text_encoders. It carries the text projection (seeded) that the SD1.5
  checkpoint leaves out: Flux and SD3 feed the projected pooled output to the
  model (``y``), and ComfyUI leaves a missing projection uninitialised.
  123.7 M params, 247 MB.
* ``sd3``: an SD3-family checkpoint (``model.diffusion_model.`` MMDiT +
  ``first_stage_model.`` VAE, no text encoder), detected as
  ``comfy.supported_models.SD3`` (0.3.75 has no separate SD3.5 class; SD3.5 is
  SD3 with qk-norm). MMDiT detection derives the depth from the width
  (x_embedder: hidden = 64 * depth), so depth 2 = hidden 128, 2 heads, 2 joint
  blocks (the last one's context block is "pre_only"; with 2 blocks there is
  one full context block too). context_embedder and y_embedder take 768, so
  the same CLIP-L conditions it (SD3's ``y`` is the pooled output as is,
  ``model_base.SD3.encode_adm``). pos_embed covers 192 x 192 patches (3072 px)
  like the real one and holds ComfyUI's 2D sin-cos embedding. The VAE is the
  same full-size 16-channel KL VAE as Flux's. 90 MB in fp8, 84 MB of it the
  VAE; the MMDiT has 1.29 M params (+ the 4.7 M-value pos_embed).

Storage dtype of the flux and sd3 files: float8_e4m3fn (``--dtype bf16`` writes
bfloat16). Measured for the tiny Flux on the 2-core CPU machine (shared, so
wall times are noisy; CPU seconds in brackets):

=====================  ==================  ==================
                       fp8 (chosen)        bf16
=====================  ==================  ==================
file                   619 MB              1238 MB
generate (CLI)         17-27 s (12.5 s)    24-27 s (13.5 s)
CheckpointLoaderSimple 6.7-14 s (3.3-7 s)  2.2-3.1 s (1.5 s)
RSS after load / peak  3.15 / 3.74 GB      3.15 / 4.33 GB
forward, 64 x 64 px    2.4-3.8 s           2.1-2.9 s
=====================  ==================  ==================

Both load and run correctly on the CPU: ComfyUI builds the DiT in float32
there (model_management.unet_dtype: no fp8 compute, and 2 bytes x params fits
in RAM), so the resident model (2.14 GB DiT + 0.34 GB VAE) and the forward pass
cost the same; fp8 costs the slow fp8 -> fp32 cast at
load time (a few CPU seconds) and saves half the file and 0.6 GB of peak
memory. fp8 is chosen for being half the size. On a GPU with fp8 compute
ComfyUI keeps fp8 weights and casts per layer, as for the fp8 Flux
checkpoints people use. Values are drawn as N(0, 1/sqrt(fan_in)) in float32
and rounded to fp8 (a weight of fan_in 12288 then takes about 40 distinct
values, mostly subnormal multiples of 2**-9, 9 % of them 0): as random,
coarser; fine for plumbing tests. Norm
weights (1) and biases (0) are exact.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

from seeded import seeded_state_dict  # tools/ is this script's folder

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"

# Smallest U-Net config that comfy.model_detection still maps to SD15: one
# level (channel_mult [1]) with one res block + one transformer in the input
# block (needed: detection reads context_dim from the first input-block
# transformer), no transformer in the output blocks and no middle block at all
# (transformer_depth_middle == -2; -1, a lone middle res block, would add
# 2.26 M params). 13.64 M params in total. Keys are those of
# detect_unet_config's output plus SD15.unet_extra_config (num_heads/num_head_channels).
UNET_COMMON = {  # the keys every SD-family U-Net config here shares
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
# The full-size U-Nets, as comfy.model_detection.detect_unet_config reports them for real SD1.5 and SDXL-base
# checkpoints (for benchmarks and meta-device architecture tests; this module itself only writes the tiny one).
FULL_UNETS = {
    "sd15": {**UNET_COMMON, "adm_in_channels": None, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
             "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]},
    "sdxl": {**UNET_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "model_channels": 320,
             "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
             "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
             "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]},
}
TINY_SD15_UNET = {
    **UNET_COMMON,
    "adm_in_channels": None,
    "model_channels": 320,
    "num_res_blocks": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [0, 0],
    "channel_mult": [1],
    "transformer_depth_middle": -2,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
}

# Stock SD1.x VAE (what comfy.sd.VAE assumes for a checkpoint's first_stage_model).
SD_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
SD_VAE_EMBED_DIM = 4

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# The Flux-dev DiT of the tiny Flux checkpoint: the config comfy.model_detection.detect_unet_config reports for it
# (and comfy.ldm.flux.model.Flux's keyword arguments; supported_models.Flux adds no unet_extra_config). Everything
# but depth / depth_single_blocks / context_in_dim / vec_in_dim is what detection fixes or reads for a real
# Flux-dev file: hidden_size is read from img_in, but Flux needs hidden_size / num_heads (24, fixed) ==
# sum(axes_dim) (fixed) = 128, so 3072 it is.
TINY_FLUX_CKPT_DIT = {
    "image_model": "flux",
    "axes_dim": [16, 56, 56],
    "num_heads": 24,
    "mlp_ratio": 4.0,
    "theta": 10000,
    "out_channels": 16,
    "qkv_bias": True,
    "in_channels": 16,
    "hidden_size": 3072,
    "context_in_dim": 768,  # txt_in: CLIP-L hidden states (a real Flux: 4096, T5-XXL)
    "patch_size": 2,
    "vec_in_dim": 768,  # vector_in: the CLIP-L pooled output (as in a real Flux)
    "depth": 1,
    "depth_single_blocks": 1,
    "guidance_embed": True,  # guidance_in: Flux-dev (FluxSchnell has none)
}

# The SD3-family MMDiT of the tiny SD3 checkpoint, as detect_unet_config reports it (supported_models.SD3 adds no
# unet_extra_config). Detection sets depth = x_embedder width // 64 and MMDiT builds that many joint blocks of
# width 64 * depth with depth heads.
SD3_CONTEXT_DIM = 768  # context_embedder input: CLIP-L hidden states (a real SD3: 4096)
SD3_ADM_DIM = 768  # y_embedder input: the CLIP-L pooled output (a real SD3: 2048 = CLIP-L 768 + CLIP-G 1280)
SD3_POS_EMBED_MAX = 192  # as SD3 / SD3.5: patches per side of the stored pos_embed (192 * 2 * 8 = 3072 px)
TINY_SD3_CKPT_MMDIT_DEPTH = 2
TINY_SD3_CKPT_MMDIT = {
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "depth": TINY_SD3_CKPT_MMDIT_DEPTH,
    "input_size": None,
    "adm_in_channels": SD3_ADM_DIM,
    "context_embedder_config": {
        "target": "torch.nn.Linear",
        "params": {"in_features": SD3_CONTEXT_DIM, "out_features": 64 * TINY_SD3_CKPT_MMDIT_DEPTH},
    },
    "num_patches": SD3_POS_EMBED_MAX * SD3_POS_EMBED_MAX,
    "pos_embed_max_size": SD3_POS_EMBED_MAX,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}

# The 16-channel KL VAE of Flux and SD3 (no quant_conv / post_quant_conv): comfy.sd.VAE builds an
# AutoencodingEngine with the SD VAE's fixed ddconfig and z_channels read from decoder.conv_in.
KL16_VAE_DDCONFIG = {**SD_VAE_DDCONFIG, "z_channels": 16}

FLUX_VAE_PREFIX = "vae."  # supported_models.Flux.vae_key_prefix
SD3_VAE_PREFIX = VAE_PREFIX  # supported_models.SD3 keeps the BASE default, "first_stage_model."

MODELS = ("sd15", "flux", "sd3", "clip_l")
STORAGE_DTYPES = ("fp8", "bf16")  # for flux and sd3; sd15 and clip_l are fp16
DEFAULT_STORAGE_DTYPE = "fp8"  # see the module docstring


def setup_comfy(comfy_dir: str) -> None:
    """Make ComfyUI importable in-process (CPU only), unless that was already done."""
    if "comfy.cli_args" in sys.modules:
        return
    comfy_dir = os.path.abspath(comfy_dir)
    if not os.path.isdir(os.path.join(comfy_dir, "comfy")):
        raise FileNotFoundError("not a ComfyUI directory: {}".format(comfy_dir))
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    import utils.extra_config  # noqa: F401  (ComfyUI wants this before nodes/comfy modules)


def _meta_modules():
    """Instantiate the three SD1.5 components on the meta device (shapes and names only)."""
    import json

    import torch
    import comfy.clip_model
    import comfy.ldm.models.autoencoder
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    unet = openaimodel.UNetModel(**TINY_SD15_UNET, dtype=torch.float16, device="meta", operations=ops)

    clip_cfg_path = os.path.join(os.path.dirname(os.path.abspath(comfy.clip_model.__file__)), "sd1_clip_config.json")
    with open(clip_cfg_path, encoding="utf-8") as f:
        clip_cfg = json.load(f)
    clip = comfy.clip_model.CLIPTextModel(clip_cfg, torch.float16, "meta", ops)

    with torch.device("meta"):
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=SD_VAE_EMBED_DIM)
    return unet, clip, vae


def build_state_dict(seed: int = 0) -> dict:
    """Return the full fp16 checkpoint state dict (key -> CPU tensor)."""
    unet, clip, vae = _meta_modules()
    out = {}
    for module, prefix in ((unet, UNET_PREFIX), (vae, VAE_PREFIX), (clip, CLIP_PREFIX)):
        for key, value in seeded_state_dict(module, seed, prefix).items():
            # Real SD1.5 checkpoints carry no CLIP text_projection; SD15's clip
            # loader would not map it anyway (it renames it under text_model.).
            if prefix == CLIP_PREFIX and not key[len(prefix):].startswith("text_model."):
                continue
            out[key] = value.half()
    return dict(sorted(out.items()))


def check_detection(state_dict: dict):
    """Return ComfyUI's detected model config; raise unless it is SD15."""
    import comfy.model_detection
    import comfy.supported_models

    cfg = comfy.model_detection.model_config_from_unet(state_dict, UNET_PREFIX)
    if cfg is None or type(cfg) is not comfy.supported_models.SD15:
        raise RuntimeError("tiny U-Net not detected as SD15 (got {!r})".format(type(cfg).__name__ if cfg is not None else None))
    return cfg


def _torch_dtype(name: str):
    import torch

    return {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _meta_kl16_vae():
    """The 16-channel KL VAE (Flux / SD3) on the meta device, the class comfy.sd.VAE builds for it."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = dict(KL16_VAE_DDCONFIG)
    with torch.device("meta"):
        return AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})


def meta_flux_dit():
    """The tiny Flux checkpoint's DiT (comfy.ldm.flux.model.Flux, TINY_FLUX_CKPT_DIT) on the meta device."""
    import torch
    import comfy.ldm.flux.model
    import comfy.ops

    return comfy.ldm.flux.model.Flux(**TINY_FLUX_CKPT_DIT, dtype=torch.bfloat16, device="meta",
                                     operations=comfy.ops.disable_weight_init)


def meta_sd3_mmdit():
    """The tiny SD3 checkpoint's MMDiT (ComfyUI's OpenAISignatureMMDITWrapper, TINY_SD3_CKPT_MMDIT) on meta."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    return OpenAISignatureMMDITWrapper(**TINY_SD3_CKPT_MMDIT, dtype=torch.bfloat16, device="meta",
                                       operations=comfy.ops.disable_weight_init)


def _flux_overrides(dit) -> dict:
    """Flux's q/k RMSNorm weights are called ``scale``, which the seeded rule would zero (q = k = 0, uniform
    attention): store ones, as for every other norm weight."""
    import torch

    return {UNET_PREFIX + n: torch.ones(tuple(p.shape)) for n, p in dit.named_parameters()
            if n.endswith("_norm.scale")}


def _sd3_overrides(mmdit) -> dict:
    """pos_embed: ComfyUI's 2D sin-cos table (what a real SD3 stores), not seeded noise (which fp8 rounds to 0)."""
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    table = get_2d_sincos_pos_embed(mmdit.hidden_size, SD3_POS_EMBED_MAX)  # float64 numpy, (N, hidden)
    return {UNET_PREFIX + "pos_embed": torch.from_numpy(table).float().unsqueeze(0)}


def _check_meta_detection(dit, expected_cls, expected_config: dict):
    """Detect the model from the meta module's shapes (no values needed) before any weight is drawn."""
    sd = {UNET_PREFIX + k: v for k, v in dit.state_dict().items()}
    return _check_unet_detection(sd, expected_cls, expected_config)


def _check_unet_detection(state_dict: dict, expected_cls, expected_config: dict | None = None):
    import comfy.model_detection

    cfg = comfy.model_detection.model_config_from_unet(state_dict, UNET_PREFIX)
    name = type(cfg).__name__ if cfg is not None else None
    if cfg is None or type(cfg) is not expected_cls:
        raise RuntimeError("tiny model not detected as {} (got {!r})".format(expected_cls.__name__, name))
    if expected_config is not None:
        detected = comfy.model_detection.detect_unet_config(state_dict, UNET_PREFIX)
        if detected != expected_config:
            diff = {k: (detected.get(k), expected_config.get(k)) for k in set(detected) | set(expected_config)
                    if detected.get(k) != expected_config.get(k)}
            raise RuntimeError("{}: detected config differs from the one built (detected, built): {}".format(
                expected_cls.__name__, diff))
    return cfg


def check_flux_detection(state_dict: dict):
    """Return ComfyUI's detected model config; raise unless it is Flux (Flux-dev: guidance_embed True) with the
    config the DiT was built from."""
    import comfy.supported_models

    cfg = _check_unet_detection(state_dict, comfy.supported_models.Flux, TINY_FLUX_CKPT_DIT)
    if cfg.unet_config.get("guidance_embed") is not True:
        raise RuntimeError("tiny Flux detected without guidance_embed")
    return cfg


def check_sd3_detection(state_dict: dict):
    """Return ComfyUI's detected model config; raise unless it is SD3 with the config the MMDiT was built from."""
    import comfy.supported_models

    return _check_unet_detection(state_dict, comfy.supported_models.SD3, TINY_SD3_CKPT_MMDIT)


def check_kl16_vae(state_dict: dict, prefix: str) -> None:
    """Raise unless comfy.sd.VAE would build a 16-channel KL VAE whose keys are exactly these (shapes included)."""
    vae_sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    conv_in = vae_sd.get("decoder.conv_in.weight")
    if conv_in is None or conv_in.shape[1] != 16 or "post_quant_conv.weight" in vae_sd:
        raise RuntimeError("VAE under {!r} is not a 16-channel KL VAE without post_quant_conv".format(prefix))
    want = {k: tuple(v.shape) for k, v in _meta_kl16_vae().state_dict().items()}
    have = {k: tuple(v.shape) for k, v in vae_sd.items()}
    if want != have:
        raise RuntimeError("VAE keys differ from ComfyUI's KL VAE: missing {}, unexpected {}".format(
            sorted(set(want) - set(have))[:5], sorted(set(have) - set(want))[:5]))


def check_clip_l(state_dict: dict) -> None:
    """Raise unless comfy.sd detects the text encoder file as CLIP-L (what CLIPLoader stable_diffusion loads as
    sd1_clip.SD1ClipModel) with the full CLIP-L key set of ComfyUI's CLIPTextModel."""
    import comfy.sd

    if comfy.sd.detect_te_model(state_dict) != comfy.sd.TEModel.CLIP_L:
        raise RuntimeError("tiny CLIP-L not detected as CLIP_L (got {})".format(comfy.sd.detect_te_model(state_dict)))
    clip = _meta_modules()[1]
    want = set(clip.state_dict())
    if set(state_dict) != want:
        raise RuntimeError("CLIP-L keys differ: missing {}, unexpected {}".format(
            sorted(want - set(state_dict))[:5], sorted(set(state_dict) - want)[:5]))


def _build_dit_state_dict(dit, config_cls, config: dict, overrides: dict, vae_prefix: str, seed: int,
                          dtype: str) -> dict:
    """A DiT checkpoint's state dict: the DiT (checked to be detected as ``config_cls`` with ``config``) under
    model.diffusion_model., the 16-channel VAE under ``vae_prefix``, every tensor stored in ``dtype``."""
    from seeded import seeded_state_dict

    _check_meta_detection(dit, config_cls, config)
    tdt = _torch_dtype(dtype)
    out = seeded_state_dict(dit, seed, UNET_PREFIX, cast=tdt, overrides=overrides)
    out.update(seeded_state_dict(_meta_kl16_vae(), seed, vae_prefix, cast=tdt))
    return dict(sorted(out.items()))


def build_flux_state_dict(seed: int = 0, dtype: str = DEFAULT_STORAGE_DTYPE) -> dict:
    """The tiny Flux-dev checkpoint's state dict: DiT under model.diffusion_model., VAE under vae."""
    import comfy.supported_models

    dit = meta_flux_dit()
    return _build_dit_state_dict(dit, comfy.supported_models.Flux, TINY_FLUX_CKPT_DIT, _flux_overrides(dit),
                                 FLUX_VAE_PREFIX, seed, dtype)


def build_sd3_state_dict(seed: int = 0, dtype: str = DEFAULT_STORAGE_DTYPE) -> dict:
    """The tiny SD3 checkpoint's state dict: MMDiT under model.diffusion_model., VAE under first_stage_model."""
    import comfy.supported_models

    mmdit = meta_sd3_mmdit()
    return _build_dit_state_dict(mmdit, comfy.supported_models.SD3, TINY_SD3_CKPT_MMDIT, _sd3_overrides(mmdit),
                                 SD3_VAE_PREFIX, seed, dtype)


def build_clip_l_state_dict(seed: int = 0) -> dict:
    """The tiny SD1.5 checkpoint's CLIP-L (the same seeded fp16 values: seeded under the checkpoint's
    cond_stage_model.transformer. keys) as a text-encoder file: text_model.* and text_projection.weight."""
    clip = _meta_modules()[1]
    out = {}
    for key, value in seeded_state_dict(clip, seed, CLIP_PREFIX).items():
        out[key[len(CLIP_PREFIX):]] = value.half()
    return dict(sorted(out.items()))


def _sort_safetensors_metadata(path: str) -> None:
    """Rewrite the header's ``__metadata__`` with sorted keys, in place.

    safetensors serialises metadata from a Rust HashMap, so its key order (and
    thus the file's bytes) changes from run to run. Sorting it keeps the header
    length unchanged and makes the output byte-for-byte reproducible.
    """
    import json
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw.decode("utf-8"))
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) > n:
            logger.warning("could not normalise safetensors metadata order (header grew)")
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def build_model(model: str, seed: int = 0, dtype: str | None = None) -> tuple[dict, dict]:
    """(state dict, file metadata) of one tiny model, checked as ComfyUI detects it; see MODELS."""
    meta = {"idlora_tiny": model, "seed": str(int(seed)), "generator_version": GENERATOR_VERSION}
    if model == "sd15":
        sd = build_state_dict(seed)
        check_detection(sd)
        return sd, meta
    if model == "clip_l":
        sd = build_clip_l_state_dict(seed)
        check_clip_l(sd)
        return sd, meta
    dtype = dtype or DEFAULT_STORAGE_DTYPE
    if dtype not in STORAGE_DTYPES:
        raise ValueError("storage dtype {!r}: one of {}".format(dtype, STORAGE_DTYPES))
    meta["storage_dtype"] = dtype
    if model == "flux":
        sd = build_flux_state_dict(seed, dtype)
        check_flux_detection(sd)
        check_kl16_vae(sd, FLUX_VAE_PREFIX)
        return sd, meta
    if model == "sd3":
        sd = build_sd3_state_dict(seed, dtype)
        check_sd3_detection(sd)
        check_kl16_vae(sd, SD3_VAE_PREFIX)
        return sd, meta
    raise ValueError("unknown tiny model {!r}: one of {}".format(model, MODELS))


def generate(comfy_dir: str, out_path: str, seed: int = 0, model: str = "sd15", dtype: str | None = None) -> str:
    """Write the tiny ``model`` (default: the SD1.5 checkpoint) to ``out_path`` atomically; return its absolute
    path. ``dtype``: storage dtype of flux / sd3 ("fp8" or "bf16"; default DEFAULT_STORAGE_DTYPE)."""
    setup_comfy(comfy_dir)
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    sd, metadata = build_model(model, seed, dtype)
    n_params = sum(v.numel() for v in sd.values())
    unet_params = sum(v.numel() for k, v in sd.items() if k.startswith(UNET_PREFIX))
    logger.info("%s: built %d tensors, %.1f M params (diffusion model %.2f M) in %.1fs", model, len(sd),
                n_params / 1e6, unet_params / 1e6, time.perf_counter() - t0)

    out_path = os.path.abspath(out_path)
    out_dir = os.path.dirname(out_path)
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(out_path) + ".", dir=out_dir)
    os.close(fd)
    try:
        save_file(sd, tmp_path, metadata=metadata)
        _sort_safetensors_metadata(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp_path, out_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    logger.info("wrote %s (%.1f MB) in %.1fs total", out_path, os.path.getsize(out_path) / 1e6, time.perf_counter() - t0)
    return out_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--comfy", required=True, help="ComfyUI directory (the one containing comfy/)")
    parser.add_argument("--out", required=True, action="append",
                        help="output .safetensors path (one per --model, in the same order)")
    parser.add_argument("--model", action="append", choices=MODELS,
                        help="which tiny model to write (default sd15); repeat with --out for several files")
    parser.add_argument("--dtype", choices=STORAGE_DTYPES, default=DEFAULT_STORAGE_DTYPE,
                        help="storage dtype of flux and sd3 (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", "-v", action="store_true", help="log progress to stderr")
    ns = parser.parse_args(argv)
    models = ns.model or ["sd15"]
    if len(models) != len(ns.out):
        parser.error("give one --out per --model ({} models, {} outputs)".format(len(models), len(ns.out)))
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, stream=sys.stderr)
    for model, out in zip(models, ns.out):
        print(generate(ns.comfy, out, seed=ns.seed, model=model, dtype=ns.dtype), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
