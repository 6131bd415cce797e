"""From images to what DiffLoRA trains and samples on: encoded identities for the LoRA dataset builder, and the
reference embeddings (face + CLIP image) that condition the DiT.

The embedders are plain callables, so ComfyUI nodes and command-line tools share this code:

* ``embed_face(images01 (k, H, W, 3) in [0, 1]) -> list`` of one vector or None (no face) per image;
* ``embed_image(images01) -> (k, D)`` tensor (a CLIP image embedding).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .diffusion import DiffusionModel
from .lora_dataset import DatasetConfig, IdentityItem, identity_hash
from .meta_lora import identity_prompts
from .meta_lora_data import concat_conds, load_images

log = logging.getLogger(__name__)

FaceFn = Callable[[torch.Tensor], Sequence[Optional[np.ndarray]]]
ImageFn = Callable[[torch.Tensor], torch.Tensor]


class NoFaceInReference(ValueError):
    pass


@torch.no_grad()
def embeddings(images01: torch.Tensor, embed_face: FaceFn, embed_image: ImageFn
               ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(face (k_f, Df) of the images with a face, image (k, Di), indices of the images with a face), as float32
    CPU tensors."""
    found = [(i, torch.as_tensor(np.asarray(v), dtype=torch.float32).reshape(-1))
             for i, v in enumerate(embed_face(images01)) if v is not None]
    image = embed_image(images01).detach().float().cpu()
    face = torch.stack([v for _, v in found]) if found else torch.zeros(0, 0)
    return face, image, [i for i, _ in found]


def reference_embeddings(images01: torch.Tensor, embed_face: FaceFn, embed_image: ImageFn,
                         what: str = "the face photo") -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, Df) face and (1, Di) image embedding of the first image of a batch in which a face is found."""
    face, image, found = embeddings(images01, embed_face, embed_image)
    if not found:
        raise NoFaceInReference(f"no face was found in {what} ({images01.shape[0]} image(s)): use a photo where one "
                                f"face is clearly visible, or another face embedder")
    return face[:1], image[found[0]:found[0] + 1]


@torch.no_grad()
def original_embeddings(files: list[Path], embed_face: FaceFn, embed_image: ImageFn
                        ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``embeddings`` of image files at their own size: the training crops (centre squares) can cut the face off,
    and a reference photo at sampling time is not cropped either."""
    faces, images, found = [], [], []
    for i, path in enumerate(files):
        with Image.open(path) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float32) / 255.0
        face, image, hit = embeddings(torch.from_numpy(rgb)[None], embed_face, embed_image)
        images.append(image)
        if hit:
            faces.append(face)
            found.append(i)
    return (torch.cat(faces) if faces else torch.zeros(0, 0)), torch.cat(images), found


@torch.no_grad()
def identity_items(model: DiffusionModel, identities: list[tuple[str, list[Path]]], cfg: DatasetConfig,
                   embed_face: FaceFn, embed_image: ImageFn, base_model: str, extra: str = "",
                   skip: Callable[[str, str], bool] | None = None) -> list[IdentityItem]:
    """Encode identities (name, image files) for the builder: latents, one prompt row per image (``identity_prompts``
    with the config's class word, seeded), face and image embeddings, and the content hash. ``skip(name, hash)``
    true leaves an identity out before any encoding (it is finished)."""
    items = []
    for name, files in identities:
        h = identity_hash(files, cfg, base_model, extra)
        if skip is not None and skip(name, h):
            log.info("identity %s is finished (hash %s...), not encoded again", name, h[:12])
            continue
        face, image, found = original_embeddings(files, embed_face, embed_image)
        if not found:
            raise NoFaceInReference(f"identity {name!r}: no face was found in any of its {len(files)} images; DiffLoRA "
                                    f"is conditioned on the face, so remove the folder or add photos with a clear face")
        latents = model.encode_images(load_images(files, cfg.resolution)).float()
        prompts = identity_prompts(cfg.class_word, len(files), seed=cfg.seed)
        distinct = list(dict.fromkeys(prompts))  # each distinct prompt is encoded once
        encoded = concat_conds([model.encode_prompts([p], cfg.resolution, cfg.resolution) for p in distinct])
        index = torch.tensor([distinct.index(p) for p in prompts])
        cond = {k: v[index.to(v.device)] for k, v in encoded.items()}
        items.append(IdentityItem(name, h, latents.cpu(), {k: v.cpu() for k, v in cond.items()}, face, image))
    return items
