"""Differentiable ArcFace face alignment: a similarity warp from 5 landmarks, applied with ``grid_sample``.

The warp is estimated exactly as insightface's ``norm_crop`` does: a least-squares similarity (Umeyama) that
maps the detected landmarks onto the ArcFace template, then an inverse warp of the image. The landmarks are
detached: the matrix is a constant of the graph, so gradients reach the image pixels (the decoded x0 of an
identity loss) and never the landmarks.

Pixel coordinates follow OpenCV: the centre of pixel (row i, column j) is at (x=j, y=i). ``crop_faces``
reproduces ``cv2.warpAffine(image, forward_matrix, (size, size))`` (bilinear, zero border) up to OpenCV's
1/32-pixel fixed-point interpolation. Like OpenCV it does not low-pass before shrinking, so feed images whose
faces are not far larger than the crop (or blur them first).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .face_detect import ARCFACE_TEMPLATE_112 as _TEMPLATE_NP
from .face_detect import estimate_similarity

# The standard 5-point ArcFace template for 112x112 crops (x, y): eyes, nose tip, mouth corners.
ARCFACE_TEMPLATE_112 = torch.from_numpy(_TEMPLATE_NP.copy())


def scaled_template(template: torch.Tensor, out_size: int) -> torch.Tensor:
    """The 112-pixel template moved to an ``out_size`` crop, by insightface's ``norm_crop`` rule.

    Multiples of 112 scale it; other sizes scale by size/128 and shift x by 8 * size/128.
    """
    if out_size % 112 == 0:
        return template * (out_size / 112.0)
    ratio = out_size / 128.0
    shift = torch.tensor([8.0 * ratio, 0.0], dtype=template.dtype, device=template.device)
    return template * ratio + shift


def _check_landmarks(landmarks: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) or (N, 2) landmarks -> (B, N, 2), with a message that shows a wrong shape."""
    if landmarks.ndim == 2:
        landmarks = landmarks.unsqueeze(0)
    if landmarks.ndim != 3 or landmarks.shape[-1] != 2 or landmarks.shape[1] < 2:
        raise ValueError(f"landmarks must have shape (B, 5, 2) in pixels, got {tuple(landmarks.shape)}")
    return landmarks


def umeyama_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation) taking ``src`` points onto ``dst``.

    src: (B, N, 2), dst: (N, 2) or (B, N, 2). Returns (B, 2, 3) float64 CPU with
    ``dst ~ M[:, :, :2] @ src + M[:, :, 2]``. Each face is fitted by face_detect's ``estimate_similarity``
    (Umeyama 1991, float64, no reflections). Not differentiable by design: call it on detached points.
    """
    src = src.detach().to("cpu", torch.float64)
    dst = dst.detach().to(src).expand_as(src)
    return torch.from_numpy(np.stack([estimate_similarity(s, d) for s, d in zip(src.numpy(), dst.numpy())]))


def invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of (B, 2, 3) affine maps."""
    lin_inv = torch.linalg.inv(matrix[:, :, :2])
    return torch.cat([lin_inv, -lin_inv @ matrix[:, :, 2:]], dim=2)


@torch.no_grad()
def forward_similarity(landmarks: torch.Tensor, template: torch.Tensor = ARCFACE_TEMPLATE_112,
                       out_size: int = 112) -> torch.Tensor:
    """(B, 2, 3) float64 CPU tensor mapping input pixels -> crop pixels (the matrix ``cv2.warpAffine`` takes).

    Solved on the CPU in float64 (5 points; MPS has no float64), from detached landmarks.
    """
    landmarks = _check_landmarks(landmarks).detach().to("cpu", torch.float64)
    return umeyama_similarity(landmarks, scaled_template(template.to("cpu", torch.float64), out_size))


@torch.no_grad()
def similarity_matrix(landmarks: torch.Tensor, template: torch.Tensor = ARCFACE_TEMPLATE_112,
                      out_size: int = 112) -> torch.Tensor:
    """(B, 2, 3) float64 CPU inverse warp: crop pixel coordinates -> input pixel coordinates.

    The least-squares fit goes from the detached landmarks to the template (as insightface fits it) and is
    then inverted, so crops equal insightface's even when the landmarks do not fit the template exactly.
    """
    return invert_affine(forward_similarity(landmarks, template, out_size))


def _pixel_to_normalized(size_hw: tuple[int, int], dtype, device) -> torch.Tensor:
    """3x3 map from pixel coordinates (x, y, 1) to grid_sample's [-1, 1] coordinates (align_corners=False)."""
    h, w = size_hw
    return torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0],
                         [0.0, 2.0 / h, 1.0 / h - 1.0],
                         [0.0, 0.0, 1.0]], dtype=dtype, device=device)


def _homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) -> (B, 3, 3) with the row [0, 0, 1]."""
    row = torch.zeros_like(matrix[:, :1, :])
    row[:, :, 2] = 1.0
    return torch.cat([matrix, row], dim=1)


def grid_theta(inverse: torch.Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """``affine_grid``'s theta (B, 2, 3) from a pixel-space inverse warp (crop pixels -> input pixels)."""
    n_in = _pixel_to_normalized(in_hw, inverse.dtype, inverse.device)
    n_out_inv = torch.linalg.inv(_pixel_to_normalized(out_hw, inverse.dtype, inverse.device))
    return (n_in @ _homogeneous(inverse) @ n_out_inv)[:, :2, :]


def crop_faces(images: torch.Tensor, landmarks: torch.Tensor, size: int = 112,
               template: torch.Tensor = ARCFACE_TEMPLATE_112) -> torch.Tensor:
    """Aligned (B, C, size, size) face crops of (B, C, H, W) images; differentiable w.r.t. ``images`` only.

    landmarks: (B, 5, 2) pixel coordinates (x, y) in the images, in the template's order (left eye, right eye,
    nose, left and right mouth corners). Bilinear sampling, zeros outside the image.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    landmarks = _check_landmarks(landmarks)
    if landmarks.shape[0] != images.shape[0]:
        raise ValueError(f"{landmarks.shape[0]} landmark sets for {images.shape[0]} images")
    # Not insightface's norm_crop (cv2.warpAffine on numpy): the identity loss needs gradients to the image,
    # so the warp is grid_sample on torch tensors; the fit is face_detect's float64 estimate_similarity.
    inverse = similarity_matrix(landmarks, template, size)
    theta = grid_theta(inverse, tuple(images.shape[-2:]), (size, size)).to(images.device, images.dtype)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
