"""Meta-LoRA stage-1 inputs: identities from a folder (one subfolder per identity) or from an IMAGE batch with one
label per image, and their encoding into an ``IdentitySet`` (latents of one size, a conditioning row per image).

Pure python / torch / PIL: the model is any ``DiffusionModel`` (nodes/comfy_adapter.ComfyDiffusion in ComfyUI and in
tools/meta_lora_stage1.py).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .diffusion import Cond, DiffusionModel
from .meta_lora import CropData, IdentitySet, identity_prompts

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def scan_identity_folder(root: str | Path) -> list[tuple[str, list[Path]]]:
    """[(identity name, its image files)]: one identity per subfolder of ``root`` (sorted by name), its images
    (.jpg .jpeg .png .webp .bmp, sorted) directly inside it. Hidden folders and other files are ignored."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"the data folder {root} does not exist: pass a folder that holds one subfolder per "
                         f"identity (e.g. {root}/alice/1.jpg, {root}/bob/1.jpg)")
    if not root.is_dir():
        raise ValueError(f"the data path {root} is a file, not a folder: pass a folder that holds one subfolder "
                         f"per identity")
    folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not folders:
        loose = sum(1 for p in root.iterdir() if _is_image(p))
        hint = (f" ({loose} images lie directly in it: move each identity's images into a subfolder of its own)"
                if loose else "")
        raise ValueError(f"the data folder {root} has no identity subfolders{hint}: put each identity's images in "
                         f"a subfolder of its own, e.g. {root}/alice/1.jpg, {root}/bob/1.jpg")
    out = []
    for d in folders:
        images = sorted((p for p in d.iterdir() if _is_image(p)), key=lambda p: p.name)
        if not images:
            raise ValueError(f"the identity folder {d} (identity {d.name!r}) has no images: every identity folder "
                             f"needs at least one image ({' '.join(IMAGE_EXTENSIONS)}); add some or remove the "
                             f"folder")
        out.append((d.name, images))
    if len(out) < 2:
        log.warning("the data folder %s has only %d identity: Meta-LoRA's Meta-Down is meant to be shared by many "
                    "identities (the paper uses hundreds)", root, len(out))
    return out


def load_images(paths: list[str | Path], size: int) -> torch.Tensor:
    """(N, size, size, 3) float in [0, 1]: each image (EXIF-rotated, RGB) centre-cropped to a square and resized
    with bicubic filtering."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size = {size!r} is invalid: use a whole number of pixels >= 1")
    out = torch.empty(len(paths), size, size, 3)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                rgb = ImageOps.exif_transpose(im).convert("RGB")
        except Exception as e:  # noqa: BLE001  any decoder error: name the file
            raise ValueError(f"cannot read the image {path} ({type(e).__name__}: {e}): replace or remove the file")
        w, h = rgb.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        rgb = rgb.crop((left, top, left + s, top + s))
        if s != size:
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        out[i] = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)
    return out


def labels_to_identities(images: torch.Tensor, labels: str) -> list[tuple[str, torch.Tensor]]:
    """Group an IMAGE batch (N, H, W, C) by one label per image (separated by newlines or commas) into
    [(label, its images)], in the order each label first appears."""
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        shape = None if images is None else tuple(images.shape)
        raise ValueError(f"images must be a non-empty IMAGE batch (N, H, W, C), got shape {shape}: connect the "
                         f"identities' images")
    names = [s.strip() for s in re.split(r"[\n,]", labels or "")]
    names = [s for s in names if s]
    if len(names) != images.shape[0]:
        raise ValueError(f"labels has {len(names)} labels but images has {images.shape[0]} images: give exactly one "
                         f"label (the identity's name) per image, separated by newlines or commas")
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    if len(groups) < 2:
        log.warning("labels name only %d identity: Meta-LoRA's Meta-Down is meant to be shared by many identities",
                    len(groups))
    return [(name, images[idx]) for name, idx in groups.items()]


def concat_conds(rows: list[Cond]) -> Cond:
    """Concatenate conditioning rows; 'context' of different token lengths (long prompts give more 77-token
    chunks) is padded to the longest by repeating its chunks, as ComfyUI does."""
    out: Cond = {}
    for key in rows[0]:
        tensors = [r[key] for r in rows]
        if key == "context":
            n = max(t.shape[1] for t in tensors)
            tensors = [t if t.shape[1] == n else torch.cat([t] * (n // t.shape[1]) + [t[:, :n % t.shape[1]]], 1)
                       for t in tensors]
        out[key] = torch.cat(tensors, 0)
    return out


def encode_identity_set(model: DiffusionModel, identities: list[tuple[str, torch.Tensor]], class_word: str,
                        seed: int) -> IdentitySet:
    """Latents (one VAE batch per identity) and a prompt row per image (``identity_prompts``, seeded), on the
    model's device. Every identity's images must have one size (``load_images`` gives that)."""
    if not identities:
        raise ValueError("no identities to encode: give at least one identity with at least one image")
    names = [name for name, _ in identities]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"identities {dupes} appear more than once: every identity needs a name of its own")
    sizes = {tuple(imgs.shape[1:3]) for _, imgs in identities if imgs.ndim == 4}
    bad = [name for name, imgs in identities if imgs.ndim != 4 or imgs.shape[0] == 0]
    if bad:
        raise ValueError(f"identities {bad} have no images: every identity needs at least one image")
    if len(sizes) != 1:
        raise ValueError(f"the identities' images have different sizes {sorted(sizes)}: resize them to one size "
                         f"(load_images does) before encoding")
    h, w = sizes.pop()
    latents, counts = [], []
    with torch.no_grad():
        for name, imgs in identities:
            latents.append(model.encode_images(imgs).to(model.device, torch.float32))
            counts.append(imgs.shape[0])
        prompts = identity_prompts(class_word, sum(counts), seed=seed)
        distinct = list(dict.fromkeys(prompts))
        encoded = concat_conds([model.encode_prompts([p], w, h) for p in distinct])
    index = torch.tensor([distinct.index(p) for p in prompts])
    cond = {k: v.to(model.device)[index.to(model.device)] for k, v in encoded.items()}
    owner = torch.arange(len(identities)).repeat_interleave(torch.tensor(counts))
    return IdentitySet(names, torch.cat(latents), cond, owner)


def encode_crops(model: DiffusionModel, crops: list[np.ndarray], prompt: str) -> CropData:
    """Stage 2's data: each crop ((h, w, 3) uint8, sizes may differ) encoded on its own, with the prompt's row."""
    latents, conds = [], []
    with torch.no_grad():
        for c in crops:
            img = torch.tensor(np.asarray(c), dtype=torch.float32)[None] / 255.0
            latents.append(model.encode_images(img).to(model.device, torch.float32))
            cond = model.encode_prompts([prompt], c.shape[1], c.shape[0])
            conds.append({k: v.to(model.device) for k, v in cond.items()})
    return CropData(latents, conds)
