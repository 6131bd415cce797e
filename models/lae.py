"""The LoRA weights autoencoder, LAE (DiffLoRA, Sections 3.2 and 4.1).

A flat LoRA vector (models/lora_vector.py) of length L is padded to a multiple of ``patch * 2**(levels-1)`` and
cut into patches of ``patch`` numbers (a stride-``patch`` 1D convolution). The encoder has ``levels`` layers of two
residual 1D-conv blocks each, halving the length between layers, then a middle block (residual, self-attention,
residual) and a projection to ``latent_channels``. The latent is (latent_channels, L_pad / (patch * 2**(levels-1))).

The decoder starts with attention at the latent's length (a middle block and one more attention layer: attention
runs only where the sequence is short, so an SD-size LoRA of ~10^6 numbers stays affordable), upsamples with
residual blocks, and ends in a per-patch MLP that turns each position's features back into ``patch`` weights. Compression ratio =
L / (latent_channels * latent_length): with patch 16, 5 levels and 4 latent channels it is 64x; patch 75 gives
the paper's ~300x (75 * 16 / 4, less the padding; LaeTrainConfig's "paper" preset).

Inputs are centred on ``weight_mean`` and divided by ``weight_scale`` (the population's mean LoRA and the std
around it, set by the trainer), so the network sees the identity-specific part at unit scale: LoRAs trained from one
shared initialisation have a large common part that a decoder without absolute positions could not reproduce from a
small latent. The head's last layer starts at zero, so an untrained LAE returns the mean LoRA. ``encode`` /
``decode`` take and give real LoRA weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config


@dataclass
class LaeConfig(Config):
    _prefix, _label = "LAE ", "LAE settings"
    length: int                  # L, numbers in a flat LoRA
    patch: int = 16
    levels: int = 5              # the paper: a 5-layer encoder
    channels: int = 64
    latent_channels: int = 4
    heads: int = 4
    mlp_hidden: int = 256

    def validate(self) -> "LaeConfig":
        for name in ("length", "patch", "levels", "channels", "latent_channels", "heads", "mlp_hidden"):
            v = getattr(self, name)
            self.need(isinstance(v, int) and v >= 1, name, "use a whole number >= 1")
        if self.channels % self.heads or self.channels % 8:
            raise ValueError(f"LAE channels = {self.channels} must be a multiple of 8 (group norm) and of heads "
                             f"= {self.heads}")
        return self

    @property
    def stride(self) -> int:
        return self.patch * 2 ** (self.levels - 1)

    @property
    def padded_length(self) -> int:
        return math.ceil(self.length / self.stride) * self.stride

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.latent_channels, self.padded_length // self.stride

    @property
    def compression(self) -> float:
        c, t = self.latent_shape
        return self.length / (c * t)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, c)


class ResBlock1d(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv1d(c, c, 3, padding=1),
                                  _norm(c), nn.SiLU(), nn.Conv1d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        return x + self.body(x)


class Attention1d(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.norm, self.heads = _norm(c), heads
        self.qkv, self.proj = nn.Conv1d(c, 3 * c, 1), nn.Conv1d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        b, c, t = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, t).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, C/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, t))


def _mid(c: int, heads: int) -> nn.Sequential:
    return nn.Sequential(ResBlock1d(c), Attention1d(c, heads), ResBlock1d(c))


class LoraAutoencoder(nn.Module):
    def __init__(self, cfg: LaeConfig):
        super().__init__()
        self.cfg = cfg.validate()
        c, p = cfg.channels, cfg.patch
        self.register_buffer("weight_scale", torch.ones(()))
        self.register_buffer("weight_mean", torch.zeros(cfg.length))
        self.patchify = nn.Conv1d(1, c, p, stride=p)
        enc: list[nn.Module] = []
        for i in range(cfg.levels):
            enc += [ResBlock1d(c), ResBlock1d(c)]
            if i < cfg.levels - 1:
                enc.append(nn.Conv1d(c, c, 4, stride=2, padding=1))
        self.encoder = nn.Sequential(*enc, _mid(c, cfg.heads), _norm(c), nn.SiLU(),
                                     nn.Conv1d(c, cfg.latent_channels, 1))
        dec: list[nn.Module] = [nn.Conv1d(cfg.latent_channels, c, 1), _mid(c, cfg.heads), Attention1d(c, cfg.heads)]
        for _ in range(cfg.levels - 1):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(c, c, 3, padding=1), ResBlock1d(c)]
        self.decoder = nn.Sequential(*dec, _norm(c))
        self.head = nn.Sequential(nn.Linear(c, cfg.mlp_hidden), nn.SiLU(), nn.Linear(cfg.mlp_hidden, p))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def encode(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, L) LoRA vectors -> (B, latent_channels, T) latents."""
        if weights.ndim != 2 or weights.shape[1] != self.cfg.length:
            raise ValueError(f"the LAE takes (batch, {self.cfg.length}) LoRA vectors, got {tuple(weights.shape)}: "
                             f"flatten the LoRA with the layout this LAE was trained on")
        x = F.pad((weights - self.weight_mean) / self.weight_scale, (0, self.cfg.padded_length - self.cfg.length))
        return self.encoder(self.patchify(x[:, None]))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, T) -> (B, L) LoRA vectors."""
        h = self.decoder(latents).transpose(1, 2)          # (B, T * patch_groups, C)
        out = self.head(h).reshape(latents.shape[0], -1)   # (B, L_pad)
        return out[:, :self.cfg.length] * self.weight_scale + self.weight_mean

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(weights))


def weight_preserved_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 2: (1/n) sum_i |x_i| * |x_i - x_hat_i|, errors on large weights weigh more."""
    return (x.abs() * (x - x_hat).abs()).mean()


def lae_loss(x: torch.Tensor, x_hat: torch.Tensor, scale: torch.Tensor | float, wp_weight: float) -> torch.Tensor:
    """Reconstruction (MSE) plus ``wp_weight`` times the WP loss, both on weights divided by ``scale``."""
    xs, hs = x / scale, x_hat / scale
    return F.mse_loss(hs, xs) + wp_weight * weight_preserved_loss(xs, hs)
