"""FID's feature extractor: the TF-compatible Inception v3 of ``torch-fidelity``, from the user's weight file.

Why torch-fidelity (``torch-fidelity==0.4.0`` on PyPI, pure Python, needs only torch/torchvision/numpy/Pillow):
its ``FeatureExtractorInceptionV3`` is the Inception v3 port of the original TensorFlow FID graph (2015-12-05
weights, TF1-style bilinear resize to 299 px, 2048-d pool features), the network that ``torchmetrics``' FID also
runs, and it takes a local weight path (``feature_extractor_weights_path``), so nothing is downloaded. Without a
path it would fetch the file from GitHub; IDLoRA always passes one and fails first, with ``ModelFilesMissing``,
when the file is not there. ``clean-fid`` and ``pytorch-fid`` fetch their Inception by URL with no local-path
argument, and ``torchmetrics`` adds a dependency only to call torch-fidelity's class.

The statistics (mean and covariance of the 2048-d features) and the Frechet distance are torch-fidelity's own
``fid_features_to_statistics`` / ``fid_statistics_to_metric``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .face_embed import read_state_dict
from .metric_files import find_model_file

log = logging.getLogger(__name__)

FID_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's published file name
FID_SOURCE = ("the TF-FID Inception v3 weights in torch-fidelity's format (its release file "
              f"{FID_WEIGHTS}, also cached by torch-fidelity / torchmetrics in ~/.cache/torch/hub/checkpoints/)")
FEATURE = "2048"


def _import_fidelity():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    except ImportError as exc:
        raise ImportError("FID needs the 'torch-fidelity' package: pip install torch-fidelity==0.4.0") from exc
    return FeatureExtractorInceptionV3, fid_features_to_statistics, fid_statistics_to_metric


class InceptionFeatures:
    """``(B, 3, H, W)`` images in [0, 1] -> ``(B, 2048)`` Inception pool features (float64 on the CPU).

    Images are rounded to 8 bits first, as when they are saved as PNG and read back (torch-fidelity's input is
    uint8); any size goes in, the network resizes to 299 px itself.
    """

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu", batch_size: int = 16):
        cls, _, _ = _import_fidelity()
        self.path, self.device, self.batch_size = Path(weights), torch.device(device), int(batch_size)
        # torch-fidelity reads the file with weights_only=False; read it safely first, so that a file with code
        # in it (or no state dict at all) stops here with the file's name
        read_state_dict(self.path, hint=f"expected {FID_SOURCE}")
        try:
            self.model = cls("inception-v3-compat", [FEATURE], feature_extractor_weights_path=str(self.path))
        except (RuntimeError, KeyError) as exc:  # wrong keys or shapes
            raise ValueError(f"{self.path} is not torch-fidelity's Inception v3 ({FID_WEIGHTS}): {exc}") from exc
        self.model.to(self.device)
        self.name = f"inception-v3-compat ({self.path.name})"

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images in [0, 1], got {tuple(images01.shape)}")
        out = []
        for chunk in images01.split(self.batch_size):
            x = (chunk.float().clamp(0, 1) * 255).round().to(torch.uint8).to(self.device)
            out.append(self.model(x)[0].double().cpu())
        return torch.cat(out)


def load_inception(dirs: Sequence[str | Path], weights: str = FID_WEIGHTS,
                   device: str | torch.device = "cpu") -> InceptionFeatures:
    """The Inception of ``weights`` (a name in one of ``dirs``, ComfyUI's models/fid, or a path)."""
    return InceptionFeatures(find_model_file("FID", weights, dirs, FID_SOURCE), device)


def fid_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """{'mu': (D,), 'sigma': (D, D)} of ``(N, D)`` features (N >= 2), float64."""
    _, to_stats, _ = _import_fidelity()
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set (got {features.shape[0]}); it is only meaningful "
                         f"with thousands (the covariance has rank N - 1)")
    return to_stats(features.detach().double().cpu())


def frechet_distance(stats_a: dict, stats_b: dict) -> float:
    """The Frechet distance between two Gaussians {'mu', 'sigma'} (torch-fidelity's formula: the trace of
    sqrt(sigma_a sigma_b) from the eigenvalues of the D x D product; about 5 s at D = 2048 on 2 CPU cores)."""
    _, _, to_metric = _import_fidelity()
    a = {k: np.asarray(stats_a[k], np.float64) for k in ("mu", "sigma")}
    b = {k: np.asarray(stats_b[k], np.float64) for k in ("mu", "sigma")}
    if a["mu"].shape != b["mu"].shape:
        raise ValueError(f"FID statistics of different widths: {a['mu'].shape} vs {b['mu'].shape}")
    return float(next(iter(to_metric(a, b, False).values())))


def frechet_distance_to_features(features: torch.Tensor, stats: dict) -> float:
    """The same Frechet distance between the Gaussian of ``(N, D)`` features and ``stats``, exact and fast when
    N < D. With X the centred features, sigma_x = X^T X / (N - 1), and the nonzero eigenvalues of
    sigma_x sigma are those of the N x N symmetric matrix X sigma X^T / (N - 1); so the trace of
    sqrt(sigma_x sigma) comes from an N x N eigvalsh instead of a D x D general eigenvalue problem. For N >= D
    it is ``frechet_distance`` of the two statistics."""
    x = features.detach().double().cpu().numpy()
    n, d = x.shape
    if n < 2:
        raise ValueError(f"FID needs at least 2 images per set (got {n})")
    if n >= d:
        return frechet_distance(fid_statistics(features), stats)
    mu, sigma = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
    if mu.shape != (d,):
        raise ValueError(f"FID statistics of different widths: {mu.shape} vs ({d},)")
    xc = x - x.mean(axis=0)
    inner = xc @ sigma @ xc.T / (n - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = x.mean(axis=0) - mu
    return float(diff @ diff + (xc * xc).sum() / (n - 1) + np.trace(sigma) - 2 * tr_covmean)


def save_statistics(path: str | Path, stats: dict, count: int) -> Path:
    """Write {'mu', 'sigma'} as .npz (the layout pytorch-fid and torch-fidelity use), with the image count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, mu=stats["mu"], sigma=stats["sigma"], count=np.int64(count))  # covariances hardly compress
    return path


def load_statistics(path: str | Path) -> tuple[dict[str, np.ndarray], int]:
    """({'mu', 'sigma'}, image count or 0) from an .npz written by ``save_statistics`` or pytorch-fid."""
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} is not an FID statistics file: it needs arrays 'mu' and 'sigma' "
                             f"(has {sorted(data.files)})")
        return {"mu": data["mu"], "sigma": data["sigma"]}, int(data["count"]) if "count" in data else 0
