"""DiffLoRA's denoiser: a DiT over LAE latents with adaLN-Zero conditioning, and the Mixed Image Features gate
(Sections 3.3, 3.4, 4.1).

A latent (C, T) is read as T tokens of C numbers. Each block is pre-norm attention + MLP whose LayerNorm shift /
scale and residual gates come from ``c = timestep embedding + MIF features`` (adaLN-Zero: the modulation and the
output layer start at zero, so an untrained model outputs zeros and every block starts as the identity).
The network predicts x0 (Eq. 3).

MIF (Eqs. 4-6): M = concat(face, image); (S_img, S_face) = softmax(Linear(M)); F = S_img * MLP(image) +
S_face * MLP(face). The gate gives two scalars per sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config


@dataclass
class DiTConfig(Config):
    _prefix, _label = "DiT ", "DiT settings"
    in_channels: int            # LAE latent channels
    tokens: int                 # LAE latent length T
    face_dim: int               # face-recognition embedding size (ArcFace: 512)
    image_dim: int              # CLIP image embedding size
    hidden: int = 256           # the paper: 1454 (16 layers)
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    frequency_dim: int = 256    # sinusoidal timestep features

    def validate(self) -> "DiTConfig":
        for name in ("in_channels", "tokens", "face_dim", "image_dim", "hidden", "depth", "heads", "frequency_dim"):
            v = getattr(self, name)
            self.need(isinstance(v, int) and v >= 1, name, "use a whole number >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"DiT hidden = {self.hidden} must be a multiple of heads = {self.heads}")
        return self


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    out = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(out, (0, dim % 2))


def sincos_positions(tokens: int, dim: int) -> torch.Tensor:
    """(tokens, dim) fixed 1D sin-cos position embedding."""
    return timestep_features(torch.arange(tokens), dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class MixedImageFeatures(nn.Module):
    def __init__(self, face_dim: int, image_dim: int, out_dim: int):
        super().__init__()
        self.face_dim, self.image_dim = face_dim, image_dim
        self.gate = nn.Linear(face_dim + image_dim, 2)
        self.face_mlp = _mlp(face_dim, out_dim, out_dim)
        self.image_mlp = _mlp(image_dim, out_dim, out_dim)

    def scores(self, face: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B, 2): (S_img, S_face), Eq. 5."""
        return torch.softmax(self.gate(torch.cat([face, image], dim=-1)), dim=-1)

    def forward(self, face: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        for name, x, d in (("face", face, self.face_dim), ("image", image, self.image_dim)):
            if x.ndim != 2 or x.shape[1] != d:
                raise ValueError(f"the {name} embedding has shape {tuple(x.shape)}, this model takes (batch, {d}): "
                                 f"use the same {name} embedder the DiffLoRA model was trained with")
        s = self.scores(face, image)
        return s[:, :1] * self.image_mlp(image) + s[:, 1:] * self.face_mlp(face)


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, int(hidden * mlp_ratio)), nn.GELU(approximate="tanh"),
                                 nn.Linear(int(hidden * mlp_ratio), hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def attention(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class LoraDiT(nn.Module):
    """x0-predicting DiT: (B, C, T) noisy latents, (B,) timesteps, face (B, Df), image (B, Di) -> (B, C, T)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg.validate()
        h = cfg.hidden
        self.embed = nn.Linear(cfg.in_channels, h)
        self.register_buffer("pos", sincos_positions(cfg.tokens, h)[None], persistent=False)
        self.t_embed = _mlp(cfg.frequency_dim, h, h)
        self.mif = MixedImageFeatures(cfg.face_dim, cfg.image_dim, h)
        self.blocks = nn.ModuleList(DiTBlock(h, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))
        self.out = nn.Linear(h, cfg.in_channels)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        for layer in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:  # adaLN-Zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, face: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The MIF features (B, hidden); compute once per sample and pass as ``cond`` to every step."""
        return self.mif(face, image)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (self.cfg.in_channels, self.cfg.tokens):
            raise ValueError(f"the DiT takes latents (batch, {self.cfg.in_channels}, {self.cfg.tokens}), got "
                             f"{tuple(x.shape)}: use the LAE this DiT was trained on")
        h = self.embed(x.transpose(1, 2)) + self.pos                     # (B, T, D)
        c = self.t_embed(timestep_features(t, self.cfg.frequency_dim)) + cond  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h), shift, scale)).transpose(1, 2)

    def flops_per_sample(self) -> int:
        """Forward multiply-adds x 2 of the transformer (attention scores included), per latent."""
        t, d, cfg = self.cfg.tokens, self.cfg.hidden, self.cfg
        per_block = 2 * t * (3 * d * d + d * d + 2 * d * int(d * cfg.mlp_ratio)) + 2 * 2 * t * t * d
        return cfg.depth * per_block + 2 * t * (cfg.in_channels * d * 2)
