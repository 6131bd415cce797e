"""Shared helpers of the identity-stylization tests: a real face photo, its landmarks, a random-weight
ArcFace-architecture backbone (no real ArcFace weights exist on these machines)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tiny_torch import GLOBAL_RNG
from idlora.models.face_detect import RetinaFaceTiny
from idlora.models.iresnet import ArcFaceTorch, iresnet

ASSETS = Path(__file__).resolve().parent / "assets"
SIZE = 128  # training image side, px (16x16 latents)


def face_photo(name: str = "obama.jpg", size: int = SIZE) -> torch.Tensor:
    """A public-domain portrait, square-cropped around the face, as a (1, size, size, 3) IMAGE in [0, 1]."""
    im = Image.open(ASSETS / "faces" / name).convert("RGB")
    w, h = im.size
    side = min(w, h)
    im = im.crop(((w - side) // 2, 0, (w - side) // 2 + side, side)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).float()[None] / 255.0


def landmarks_of(image: torch.Tensor) -> torch.Tensor:
    faces = RetinaFaceTiny().detect((image[0].numpy() * 255).astype(np.uint8))
    assert faces, "the test photo must have a detectable face"
    best = max(faces, key=lambda f: f.width * f.height)
    return torch.tensor(np.asarray(best.landmarks), dtype=torch.float32)[None]


def backbone(seed: int = 0) -> ArcFaceTorch:
    with GLOBAL_RNG:  # seeding and drawing as one step, also when a job's thread builds one (see tiny_torch)
        torch.manual_seed(seed)
        return ArcFaceTorch(iresnet((1, 1, 1, 1), embedding_size=64))
