"""Tiny DiffLoRA fixtures shared by the DiffLoRA job and command-line tests: a LoRA dataset folder built on the
pure-torch TinyDiffusion (real image files -> identity_items -> lora_dataset.build), and LAE / DiT settings small
enough for a 2-core machine."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from idlora.training.difflora import DiTTrainConfig, LaeTrainConfig
from idlora.training.difflora_data import identity_items
from idlora.training.lora_dataset import DatasetConfig, build, finished
from tiny_torch import TinyDiffusion

NAMES = ("ada", "bo", "cy", "di")
# flat LoRA of the tiny model, attn targets, rank 2: 1920 numbers; LAE stride 8 * 2 -> latent (2, 120)
LAE_ARGS = dict(patch=8, levels=2, channels=16, latent_channels=2, heads=2, mlp_hidden=16, batch_size=2,
                learning_rate=3e-3)
DIT_ARGS = dict(hidden=16, depth=1, heads=2, batch_size=4, learning_rate=1e-3)


def lae_cfg(steps: int = 6, **kw) -> LaeTrainConfig:
    return LaeTrainConfig(**{**LAE_ARGS, "steps": steps, **kw})


def dit_cfg(steps: int = 6, **kw) -> DiTTrainConfig:
    return DiTTrainConfig(**{**DIT_ARGS, "steps": steps, **kw})


def dataset_cfg(**kw) -> DatasetConfig:
    return DatasetConfig(**{"steps": 2, "learning_rate": 3e-3, "rank": 2, "targets": "attn", "seed": 3,
                            "resolution": 32, "embedders": {"face": "pool4", "image": "pool2"}, **kw})


def embed_face(images01: torch.Tensor) -> list:
    """A stand-in face embedder: a 12-d pooled colour vector per image; 'no face' in a nearly black image."""
    x = F.adaptive_avg_pool2d(images01.permute(0, 3, 1, 2), 2).flatten(1)
    return [None if float(images01[i].mean()) < 0.02 else x[i].numpy() for i in range(len(x))]


def embed_image(images01: torch.Tensor) -> torch.Tensor:
    """A stand-in CLIP image embedder: (k, 6)."""
    x = images01.permute(0, 3, 1, 2)
    return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def write_identities(root: Path, names=NAMES, k: int = 2, size: int = 32) -> Path:
    """``root/<name>/<i>.png``: k random images per identity, each identity with its own colour cast."""
    for n_i, name in enumerate(names):
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        g = np.random.default_rng(100 + n_i)
        cast = g.uniform(0.2, 0.8, 3)
        for i in range(k):
            img = np.clip(cast + 0.25 * g.standard_normal((size, size, 3)), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(d / f"{i}.png")
    return Path(root)


def build_dataset(out: Path, images: Path | None = None, names=NAMES, **cfg) -> dict:
    """Build (or complete) a LoRA dataset of ``names`` into ``out``; the images go to ``out``'s sibling folder."""
    images = images or write_identities(Path(out).parent / f"{Path(out).name}_images", names)
    from idlora.training.meta_lora_data import scan_identity_folder
    ids = [(n, fs) for n, fs in scan_identity_folder(images) if n in names]
    model, c = TinyDiffusion(seed=0), dataset_cfg(**cfg)
    items = identity_items(model, ids, c, embed_face, embed_image, "tiny.safetensors",
                           skip=lambda n, h: finished(out, n, h))
    return build(model, items, out, c)
