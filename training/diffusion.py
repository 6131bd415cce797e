"""The diffusion-model interface the trainers see, and the noise-schedule algebra.

Trainers never talk to ComfyUI. They get a ``DiffusionModel``: the denoiser module
to put LoRA layers on, its discrete sigma schedule, its prediction type, a raw
forward pass, and image/prompt encoders. ``nodes/comfy_adapter.py`` implements it
for a ComfyUI MODEL/CLIP/VAE; the tests implement it with a tiny torch model.

Two noise conventions, as ComfyUI's ``model_sampling`` has them:

* k-diffusion (eps- and v-prediction U-Nets: SD1.x, SD2.x, SDXL):
    x_t = x0 + sigma * eps, sigma in (0, ~15)
  and the network sees c_in * x_t with c_in = 1 / sqrt(sigma^2 + 1) (the VP
  scaling), so that alpha_t = c_in and sigma_vp = sigma * c_in.
* flow matching ("flow": ComfyUI's CONST, the DiTs Flux and SD3.x):
    x_t = (1 - sigma) * x0 + sigma * eps, sigma in [0, 1]
  the network sees x_t as it is and predicts the velocity eps - x0, so that
  x0 = x_t - sigma * output.

Every place that makes x_t from (x0, eps, sigma) or turns a network output into x0 or eps goes through
``add_noise`` / ``target`` / ``to_x0`` / ``to_eps`` here, so that no method keeps a formula of one convention.
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn

PREDICTION_TYPES = ("eps", "v", "x0", "flow")
FLOW = "flow"

Cond = dict[str, torch.Tensor]  # keyword tensors for the denoiser (context, y, ...), batch first


@runtime_checkable
class DiffusionModel(Protocol):
    denoiser: nn.Module          # the module LoRA layers go into
    prediction_type: str         # one of PREDICTION_TYPES ("flow": flow matching, see the module docstring)
    sigmas: torch.Tensor         # the model's discrete schedule, ascending, float32 on CPU
    device: torch.device
    name: str                    # base model family, recorded in LoRA metadata (e.g. "sd15", "sdxl")
    lora_stems: dict[str, str]   # module path -> LoRA file key stem kohya writes for this base model (optional,
    #                              see lora_stems(); SD1.x/SD2.x: diffusers-layout names; {}: the paths' SGM stems)

    # optional: guidance_embed (bool, the model takes a "guidance" cond: Flux-dev), see has_guidance();
    #           inplace_blocks (bool, its blocks add to their inputs in place: see lora_trainer.saved_copies)

    def net_forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's raw output (eps, v, x0 or velocity) for x_t = add_noise(prediction_type, x0, eps, sigma).
        ``cond`` may hold "guidance" (B,) for a model with a guidance embedding."""

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


def has_guidance(model) -> bool:
    """Whether the model has a guidance embedding (Flux-dev) and so takes a "guidance" value in its cond."""
    return bool(getattr(model, "guidance_embed", False))


def _bcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.dtype).reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


def _unknown(prediction_type: str) -> ValueError:
    return ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def add_noise(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t for (x0, noise, sigma) in the model's convention (ComfyUI's ``noise_scaling``)."""
    s = _bcast(sigma, x0)
    if prediction_type == FLOW:
        return (1 - s) * x0 + s * noise
    if prediction_type in PREDICTION_TYPES:
        return x0 + s * noise
    raise _unknown(prediction_type)


def c_in(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return 1.0 / (_bcast(sigma, like) ** 2 + 1.0) ** 0.5


def target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the network should output for this (x0, noise, sigma)."""
    if prediction_type == "eps":
        return noise
    if prediction_type == "x0":
        return x0
    if prediction_type == FLOW:
        return noise - x0
    if prediction_type == "v":
        a = c_in(sigma, x0)
        s = _bcast(sigma, x0) * a
        return a * noise - s * x0
    raise _unknown(prediction_type)


def to_x0(prediction_type: str, output: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The x0 estimate implied by a raw network output (ComfyUI's ``calculate_denoised``)."""
    s = _bcast(sigma, x_noisy)
    if prediction_type in ("eps", FLOW):  # the same algebra: x_t - sigma * output
        return x_noisy - s * output
    if prediction_type == "x0":
        return output
    if prediction_type == "v":
        return x_noisy / (s ** 2 + 1) - output * s / (s ** 2 + 1) ** 0.5
    raise _unknown(prediction_type)


def to_eps(prediction_type: str, output: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise estimate implied by a raw network output."""
    if prediction_type == "eps":
        return output
    if prediction_type == FLOW:  # eps = x0 + output, x0 = x_t - sigma * output
        return x_noisy + (1 - _bcast(sigma, x_noisy)) * output
    x0 = to_x0(prediction_type, output, x_noisy, sigma)
    return (x_noisy - x0) / _bcast(sigma, x_noisy)


# -- timestep sampling --------------------------------------------------------------------------------------------

TIMESTEP_SAMPLINGS = ("auto", "uniform", "logit_normal", "shift")
TIMESTEP_SAMPLING_DOCS = {
    "auto": "uniform on eps/v U-Nets; shift on Flux; logit_normal on the other flow models (SD3.x)",
    "uniform": "uniform over the model's own schedule (its discrete sigmas; on Flux and SD3 already shifted by the "
               "model's fixed shift)",
    "logit_normal": "sigma = sigmoid(N(0, 1)), the SD3 paper's choice (flow models only)",
    "shift": "sigma = sigmoid(N(0, 1)) moved by Flux's resolution-dependent shift (mu from 0.5 at 256 latent tokens "
             "to 1.15 at 4096, as ComfyUI's ModelSamplingFlux and kohya's flux_shift; flow models only)",
}
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15
DIT_PATCH = 2  # Flux and SD3 cut latents into 2x2 patches: a latent of h x w is (h / 2) * (w / 2) tokens


def default_timestep_sampling(model) -> str:
    """What "auto" means for this model (see TIMESTEP_SAMPLING_DOCS)."""
    if model.prediction_type != FLOW:
        return "uniform"
    return "shift" if str(model.name).startswith("flux") else "logit_normal"


def flux_mu(latent_h: int, latent_w: int) -> float:
    """Flux's resolution-dependent shift mu for a latent of this size (linear in the token count, 0.5 at 256 tokens,
    1.15 at 4096: a 1024 px image), as ComfyUI's ModelSamplingFlux node computes it."""
    tokens = (latent_h // DIT_PATCH) * (latent_w // DIT_PATCH)
    slope = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (4096 - 256)
    return FLUX_BASE_SHIFT + slope * (tokens - 256)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """BFL's time shift: exp(mu) / (exp(mu) + 1 / t - 1) (ComfyUI's flux_time_shift with sigma 1)."""
    e = math.exp(mu)
    return e / (e + 1 / t - 1)


def sample_sigmas(model, kind: str, n: int, generator: torch.Generator, latent_hw: tuple[int, int],
                  t_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """``n`` training sigmas (CPU, float32) drawn with ``generator``.

    "uniform" picks indices of ``model.sigmas`` uniformly within the ``t_range`` fraction of the schedule. The flow
    samplers draw sigma itself and rescale it into ``t_range``. ``kind`` "auto" is ``default_timestep_sampling``.
    Raises ValueError for a flow sampler on a model that is not a flow model."""
    kind = default_timestep_sampling(model) if kind == "auto" else kind
    lo, hi = t_range
    if kind == "uniform":
        m = len(model.sigmas)
        first = int(lo * (m - 1))
        idx = torch.randint(first, max(first + 1, int(round(hi * m))), (n,), generator=generator)
        return model.sigmas[idx]
    if kind not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep_sampling = {kind!r} is unknown: use one of {TIMESTEP_SAMPLINGS}")
    if model.prediction_type != FLOW:
        raise ValueError(f"timestep_sampling = {kind!r} is for flow-matching models (Flux, SD3); this model "
                         f"({model.name}) predicts {model.prediction_type}: use uniform or auto")
    u = torch.sigmoid(torch.randn(n, generator=generator))
    if kind == "shift":
        u = time_shift(flux_mu(*latent_hw), u)
    return (lo + (hi - lo) * u).float()
