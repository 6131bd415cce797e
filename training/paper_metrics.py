"""The paper metrics that need their own networks: FID and ImageReward (DiffLoRA), CSD-s (DuoLoRA), DreamSim
(identity stylization), on image batches and on folders. No ComfyUI imports.

Each ``*_metrics`` function takes the model's feature / score function and images, and returns
``{name: MetricResult}`` like ``evaluate.clip_metrics``, so that the nodes, the CLI and the evaluation report
treat them like the other metrics. Images are ``(B, 3, H, W)`` tensors in [0, 1], or lists of ``(3, H, W)``
tensors of different sizes (folders), which are run one by one. The networks and their weight files:
``models.fid_inception``, ``models.csd``, ``models.dreamsim_metric``, ``models.image_reward``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..models.face_embed import read_rgb
from .evaluate import IMAGE_SUFFIXES, NOT_CONNECTED, list_images, split_prompts
from .metrics import MetricResult, csd_style, dreamsim_distance, fid, image_reward, metric_result

log = logging.getLogger(__name__)

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


def count(images: Images) -> int:
    return int(images.shape[0]) if isinstance(images, torch.Tensor) else len(images)


def run_batched(fn: Callable[[torch.Tensor], torch.Tensor], images: Images) -> torch.Tensor:
    """``fn`` on a batch, or on each image of a list (sizes may differ), rows concatenated."""
    if isinstance(images, torch.Tensor):
        return fn(images)
    if not len(images):
        raise ValueError("no images")
    return torch.cat([fn(x if x.ndim == 4 else x[None]) for x in images])


def read_folder(folder: str | Path) -> list[torch.Tensor]:
    """Every image of ``folder`` (sorted by name) as a (3, H, W) float tensor in [0, 1]."""
    files = list_images(Path(folder)) if Path(folder).is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder} is not a folder with images ({', '.join(IMAGE_SUFFIXES)})")
    return [torch.from_numpy(np.array(read_rgb(f))).permute(2, 0, 1).float() / 255.0 for f in files]


def csd_metrics(style_features: Callable[[torch.Tensor], torch.Tensor], images: Images, style: Images,
                model: str = "") -> dict[str, MetricResult]:
    """DuoLoRA's CSD-s: mean pairwise cosine of CSD style descriptors of generated and style images."""
    with torch.no_grad():
        res = csd_style(run_batched(style_features, images), run_batched(style_features, style))
    res.detail["model"] = model
    return {"CSD-s": res}


def dreamsim_metrics(embed: Callable[[torch.Tensor], torch.Tensor], images: Images, reference: Images,
                     paired: bool = False, model: str = "") -> dict[str, MetricResult]:
    """DreamSim distance of the generated images to the reference images (all pairs, or row i with row i)."""
    if paired and count(images) != count(reference):
        raise ValueError(f"paired DreamSim compares image i with reference i: {count(images)} images vs "
                         f"{count(reference)} references (or choose all pairs)")
    with torch.no_grad():
        res = dreamsim_distance(run_batched(embed, images), run_batched(embed, reference), paired=paired)
    res.detail.update(model=model, pairs="paired" if paired else "all")
    return {"DreamSim": res}


def image_reward_metrics(score: Callable[[torch.Tensor, Sequence[str]], torch.Tensor], images: Images,
                         prompt: str | Sequence[str], model: str = "") -> dict[str, MetricResult]:
    """ImageReward of each generated image with its prompt (one prompt for all, or one line per image)."""
    n = count(images)
    prompts = split_prompts(prompt, n) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} images: give one prompt, or one per image")
    if isinstance(images, torch.Tensor):
        rewards = score(images, prompts)
    else:
        rewards = torch.cat([score(x if x.ndim == 4 else x[None], [p]) for x, p in zip(images, prompts)])
    res = image_reward(rewards.tolist())
    res.detail["model"] = model
    return {"ImageReward": res}


def fid_metrics(features: Callable[[torch.Tensor], torch.Tensor], images: Images,
                reference: Optional[Images] = None, reference_stats: Optional[tuple[dict, int]] = None,
                model: str = "") -> dict[str, MetricResult]:
    """FID of the generated images against reference images or precomputed reference statistics
    (``models.fid_inception.load_statistics``: ({'mu', 'sigma'}, count)). Neither given: mean None."""
    if reference is None and reference_stats is None:
        return {"FID": metric_result("FID", [], note=NOT_CONNECTED + " (reference_images or reference_stats)")}
    if reference is not None and reference_stats is not None:
        raise ValueError("give reference images or reference statistics, not both")
    gen = run_batched(features, images)
    ref = run_batched(features, reference) if reference is not None else None
    return {"FID": fid_from_features(gen, ref, reference_stats, model)}


def fid_from_features(generated: torch.Tensor, reference: Optional[torch.Tensor] = None,
                      reference_stats: Optional[tuple[dict, int]] = None, model: str = "") -> MetricResult:
    """FID of ``(N, 2048)`` Inception features against reference features or statistics."""
    from ..models.fid_inception import fid_statistics, frechet_distance_to_features
    if reference is not None:
        stats, n_ref = fid_statistics(reference), reference.shape[0]
    elif reference_stats is not None:
        stats, n_ref = reference_stats
    else:
        raise ValueError("FID needs reference features or reference statistics")
    value = frechet_distance_to_features(generated, stats)
    n = generated.shape[0]
    if n < 2048 or (n_ref and n_ref < 2048):
        log.info("FID on %d vs %d images: below 2048 the covariance is rank-deficient and FID is biased high; "
                 "compare only values from equal set sizes", n, n_ref)
    return fid(value, n, n_ref, model=model, note="lower is better")
