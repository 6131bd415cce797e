"""A tiny pure-torch diffusion model implementing training.diffusion.DiffusionModel.

It uses diffusers-like module names (attn1.to_q, ff.net.0.proj, conv_in, ...) so the
LoRA presets find the same kinds of layers as in a real U-Net, and it has a Conv2d
path so conv LoRA is exercised. No ComfyUI involved.
"""
from __future__ import annotations

import threading
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from idlora.training.diffusion import FLOW, c_in, sd_sigmas


class Attention(nn.Module):
    def __init__(self, dim: int, ctx_dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim, bias=False), nn.Linear(ctx_dim, dim, bias=False), \
            nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, ctx):
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        return self.to_out(F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0])


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x):
        a, g = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(g)


class Block(nn.Module):
    def __init__(self, dim: int, ctx_dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1, self.attn2 = Attention(dim, dim), Attention(dim, ctx_dim)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, dim * 2), nn.Dropout(0.0), nn.Linear(dim * 2, dim))
        self.time = nn.Linear(dim, dim)

    def forward(self, x, ctx, temb):
        x = x + self.time(temb)[:, None]
        x = x + self.attn1(self.norm1(x), self.norm1(x))
        x = x + self.attn2(self.norm2(x), ctx)
        return x + self.ff.net(self.norm3(x))


class TinyDenoiser(nn.Module):
    """(B, 4, h, w) latents, (B, T, ctx_dim) context -> (B, 4, h, w)."""

    def __init__(self, dim: int = 32, ctx_dim: int = 16, depth: int = 2):
        super().__init__()
        self.dim = dim
        self.conv_in = nn.Conv2d(4, dim, 3, padding=1)
        self.blocks = nn.ModuleList(Block(dim, ctx_dim) for _ in range(depth))
        self.conv_out = nn.Conv2d(dim, 4, 3, padding=1)

    def forward(self, x, t, context):
        b, _, h, w = x.shape
        half = self.dim // 2
        freqs = torch.exp(-torch.arange(half, dtype=torch.float32) * (9.2 / half)).to(x.device)
        temb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=-1).to(x.dtype)
        z = self.conv_in(x).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            z = blk(z, context, temb)
        return self.conv_out(z.transpose(1, 2).reshape(b, self.dim, h, w))


class TinyDecoder(nn.Module):
    """The inverse of TinyDiffusion's 'VAE' encoder: pseudo-inverse of its 4x3 projection (a frozen 1x1 conv
    to RGB), nearest 8x upsampling, [-1, 1] -> [0, 1]. decode(encode(img)) is img 8x8-average-pooled.
    Differentiable in the latents, unclamped, no random init (does not touch the global RNG)."""

    def __init__(self, vae_proj: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(torch.linalg.pinv(vae_proj), requires_grad=False)  # (3, 4)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("co,bohw->bchw", self.weight, latents.float())
        return (F.interpolate(rgb, scale_factor=8, mode="nearest") + 1) / 2


# The denoiser's init draws from torch's global generator, which all threads share: seeding it and drawing the
# weights must happen as one step, or two models built at once get each other's numbers.
GLOBAL_RNG = threading.Lock()


class TinyDiffusion:
    """DiffusionModel over TinyDenoiser: SD's schedule, a fixed random 'VAE' (8x pooling + 1x1 conv)
    and a fixed random 'text encoder' (hashing words to embeddings)."""

    name = "tiny"

    def __init__(self, prediction_type: str = "eps", seed: int = 0, ctx_dim: int = 16):
        with GLOBAL_RNG:  # a job's worker thread builds one while the test thread builds another
            torch.manual_seed(seed)
            self.denoiser = TinyDenoiser(ctx_dim=ctx_dim)
        self.prediction_type = prediction_type
        # flow: sigma in (0, 1], the network sees x_t unscaled (ComfyUI's CONST); else SD's k-diffusion schedule
        self.sigmas = torch.arange(1, 1001, dtype=torch.float32) / 1000 if prediction_type == FLOW else sd_sigmas()
        self.device = torch.device("cpu")
        self.ctx_dim = ctx_dim
        g = torch.Generator().manual_seed(seed + 1)
        self.vae_proj = torch.randn(4, 3, generator=g)
        self.vocab = torch.randn(1000, ctx_dim, generator=g)
        self._decoder = TinyDecoder(self.vae_proj)

    def net_forward(self, x_noisy, sigma, cond):
        t = torch.log(sigma.float()) * 100.0  # any smooth sigma -> t map will do here
        scale = 1.0 if self.prediction_type == FLOW else c_in(sigma, x_noisy)
        return self.denoiser(x_noisy * scale, t, cond["context"])

    def encode_images(self, images):
        x = images[..., :3].permute(0, 3, 1, 2) * 2 - 1
        x = F.avg_pool2d(x, 8)
        return torch.einsum("oc,bchw->bohw", self.vae_proj, x)

    def preview(self, latents):
        return ((latents[0, :3].movedim(0, -1) + 1) / 2).clamp(0, 1)

    def decoder(self, kind="vae"):
        """TinyDecoder for both kinds: the toy model has one 'VAE', so "taesd" gets the same decoder."""
        if kind not in ("vae", "taesd"):
            raise ValueError(f"unknown decoder kind {kind!r}; expected one of ('vae', 'taesd')")
        return self._decoder

    def encode_prompts(self, prompts, width, height):
        rows = []
        for p in prompts:
            ids = [zlib.crc32(w.encode()) % 1000 for w in p.split()] or [0]
            ids = (ids * 8)[:8]
            rows.append(self.vocab[torch.tensor(ids)])
        return {"context": torch.stack(rows)}


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)
