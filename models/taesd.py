"""The TAESD decoder (madebyollin's Tiny AutoEncoder for Stable Diffusion) in plain PyTorch.

An identity loss has to turn a predicted latent into pixels with gradients. The full SD VAE decoder does
that at a cost of ~50 M parameters and large activations; TAESD's decoder does it with ~1.2 M. This module
rebuilds the decoder network so that its ``state_dict`` has exactly the keys and shapes of the published
``taesd_decoder.*`` (SD1.x/SD2.x), ``taesdxl_decoder.*`` (SDXL), ``taef1_decoder.*`` (Flux.1) and
``taesd3_decoder.*`` (SD3) files, which are also the keys ComfyUI's own TAESD decoder uses; those files load into
it unchanged (the last two take 16 latent channels).

Network (an ``nn.Sequential``; the state-dict keys are the indices)::

    0      soft clamp: 3 * tanh(x / 3)                  no weights
    1      conv3x3(C -> 64) + bias, 2 ReLU
    3-5    3 x Block(64)
    6      nearest 2x upsample, 7 conv3x3(64 -> 64) without bias
    8-10   3 x Block(64), 11 upsample, 12 conv3x3 without bias
    13-15  3 x Block(64), 16 upsample, 17 conv3x3 without bias
    18     Block(64)
    19     conv3x3(64 -> 3) + bias                      RGB in about [0, 1]

    Block: relu(conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv3x3  +  x)   (keys conv.0, conv.2, conv.4)

Input: latents in the U-Net's space (the VAE encoder's output times the latent scale factor, e.g. 0.18215
for SD1.x, 0.13025 for SDXL). Output: the network's raw RGB, which is trained to lie in [0, 1]; it is NOT
clamped, so that the gradient reaches every pixel (clamp for display only).

No ComfyUI import here: ``models/`` is plain torch.
"""
from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from .face_embed import read_state_dict

log = logging.getLogger(__name__)

TAESD_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin")  # in order of preference

_SD15_FILES = ("taesd_decoder",)
_SDXL_FILES = ("taesdxl_decoder",)

_FLUX_FILES = ("taef1_decoder",)   # 16 latent channels
_SD3_FILES = ("taesd3_decoder",)   # 16 latent channels

# model family (nodes.comfy_adapter.model_family: ComfyUI's model config class, lower case) -> accepted file stems
# (ComfyUI's latent formats name the same files: taesd_decoder_name). Every family listed shares the SD1.x, the SDXL,
# the Flux.1 or the SD3 VAE latent space.
TAESD_FILES: dict[str, tuple[str, ...]] = {
    "sd15": _SD15_FILES, "sd20": _SD15_FILES, "sd21unclipl": _SD15_FILES, "sd21uncliph": _SD15_FILES,
    "sd15_instructpix2pix": _SD15_FILES,
    "sdxl": _SDXL_FILES, "sdxlrefiner": _SDXL_FILES, "ssd1b": _SDXL_FILES, "segmind_vega": _SDXL_FILES,
    "koala_700m": _SDXL_FILES, "koala_1b": _SDXL_FILES, "sdxl_instructpix2pix": _SDXL_FILES,
    "flux": _FLUX_FILES, "fluxschnell": _FLUX_FILES, "fluxinpaint": _FLUX_FILES,
    "sd3": _SD3_FILES,
}

TAESD_HINT = ("put taesd_decoder.safetensors (SD1.x) / taesdxl_decoder.safetensors (SDXL) / taef1_decoder.safetensors "
              "(Flux.1) / taesd3_decoder.safetensors (SD3), from madebyollin's TAESD releases, into "
              "ComfyUI/models/vae_approx")

_WIDTH = 64


class _SoftClamp(nn.Module):
    """3 * tanh(x / 3): keeps outlying latents in about [-3, 3] without cutting their gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _conv3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=3, padding=1, bias=bias)


class _Block(nn.Module):
    """Three 3x3 convolutions with ReLUs between them, a residual connection and a final ReLU."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3(width, width), nn.ReLU(), _conv3(width, width), nn.ReLU(),
                                  _conv3(width, width))
        self.skip = nn.Identity()  # the decoder's blocks keep their width, so the skip has no weights
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def _stage(n_blocks: int) -> list[nn.Module]:
    return [_Block(_WIDTH) for _ in range(n_blocks)]


def _upsample() -> list[nn.Module]:
    return [nn.Upsample(scale_factor=2, mode="nearest"), _conv3(_WIDTH, _WIDTH, bias=False)]


class TaesdDecoder(nn.Sequential):
    """TAESD decoder: model-space latents (B, C, h, w) -> RGB (B, 3, 8h, 8w) in about [0, 1], unclamped.

    ``latent_channels`` is 4 for the SD1.x / SDXL files (16 for TAESD3 / TAEF1).
    """

    def __init__(self, latent_channels: int = 4):
        layers = [_SoftClamp(), _conv3(latent_channels, _WIDTH), nn.ReLU(), *_stage(3), *_upsample(), *_stage(3),
                  *_upsample(), *_stage(3), *_upsample(), *_stage(1), _conv3(_WIDTH, 3)]
        super().__init__(*layers)
        self.latent_channels = latent_channels

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"TAESD decoder expects latents of shape (B, {self.latent_channels}, h, w), "
                             f"got {tuple(latents.shape)}")
        return super().forward(latents)


def expected_shapes(latent_channels: int = 4) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a TAESD decoder state dict (what a decoder file must contain)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in TaesdDecoder(latent_channels).state_dict().items()}


def load_taesd_decoder(path: str | PathLike) -> TaesdDecoder:
    """A TaesdDecoder with the weights of a taesd decoder file (.safetensors, .pth, .pt or .bin), on the CPU,
    in eval mode, with every parameter frozen (requires_grad False).

    Raises FileNotFoundError when the file does not exist and ValueError when its keys or shapes are not
    those of a TAESD decoder (naming the file and the first key that differs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TAESD decoder file {path} does not exist: {TAESD_HINT}")
    sd = read_state_dict(path, TAESD_HINT)
    first = sd.get("1.weight")
    channels = int(first.shape[1]) if isinstance(first, torch.Tensor) and first.ndim == 4 else 4
    _check_state_dict(sd, expected_shapes(channels), path)
    model = TaesdDecoder(channels)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    model.eval().requires_grad_(False)
    log.info("IDLoRA: loaded TAESD decoder %s (%d latent channels)", path, channels)
    return model


def _check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path) -> None:
    for key, shape in expected.items():
        if key not in sd:
            raise ValueError(f"{path} is not a TAESD decoder: key {key!r} (shape {shape}) is missing. "
                             f"Note that taesd_encoder files do not fit: {TAESD_HINT}")
        if tuple(sd[key].shape) != shape:
            raise ValueError(f"{path} is not a TAESD decoder: key {key!r} has shape {tuple(sd[key].shape)}, "
                             f"expected {shape}: {TAESD_HINT}")
    extra = [k for k in sd if k not in expected]
    if extra:
        raise ValueError(f"{path} is not a TAESD decoder: unexpected key {extra[0]!r} (shape "
                         f"{tuple(sd[extra[0]].shape)}; {len(extra)} unexpected in all): {TAESD_HINT}")
