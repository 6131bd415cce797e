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
from .lora_dataset import DatasetConfig, IdentityItem, identity_hash, select_faces
from .meta_augment import AugmentConfig, cut, plan_crops
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


def augmented_images(files: list[Path], cfg: DatasetConfig) -> tuple[torch.Tensor, dict]:
    """The crop / flip augmentation of the dataset builder (DatasetConfig.augment_scales / augment_flip): for each
    image, one square crop per scale, its side that scale times the image's shorter side, centred on the image (the
    centre square that load_images takes is the crop of scale 1), flipped horizontally with probability
    augment_flip, resized (Lanczos) to the resolution. Meta-LoRA's crop planner and cutter (training/meta_augment.py)
    do the work, with the image's centre square as the box the scales are measured on (the face-centred crops of
    Meta-LoRA would need a face box, which the builder's embedders do not give). The flips of image i are drawn
    from seed + i. Returns ((N, res, res, 3) in [0, 1], the record for entry.json)."""
    res, out, flips = cfg.resolution, [], 0
    for i, path in enumerate(files):
        with Image.open(path) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)
        h, w = rgb.shape[:2]
        side = min(h, w)
        left, top = (w - side) // 2, (h - side) // 2
        aug = AugmentConfig(ratios=((1, 1),), scales=tuple(cfg.augment_scales), max_images=len(cfg.augment_scales),
                            flip_prob=float(cfg.augment_flip), seed=cfg.seed + i, out_area=res * res, multiple=8)
        for crop in plan_crops((h, w), (left, top, left + side, top + side), aug):
            out.append(torch.from_numpy(cut(rgb, crop, aug).astype(np.float32) / 255.0))
            flips += crop.flipped
    record = {"scales": list(cfg.augment_scales), "flip": cfg.augment_flip, "images": len(files),
              "latents": len(out), "flipped": flips}
    return torch.stack(out), {"augment": record}


@torch.no_grad()
def identity_items(model: DiffusionModel, identities: list[tuple[str, list[Path]]], cfg: DatasetConfig,
                   embed_face: FaceFn, embed_image: ImageFn, base_model: str, extra: str = "",
                   skip: Callable[[str, str], bool] | None = None) -> list[IdentityItem]:
    """Encode identities (name, image files) for the builder: the face filter (``select_faces``: the images it
    keeps), latents of the kept images (or of their crops, with ``augment``), one prompt row per latent
    (``identity_prompts`` with the config's class word, seeded), face and image embeddings of the kept images, and
    the content hash. ``skip(name, hash)`` true leaves an identity out before any encoding (it is finished)."""
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
        chosen = select_faces(name, [Path(f).name for f in files], face, found, cfg)
        if cfg.filters_faces:
            log.info("identity %s: the face filter keeps %d of %d images (%d without a face)", name,
                     len(chosen.kept), len(files), chosen.record["face_filter"]["no_face"])
        files = [files[i] for i in chosen.kept]
        face, image = face[chosen.face_rows], image[chosen.kept]
        record = dict(chosen.record)
        if cfg.augment:
            pixels, aug = augmented_images(files, cfg)
            record.update(aug)
        else:
            pixels = load_images(files, cfg.resolution)
        latents = model.encode_images(pixels).float()
        prompts = identity_prompts(cfg.class_word, len(latents), seed=cfg.seed)
        distinct = list(dict.fromkeys(prompts))  # each distinct prompt is encoded once
        encoded = concat_conds([model.encode_prompts([p], cfg.resolution, cfg.resolution) for p in distinct])
        index = torch.tensor([distinct.index(p) for p in prompts])
        cond = {k: v[index.to(v.device)] for k, v in encoded.items()}
        items.append(IdentityItem(name, h, latents.cpu(), {k: v.cpu() for k, v in cond.items()}, face, image,
                                  record))
    return items
