"""DreamSim (Fu et al. 2023), the perceptual distance the identity-stylization paper (000) reports.

Built with the project's own PyPI package, ``dreamsim==0.2.1`` (pure Python; needs open_clip, timm, peft, which
the pack has): its ``dreamsim()`` builds the ViT backbones, adds the LoRA adapter with peft and loads the
released weights from ``cache_dir``. It downloads the release zip only when a file is missing, so IDLoRA checks
every file first and raises ``ModelFilesMissing`` instead. One more online step: for the DINO backbone (the
``ensemble`` and ``dino_vitb16`` types) the package calls ``torch.hub.load('facebookresearch/dino:main', ...)``,
which clones DINO's code from GitHub. IDLoRA answers that one call locally, building the same ViT-B/16 (the
DINO ``vision_transformer`` that ships inside the dreamsim package) from DINO's released backbone file
``dino_vitbase16_pretrain.pth`` (where torch.hub caches it: the folder itself or its ``checkpoints/``).

The files, unzipped from DreamSim's release into ``models/dreamsim/`` (``DREAMSIM_FILES``):
    ensemble (the default, the paper's DreamSim): dino_vitb16_pretrain.pth, clip_vitb16_pretrain.pth.tar,
        open_clip_vitb16_pretrain.pth.tar, ensemble_lora/ (+ DINO's dino_vitbase16_pretrain.pth)
    dino_vitb16: dino_vitb16_pretrain.pth, dino_vitb16_single_lora/ (+ dino_vitbase16_pretrain.pth)
    open_clip_vitb32: open_clip_vitb32_pretrain.pth.tar, open_clip_vitb32_single_lora/
    clip_vitb32: clip_vitb32_pretrain.pth.tar, clip_vitb32_single_lora/
(dinov2 and synclr types fetch their backbones from GitHub too and are not offered.)

The distance is DreamSim's: ``1 - cos(embed(a), embed(b))`` of 224 px images (bicubic resize), 0 for identical
images, larger for less similar ones.
"""
from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Sequence
from unittest import mock

import torch
import torch.nn.functional as F

from .metric_files import ModelFilesMissing, missing_files, missing_message

log = logging.getLogger(__name__)

DINO_BACKBONE = "dino_vitbase16_pretrain.pth"  # DINO's released ViT-B/16 weights (what torch.hub fetches)
DREAMSIM_FILES = {
    "ensemble": ["dino_vitb16_pretrain.pth", "clip_vitb16_pretrain.pth.tar", "open_clip_vitb16_pretrain.pth.tar",
                 "ensemble_lora"],
    "dino_vitb16": ["dino_vitb16_pretrain.pth", "dino_vitb16_single_lora"],
    "open_clip_vitb32": ["open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora"],
    "clip_vitb32": ["clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora"],
}
DREAMSIM_TYPES = tuple(DREAMSIM_FILES)
DREAMSIM_SOURCE = ("DreamSim's released checkpoint zip for that type (github.com/ssundaram21/dreamsim releases, "
                   "e.g. dreamsim_ensemble_checkpoint.zip), unzipped")
IMAGE_SIZE = 224
_BUILD_LOCK = threading.Lock()


def _dino_file(folder: Path) -> Path | None:
    return next((p for p in (folder / DINO_BACKBONE, folder / "checkpoints" / DINO_BACKBONE) if p.is_file()), None)


def required_files(folder: str | Path, kind: str) -> list[str]:
    """The files of ``kind`` that ``folder`` lacks (DINO's backbone included where the type needs it)."""
    if kind not in DREAMSIM_FILES:
        raise ValueError(f"DreamSim type {kind!r} is not offered here; choose one of {DREAMSIM_TYPES}")
    lacking = [n + "/" if n.endswith("_lora") else n for n in missing_files(folder, DREAMSIM_FILES[kind])]
    if "dino" in kind or kind == "ensemble":
        lacking += [] if _dino_file(Path(folder)) else [DINO_BACKBONE]
    return lacking


def find_dreamsim_folder(dirs: Sequence[str | Path], kind: str) -> Path:
    """The first of ``dirs`` that holds every file of ``kind``; else ModelFilesMissing naming what is missing."""
    best = None
    for d in dirs:
        lacking = required_files(d, kind)
        if not lacking:
            return Path(d)
        best = lacking if best is None or len(lacking) < len(best) else best
    source = DREAMSIM_SOURCE + (f"; {DINO_BACKBONE} is DINO's ViT-B/16 release (dl.fbaipublicfiles.com/dino)"
                                if DINO_BACKBONE in (best or []) else "")
    raise ModelFilesMissing(missing_message("DreamSim", best or DREAMSIM_FILES[kind], dirs, source))


def _local_hub_load(folder: Path):
    """A stand-in for torch.hub.load that builds DINO's ViT-B/16 from the local backbone file, and refuses the
    rest (anything else would go to GitHub)."""
    def load(repo_or_dir, model, *args, **kwargs):
        if not str(repo_or_dir).startswith("facebookresearch/dino:") or model != "dino_vitb16":
            raise ModelFilesMissing(f"DreamSim asked torch.hub for {repo_or_dir} {model}, which would download "
                                    f"from GitHub; only the dino_vitb16 backbone is built locally")
        from dreamsim.feature_extraction.vision_transformer import vit_base
        vit = vit_base(patch_size=16, num_classes=0)
        sd = torch.load(_dino_file(folder), map_location="cpu", weights_only=True)
        vit.load_state_dict(sd, strict=True)
        return vit
    return load


def load_dreamsim(folder: str | Path, kind: str = "ensemble", device: str | torch.device = "cpu"):
    """DreamSim's model (a peft-wrapped PerceptualModel, eval, no grad) with the weights in ``folder``."""
    folder = Path(folder)
    lacking = required_files(folder, kind)
    if lacking:
        raise ModelFilesMissing(missing_message("DreamSim", lacking, [folder], DREAMSIM_SOURCE))
    try:
        from dreamsim import dreamsim as build
    except ImportError as exc:
        raise ImportError("DreamSim needs the 'dreamsim' package: pip install dreamsim==0.2.1") from exc
    hub_dir = torch.hub.get_dir()
    with _BUILD_LOCK, mock.patch.object(torch.hub, "load", _local_hub_load(folder)), warnings.catch_warnings():
        # the package wraps its model in peft twice (get_peft_model, then PeftModel.from_pretrained with the
        # released adapter, which is the one that runs); peft warns about the second wrapper
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments")  # older releases' adapter_config
        warnings.filterwarnings("ignore", message=".*weight_norm` is deprecated")  # the package's DINO head
        try:
            model, _ = build(pretrained=True, device=str(device), cache_dir=str(folder), dreamsim_type=kind,
                             normalize_embeds=True)
        finally:
            torch.hub.set_dir(hub_dir)  # the package points torch.hub at its cache folder for good
    log.info("DreamSim %s loaded from %s", kind, folder)
    return model


class DreamSimScorer:
    """``(B, 3, H, W)`` in [0, 1] -> DreamSim embeddings; ``distance`` = 1 - cosine, as DreamSim defines it."""

    def __init__(self, dirs: Sequence[str | Path], kind: str = "ensemble", device: str | torch.device = "cpu"):
        self.folder = find_dreamsim_folder(dirs, kind)
        self.kind, self.device = kind, torch.device(device)
        self.model = load_dreamsim(self.folder, kind, self.device)
        self.name = f"DreamSim {kind} ({self.folder.name}/)"

    @torch.no_grad()
    def embed(self, images01: torch.Tensor) -> torch.Tensor:
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images in [0, 1], got {tuple(images01.shape)}")
        x = images01.float().to(self.device)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):  # DreamSim's own preprocessing: a square bicubic resize
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        return torch.cat([self.model.embed(chunk) for chunk in x.split(8)]).float()

    def distance(self, a01: torch.Tensor, b01: torch.Tensor) -> torch.Tensor:
        """Row i of a against row i of b: ``(B,)`` distances."""
        return 1 - F.cosine_similarity(self.embed(a01), self.embed(b01), dim=-1)

