"""CSD (Contrastive Style Descriptors, Somepalli et al. 2024): the style encoder behind DuoLoRA's CSD-s metric.

CSD has no PyPI package (its code is a GitHub repository that loads OpenAI's ``clip`` package and downloads
ViT-L/14). The network is small to state: OpenAI CLIP's ViT-L/14 image tower without its projection, and two
(1024, 768) projections, ``last_layer_style`` and ``last_layer_content``; the style descriptor is
``normalize(backbone(x) @ last_layer_style)``. open_clip's ``VisionTransformer`` is OpenAI's tower with the same
parameter names, so IDLoRA builds it there (QuickGELU, as OpenAI's weights need) and loads CSD's released file:

- ``checkpoint.pth`` (CSD's release; ``{'model_state_dict': {'module.backbone.<CLIP visual keys>',
  'module.last_layer_style', 'module.last_layer_content'}, ...}``), or the same keys without the ``module.``
  prefix in a .safetensors / .pth state dict (the Hugging Face mirror's layout).

Width, depth, patch and image size are read from the file (ViT-L/14 at 224 px for the release), so the same code
loads the real model and the small random-weight one the tests write. Inputs are CLIP-preprocessed (shortest side
to 224 bicubic, centre crop, CLIP mean/std), as CSD's evaluation does.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .face_embed import read_state_dict
from .metric_files import find_model_file

log = logging.getLogger(__name__)

CSD_FILE = "checkpoint.pth"  # the name of CSD's released ViT-L checkpoint
CSD_SOURCE = "CSD's released ViT-L checkpoint (github.com/learn2phoenix/CSD, 'checkpoint.pth')"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_L14 = {"width": 1024, "layers": 24, "heads": 16, "patch_size": 14, "image_size": 224, "mlp_ratio": 4.0,
           "output_dim": 768}


class CSDStyleEncoder(nn.Module):
    """CLIP ViT image tower (no projection) + CSD's style and content projections."""

    def __init__(self, width: int = 1024, layers: int = 24, heads: int = 16, patch_size: int = 14,
                 image_size: int = 224, mlp_ratio: float = 4.0, output_dim: int = 768):
        super().__init__()
        from open_clip.transformer import QuickGELU, VisionTransformer
        self.config = dict(width=width, layers=layers, heads=heads, patch_size=patch_size, image_size=image_size,
                           mlp_ratio=mlp_ratio, output_dim=output_dim)
        self.backbone = VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                                          heads=heads, mlp_ratio=mlp_ratio, output_dim=output_dim,
                                          act_layer=QuickGELU)
        self.backbone.proj = None  # CSD's backbone ends at ln_post(CLS); the projections are its own
        self.last_layer_style = nn.Parameter(torch.empty(width, output_dim).normal_(std=width ** -0.5))
        self.last_layer_content = nn.Parameter(torch.empty(width, output_dim).normal_(std=width ** -0.5))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(B, 3, S, S)`` -> ``(B, output_dim)`` unit style descriptors."""
        return F.normalize(self.backbone(pixels) @ self.last_layer_style, dim=1)

    def content(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(pixels) @ self.last_layer_content, dim=1)


def csd_config(sd: dict[str, torch.Tensor]) -> dict:
    """The CSDStyleEncoder arguments that fit a CSD state dict (keys without 'module.')."""
    need = ("backbone.conv1.weight", "backbone.positional_embedding", "last_layer_style", "last_layer_content")
    absent = [k for k in need if k not in sd]
    if absent:
        raise ValueError(f"not a CSD checkpoint: keys {absent} are missing (expected 'backbone.*' CLIP visual "
                         f"keys and the 'last_layer_style' / 'last_layer_content' projections)")
    width, _, patch, _ = sd["backbone.conv1.weight"].shape
    grid = math.isqrt(sd["backbone.positional_embedding"].shape[0] - 1)
    layers = len({k.split(".")[3] for k in sd if k.startswith("backbone.transformer.resblocks.")})
    hidden = sd["backbone.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return {"width": width, "layers": layers, "heads": max(1, width // 64), "patch_size": patch,
            "image_size": grid * patch, "mlp_ratio": hidden / width, "output_dim": sd["last_layer_style"].shape[1]}


def read_csd_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """CSD's checkpoint as a flat state dict (its training checkpoint may carry an argparse Namespace)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = read_state_dict(path, hint=f"expected {CSD_SOURCE}")
    return {k: v for k, v in sd.items() if k.startswith(("backbone.", "last_layer_"))}


def load_csd(path: str | Path, device: str | torch.device = "cpu") -> CSDStyleEncoder:
    """A CSDStyleEncoder with the weights of ``path`` (strict: every key must fit)."""
    sd = read_csd_state_dict(path)
    sd.pop("backbone.proj", None)  # CSD sets the tower's projection to None before saving; older files keep it
    model = CSDStyleEncoder(**csd_config(sd))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit CSD's CLIP ViT + projections: {exc}") from exc
    log.info("loaded CSD %s (%s)", path, model.config)
    return model.to(device).eval().requires_grad_(False)


class CSDScorer:
    """``(B, 3, H, W)`` in [0, 1] -> CSD style descriptors, with CSD's CLIP preprocessing (differentiable)."""

    def __init__(self, dirs: Sequence[str | Path], checkpoint: str = CSD_FILE, device: str | torch.device = "cpu"):
        self.path = find_model_file("CSD", checkpoint, dirs, CSD_SOURCE)
        self.device = torch.device(device)
        self.model = load_csd(self.path, self.device)
        self.name = f"CSD ViT (width {self.model.config['width']}, {self.path.name})"

    def pixels(self, images01: torch.Tensor) -> torch.Tensor:
        from ..training.evaluate import vision_pixels
        return vision_pixels(images01.to(self.device), self.model.config["image_size"], CLIP_MEAN, CLIP_STD)

    def style_features(self, images01: torch.Tensor) -> torch.Tensor:
        return self.model(self.pixels(images01))
