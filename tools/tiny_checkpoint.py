"""Generate a tiny, randomly initialised SD1.5-structured checkpoint.

The file is a single fp16 safetensors checkpoint that ComfyUI's stock
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


def generate(comfy_dir: str, out_path: str, seed: int = 0) -> str:
    """Write the tiny SD1.5 checkpoint to ``out_path`` atomically; return its absolute path."""
    setup_comfy(comfy_dir)
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    sd = build_state_dict(seed)
    check_detection(sd)
    n_params = sum(v.numel() for v in sd.values())
    unet_params = sum(v.numel() for k, v in sd.items() if k.startswith(UNET_PREFIX))
    logger.info("built %d tensors, %.1f M params (U-Net %.2f M) in %.1fs", len(sd), n_params / 1e6, unet_params / 1e6, time.perf_counter() - t0)

    out_path = os.path.abspath(out_path)
    out_dir = os.path.dirname(out_path)
    os.makedirs(out_dir, exist_ok=True)
    metadata = {"idlora_tiny": "sd15", "seed": str(int(seed)), "generator_version": GENERATOR_VERSION}
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
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", "-v", action="store_true", help="log progress to stderr")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, stream=sys.stderr)
    path = generate(ns.comfy, ns.out, seed=ns.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
