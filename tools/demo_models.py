"""Write the random-weight stand-ins that let the bundled workflows run on a machine with no real models.

No real ArcFace, CLIP or DINOv2 weights can be installed offline (see the README's model table). Like the tiny
checkpoint, these files have the real architectures and random (seeded) weights, so every node of a bundled
workflow runs end to end; their numbers mean nothing. They go into folders whose names say so:

* ``insightface/models/idlora_demo/random_iresnet.onnx``: an ArcFace-architecture IResNet (one block per
  stage, 512-d), for the IDLoRA Face Embedder's ``arcface-torch`` / ``arcface-onnx`` backends with pack
  ``idlora_demo``. The real file is ``buffalo_l/w600k_r50.onnx``.
* ``clip/idlora_demo_random_clip.safetensors`` with its open_clip config ``idlora-demo-tiny-clip.json``, for
  IDLoRA CLIP Score. A real one is e.g. open_clip ViT-B-32 weights.
* ``difflora/idlora_demo_random_difflora.safetensors`` (with ``--checkpoint``): a DiffLoRA (LAE + DiT) with random
  weights for the rank-1 ``attn`` LoRA layout of that checkpoint, conditioned on the two stand-ins above, for the
  bundled DiffLoRA sampling workflow. It turns a face into a (meaningless) LoRA; train a real one with the
  DiffLoRA training workflow.

Usage: ``python tools/demo_models.py --out DIR [--seed 0] [--checkpoint CKPT]`` (DIR gets ``insightface/``,
``clip/`` and, with a checkpoint, ``difflora/``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import torch

from pack import import_pack  # tools/

log = logging.getLogger(__name__)
VERSION = "3"
DEMO_PACK = "idlora_demo"
CLIP_ARCH = "idlora-demo-tiny-clip"
CLIP_FILE = "idlora_demo_random_clip.safetensors"
CLIP_CONFIG = {"embed_dim": 64,
               "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
NOTE = ("Random weights written by IDLoRA's tools/demo_models.py so that the bundled workflows run without real "
        "models. Not a face or CLIP model: replace it with real weights (see the IDLoRA README, 'Model files').\n")


def _fill(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else p)


def write_iresnet(folder: Path, seed: int) -> Path:
    idlora = import_pack()
    from importlib import import_module
    iresnet = import_module(f"{idlora.__name__}.models.iresnet").iresnet
    model = iresnet((1, 1, 1, 1), embedding_size=512).eval()
    _fill(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "random_iresnet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False, opset_version=17,
                          input_names=["input.1"], output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}})
    (folder / "README.txt").write_text(NOTE)
    return path


def write_clip(folder: Path, seed: int) -> Path:
    import open_clip
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{CLIP_ARCH}.json"
    config.write_text(json.dumps(CLIP_CONFIG, indent=1))
    open_clip.add_model_config(str(config))
    model = open_clip.create_model(CLIP_ARCH, pretrained=None)
    _fill(model, seed + 1)
    path = folder / CLIP_FILE
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (folder / "idlora_demo_README.txt").write_text(NOTE)
    return path


DIFFLORA_FILE = "idlora_demo_random_difflora.safetensors"
UNET_PREFIX = "model.diffusion_model."


def write_difflora(folder: Path, checkpoint: Path, seed: int) -> Path:
    """A random DiffLoRA for the rank-1 attention LoRAs of ``checkpoint``'s U-Net (layout read from its keys)."""
    import re
    from importlib import import_module
    from safetensors import safe_open
    idlora = import_pack()
    mod = lambda name: import_module(f"{idlora.__name__}.{name}")  # noqa: E731
    attn = re.compile(mod("models.lora").PRESETS["attn"])
    with safe_open(str(checkpoint), "pt") as f:
        shapes = {k[len(UNET_PREFIX):-len(".weight")]: f.get_slice(k).get_shape() for k in f.keys()
                  if k.startswith(UNET_PREFIX) and k.endswith(".weight")}
    LayerSpec, LoraLayout = mod("training.lora_vector").LayerSpec, mod("training.lora_vector").LoraLayout
    layout = LoraLayout([LayerSpec(n, s[0], (1, s[1]), (s[0], 1), 1.0) for n, s in sorted(shapes.items())
                         if attn.search(n) and len(s) == 2])
    lae_mod, dit_mod = mod("models.lae"), mod("models.dit")
    torch.manual_seed(seed)
    lae = lae_mod.LoraAutoencoder(lae_mod.LaeConfig(layout.length, patch=16, levels=3, channels=32,
                                                    latent_channels=4, heads=4, mlp_hidden=64))
    lae.weight_scale.fill_(0.02)
    _fill(lae.head, seed + 3)  # the head starts at zero (an untrained LAE returns its mean LoRA)
    c, t = lae.cfg.latent_shape
    dit = dit_mod.LoraDiT(dit_mod.DiTConfig(c, t, face_dim=512, image_dim=CLIP_CONFIG["embed_dim"], hidden=64,
                                            depth=2, heads=4))
    _fill(dit, seed + 2)  # no adaLN-Zero: an untrained DiT would give every face the same LoRA
    meta = {"base_model": "sd15", "targets": "attn", "rank": 1, "identities": 0, "demo": "random weights",
            "embedders": {"face": f"arcface ({DEMO_PACK})", "image": f"open_clip {CLIP_ARCH} {CLIP_FILE}"}}
    path = folder / DIFFLORA_FILE
    mod("training.difflora").save_difflora(path, layout, lae, dit, 1.0, {}, meta)
    (folder / "idlora_demo_README.txt").write_text(NOTE)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", required=True, help="folder that gets insightface/ and clip/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, help="an SD1.5 checkpoint: also write a random DiffLoRA for it")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out = Path(ns.out)
    write_iresnet(out / "insightface" / "models" / DEMO_PACK, ns.seed)
    write_clip(out / "clip", ns.seed)
    if ns.checkpoint:
        write_difflora(out / "difflora", ns.checkpoint, ns.seed)
    (out / f"version_{VERSION}").write_text("")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
