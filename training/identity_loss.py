"""The identity term of identity-preserving stylization: L_identity = 1 - cos(E(crop(D(x0_hat))), E(reference)).

x0_hat is the denoiser's estimate of the clean latent. D decodes it to RGB (the full VAE, or TAESD), ``crop``
is the differentiable ArcFace alignment (models/face_crop.py) driven by the reference photo's landmarks, which
are constants of the graph, and E is a differentiable face-embedding backbone (the ArcFace IResNet port, a CLIP
vision or DINOv2 model). The reference embedding is computed once from the photo itself.

Decoding dominates the cost (the SD VAE decoder is about 3x the U-Net's FLOPs at the same size), so the loss
can decode only the latent window that covers the face crop, plus a margin of context for the decoder's
receptive field: the face of a portrait covers a fraction of the image, and a convolutional decoder's output
inside the window barely depends on latents far outside it. Fewer pixels, same gradients where it matters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..models.face_crop import crop_faces, similarity_matrix
from .config import Config, ConfigError

Decoder = Callable[[torch.Tensor], torch.Tensor]   # model-space latents (B, C, h, w) -> RGB (B, 3, 8h, 8w) in [0, 1]
EmbedFn = Callable[[torch.Tensor], torch.Tensor]   # aligned face crops (B, 3, S, S) in [0, 1] -> (B, D)
DECODERS = ("vae", "taesd")
# What the identity term scores: the stylized x0 (content + style LoRA together, the paper's reading) or the photo's
# reconstruction through the content LoRA alone (the reading IDLoRA used before).
TARGETS = ("stylized", "reconstruction")
LATENT_SCALE = 8  # pixels per latent pixel (SD1.x, SDXL)


class IdentityConfigError(ConfigError):
    """A bad identity-loss setting; the message names it, the value and the fix."""


@dataclass
class IdentityConfig(Config):
    _error, _prefix, _label = IdentityConfigError, "identity ", "identity settings"
    weight: float = 0.1                               # lambda in L_total = L_x0 + lambda * L_identity
    every: int = 1                                    # apply the term on every k-th step
    timestep_range: tuple[float, float] = (0.0, 0.5)  # fraction of the schedule (0 = no noise) where it applies
    decoder: str = "vae"                              # "vae" (the checkpoint's) or "taesd" (models/vae_approx)
    face_region: bool = True                          # decode only the latent window around the face
    margin: int = 2                                   # latent pixels of decoder context around that window
    target: str = "stylized"                          # TARGETS: whose x0 estimate the term scores against the photo

    def validate(self) -> "IdentityConfig":
        need = self.need
        need(math.isfinite(self.weight) and self.weight >= 0, "weight", "use a number >= 0 (0 turns the term off)")
        need(isinstance(self.every, int) and self.every >= 1, "every", "use a whole number >= 1")
        lo, hi = self.timestep_range
        need(0 <= lo < hi <= 1, "timestep_range", "use two fractions 0 <= low < high <= 1 (low noise is near 0)")
        need(self.decoder in DECODERS, "decoder", f"use one of {DECODERS}")
        need(isinstance(self.margin, int) and self.margin >= 0, "margin", "use a whole number of latent pixels >= 0")
        need(self.target in TARGETS, "target", f"use one of {TARGETS}: 'stylized' scores the x0 of content + style "
                                               f"LoRA together, 'reconstruction' the content LoRA's alone")
        return self


def face_window(landmarks: torch.Tensor, latent_hw: tuple[int, int], crop_size: int, margin: int) -> tuple[int, ...]:
    """(y0, y1, x0, x1) in latent pixels: the box around the aligned crop's footprint in the image, plus margin."""
    inverse = similarity_matrix(landmarks.reshape(1, -1, 2), out_size=crop_size)[0]  # crop px -> image px
    s = float(crop_size)
    corners = torch.tensor([[0, 0, 1], [s, 0, 1], [0, s, 1], [s, s, 1]], dtype=inverse.dtype)
    pts = corners @ inverse.T  # (4, 2) image pixels (x, y)
    h, w = latent_hw
    x0 = max(0, math.floor(float(pts[:, 0].min()) / LATENT_SCALE) - margin)
    x1 = min(w, math.ceil(float(pts[:, 0].max()) / LATENT_SCALE) + margin)
    y0 = max(0, math.floor(float(pts[:, 1].min()) / LATENT_SCALE) - margin)
    y1 = min(h, math.ceil(float(pts[:, 1].max()) / LATENT_SCALE) + margin)
    if x1 <= x0 or y1 <= y0:
        raise IdentityConfigError(f"the face lies outside the {w * 8}x{h * 8} px image (landmarks "
                                  f"{landmarks.tolist()}): use a photo where the whole face is visible")
    return y0, y1, x0, x1


class IdentityLoss:
    """1 - cosine between the embedding of the decoded, aligned face of x0_hat and the reference embedding.

    One reference per training image: ``landmarks`` (N, 5, 2) in pixels of the training images (the size the
    latents were encoded from) and ``references`` (N, D), unit or not. ``__call__`` takes x0 estimates and the
    indices of the training images they belong to, and returns the per-sample losses (B,).
    """

    def __init__(self, decoder: Decoder, embed: EmbedFn, crop_size: int, landmarks: torch.Tensor,
                 references: torch.Tensor, latent_hw: tuple[int, int], config: IdentityConfig):
        self.cfg = config.validate()
        self.decoder, self.embed, self.crop_size = decoder, embed, int(crop_size)
        self.landmarks = landmarks.detach().float().cpu().reshape(-1, 5, 2)
        self.references = F.normalize(references.detach().float(), dim=-1)
        if self.references.shape[0] != self.landmarks.shape[0]:
            raise IdentityConfigError(f"{self.landmarks.shape[0]} landmark sets for {self.references.shape[0]} "
                                      f"reference embeddings: give one of each per training image")
        self.latent_hw = tuple(latent_hw)
        full = (0, self.latent_hw[0], 0, self.latent_hw[1])
        self.windows = [face_window(lm, self.latent_hw, self.crop_size, self.cfg.margin) if self.cfg.face_region
                        else full for lm in self.landmarks]

    @staticmethod
    @torch.no_grad()
    def reference_embeddings(embed: EmbedFn, photos01: torch.Tensor, landmarks: torch.Tensor,
                             crop_size: int) -> torch.Tensor:
        """(N, D) embeddings of the aligned faces of the reference photos (N, 3, H, W) in [0, 1]."""
        return embed(crop_faces(photos01.float(), landmarks.float().reshape(-1, 5, 2), crop_size)).float()

    def faces(self, x0_hat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) aligned face crops of the decoded x0 estimates (differentiable w.r.t. x0_hat)."""
        crops = []
        for b, i in enumerate(idx.tolist()):
            y0, y1, x0, x1 = self.windows[i]
            rgb = self.decoder(x0_hat[b:b + 1, :, y0:y1, x0:x1])
            shift = torch.tensor([x0 * LATENT_SCALE, y0 * LATENT_SCALE], dtype=torch.float32)
            crops.append(crop_faces(rgb.float(), self.landmarks[i:i + 1] - shift, self.crop_size))
        return torch.cat(crops)

    def __call__(self, x0_hat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        emb = self.embed(self.faces(x0_hat, idx)).float()
        ref = self.references[idx.cpu()].to(emb.device)
        return 1.0 - F.cosine_similarity(emb, ref, dim=-1)

    def state(self) -> dict:
        """What a job persists to rebuild this loss (the decoder and backbone are rebuilt from their sources)."""
        return {"landmarks": self.landmarks, "references": self.references.cpu(),
                "latent_hw": list(self.latent_hw), "crop_size": self.crop_size}
