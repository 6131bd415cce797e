"""The diffusion-model interface the trainers see, and the noise-schedule algebra.

Trainers never talk to ComfyUI. They get a ``DiffusionModel``: the denoiser module
to put LoRA layers on, its discrete sigma schedule, its prediction type, a raw
forward pass, and image/prompt encoders. ``nodes/comfy_adapter.py`` implements it
for a ComfyUI MODEL/CLIP/VAE; the tests implement it with a tiny torch model.

Noise convention (k-diffusion, as ComfyUI uses for SD1.x/SDXL):
    x_t = x0 + sigma * eps
and the network sees c_in * x_t with c_in = 1 / sqrt(sigma^2 + 1) (the VP
scaling), so that alpha_t = c_in and sigma_vp = sigma * c_in.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

PREDICTION_TYPES = ("eps", "v", "x0")

Cond = dict[str, torch.Tensor]  # keyword tensors for the denoiser (context, y, ...), batch first


@runtime_checkable
class DiffusionModel(Protocol):
    denoiser: nn.Module          # the module LoRA layers go into
    prediction_type: str         # one of PREDICTION_TYPES
    sigmas: torch.Tensor         # the model's discrete schedule, ascending, float32 on CPU
    device: torch.device
    name: str                    # base model family, recorded in LoRA metadata (e.g. "sd15", "sdxl")
    lora_stems: dict[str, str]   # module path -> LoRA file key stem kohya writes for this base model (optional,
    #                              see lora_stems(); SD1.x/SD2.x: diffusers-layout names; {}: the paths' SGM stems)

    def net_forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's raw output (eps, v or x0) for x_t = x0 + sigma * eps."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE batch (B, H, W, C) in [0, 1] -> latents in the denoiser's space."""

    def encode_prompts(self, prompts: list[str], width: int, height: int) -> Cond:
        """One conditioning row per prompt, for images of the given pixel size."""

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        """A quick (H, W, 3) image in [0, 1] of the first latent, for progress samples."""

    def decoder(self, kind: str = "vae") -> nn.Module:
        """A frozen latent -> RGB decoder that passes gradients to its input (for losses on pixels).

        The returned callable maps latents in the denoiser's space (B, C, h, w) on ``device`` to RGB
        (B, 3, 8h, 8w), float32, in about [0, 1]; it does not clamp, so that every pixel passes gradients
        back. None of its parameters requires grad. ``kind``: "vae" (the full VAE decoder) or "taesd" (the
        much cheaper Tiny AutoEncoder); anything else raises ValueError. Repeated calls return the same
        decoder.
        """


def lora_stems(model) -> dict[str, str]:
    """The model's ``lora_stems`` (module path -> file key stem), or {} for a model without them (plain torch
    models: their LoRAs are saved under their module paths)."""
    return getattr(model, "lora_stems", None) or {}


def lora_key_map(model) -> dict[str, str]:
    """File key stem -> module path (the inverse of ``lora_stems``), as ``lora_format.resolve``'s extra_key_map,
    so that LoRA files with this base model's kohya stems resolve onto the model."""
    return {stem: path for path, stem in lora_stems(model).items()}


def sd_sigmas(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule as k-diffusion sigmas (ascending)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


def _bcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.dtype).reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x0 + _bcast(sigma, x0) * noise


def c_in(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return 1.0 / (_bcast(sigma, like) ** 2 + 1.0) ** 0.5


def target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the network should output for this (x0, noise, sigma)."""
    if prediction_type == "eps":
        return noise
    if prediction_type == "x0":
        return x0
    if prediction_type == "v":
        a = c_in(sigma, x0)
        s = _bcast(sigma, x0) * a
        return a * noise - s * x0
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def to_x0(prediction_type: str, output: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The x0 estimate implied by a raw network output."""
    s = _bcast(sigma, x_noisy)
    if prediction_type == "eps":
        return x_noisy - s * output
    if prediction_type == "x0":
        return output
    if prediction_type == "v":
        return x_noisy / (s ** 2 + 1) - output * s / (s ** 2 + 1) ** 0.5
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def to_eps(prediction_type: str, output: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise estimate implied by a raw network output."""
    if prediction_type == "eps":
        return output
    x0 = to_x0(prediction_type, output, x_noisy, sigma)
    return (x_noisy - x0) / _bcast(sigma, x_noisy)
