"""Differentiable face crop: matches cv2.warpAffine, puts landmarks on the template, passes gradients to pixels."""
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idlora.models.face_crop import (ARCFACE_TEMPLATE_112, crop_faces, forward_similarity, scaled_template,
                                     similarity_matrix)
from idlora.models.iresnet import ArcFaceTorch, iresnet


def _place(scale: float, angle_deg: float, tx: float, ty: float, size: int = 112) -> torch.Tensor:
    """Template points (for a ``size`` crop) rotated, scaled and shifted into an image: (5, 2) pixels."""
    a = math.radians(angle_deg)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    return scale * scaled_template(ARCFACE_TEMPLATE_112, size) @ rot.T + torch.tensor([tx, ty])


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (H, W, 3) float32 in [0, 1]."""
    noise = np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)
    img = cv2.GaussianBlur(noise, (0, 0), 2.0)
    return (img - img.min()) / (img.max() - img.min())


def _dots(h: int, w: int, points: torch.Tensor, sigma: float) -> torch.Tensor:
    """(1, H, W) image of Gaussian dots at the given (x, y) points."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    img = sum(torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2)) for x, y in points.tolist())
    return img[None].float()


def _centroids(crop: torch.Tensor, template: torch.Tensor, radius: int = 6) -> torch.Tensor:
    """Intensity-weighted centre of the dot near each template point of a (1, S, S) crop."""
    found = []
    for x, y in template.tolist():
        x0, y0 = int(round(x)) - radius, int(round(y)) - radius
        win = crop[0, y0:y0 + 2 * radius + 1, x0:x0 + 2 * radius + 1].double()
        ys, xs = torch.meshgrid(torch.arange(win.shape[0]) + y0, torch.arange(win.shape[1]) + x0, indexing="ij")
        found.append([(win * xs).sum() / win.sum(), (win * ys).sum() / win.sum()])
    return torch.tensor(found, dtype=torch.float64)


def test_matches_cv2_warp_affine():
    img = _smooth_image(180, 200, seed=0)
    jitter = torch.from_numpy(np.random.default_rng(1).normal(0, 1.5, (5, 2)))
    lmk = (_place(1.3, 15.0, 60.0, 20.0) + jitter)[None]  # not an exact similarity: least squares matters
    fwd = forward_similarity(lmk)[0].numpy()
    ref = cv2.warpAffine(img, fwd, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0)
    out = crop_faces(torch.from_numpy(img).permute(2, 0, 1)[None], lmk)[0].permute(1, 2, 0).numpy()
    diff = np.abs(out - ref)[2:-2, 2:-2]
    assert diff.mean() < 0.25 / 255 and diff.max() < 1 / 255, (diff.mean(), diff.max())  # half a pixel off: 5/255


def _skimage_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 similarity insightface's norm_crop estimates with scikit-image."""
    from skimage.transform import SimilarityTransform as similarity
    if hasattr(similarity, "from_estimate"):  # scikit-image >= 0.26
        return similarity.from_estimate(src, dst).params
    fit = similarity()
    fit.estimate(src, dst)
    return fit.params


def test_fit_equals_insightface_norm_crop_estimate():
    lmk = _place(0.9, -40.0, 20.0, 90.0) + torch.from_numpy(np.random.default_rng(2).normal(0, 3.0, (5, 2)))
    expected = _skimage_similarity(lmk.numpy(), ARCFACE_TEMPLATE_112.numpy())
    np.testing.assert_allclose(forward_similarity(lmk[None])[0].numpy(), expected[:2], atol=1e-9)


def test_similarity_matrix_is_the_inverse_warp():
    lmk = _place(1.7, -25.0, 40.0, 55.0)[None]
    inv = similarity_matrix(lmk)
    mapped = ARCFACE_TEMPLATE_112 @ inv[0, :, :2].T + inv[0, :, 2]
    assert inv.shape == (1, 2, 3)
    torch.testing.assert_close(mapped, lmk[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [112, 224])
def test_landmarks_land_on_the_template(size):
    lmk = _place(1.6 * 112 / size, -25.0, 70.0, 45.0, size)
    img = _dots(260, 240, lmk, sigma=1.2 * 1.6)[None]
    crop = crop_faces(img, lmk[None], size=size)[0]
    target = scaled_template(ARCFACE_TEMPLATE_112, size)
    err = (_centroids(crop, target) - target).norm(dim=1)
    assert err.max() < 0.2, err


def test_batch_of_two_with_different_landmarks():
    lmks = torch.stack([_place(1.6, 20.0, 30.0, 15.0), _place(1.2, -10.0, 80.0, 70.0)])
    imgs = torch.cat([_dots(240, 260, p, sigma=1.5)[None] for p in lmks])
    crops = crop_faces(imgs, lmks)
    assert crops.shape == (2, 1, 112, 112)
    for i in range(2):
        torch.testing.assert_close(crops[i:i + 1], crop_faces(imgs[i:i + 1], lmks[i:i + 1]), atol=1e-6, rtol=0)
        err = (_centroids(crops[i], ARCFACE_TEMPLATE_112) - ARCFACE_TEMPLATE_112).norm(dim=1)
        assert err.max() < 0.2, (i, err)


def _footprint_coords(lmk: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Crop coordinates (H, W, 2) of every input pixel centre."""
    fwd = forward_similarity(lmk)[0]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    return torch.stack([xs, ys], -1) @ fwd[:, :2].T + fwd[:, 2]


def test_gradients_reach_face_pixels_not_landmarks():
    torch.manual_seed(0)
    arcface = ArcFaceTorch(iresnet((1, 1, 1, 1), embedding_size=64))
    img = torch.rand(1, 3, 220, 200, requires_grad=True)
    lmk = _place(1.4, 10.0, 40.0, 30.0)[None].float().requires_grad_(True)
    ref = F.normalize(torch.randn(1, 64), dim=-1)
    loss = 1 - F.cosine_similarity(arcface.embed(crop_faces(img, lmk)), ref).mean()
    loss.backward()
    assert lmk.grad is None  # the warp is a constant of the graph
    grad = img.grad.abs().sum(1)[0]
    assert torch.isfinite(grad).all()
    c = _footprint_coords(lmk.detach(), 220, 200)
    outside = ((c < -1.5) | (c > 112.5)).any(-1)
    inside = ((c > 1) & (c < 110)).all(-1)
    assert outside.any() and inside.any()
    assert (grad[outside] == 0).all()
    assert (grad[inside] > 0).float().mean() > 0.95


def test_landmarks_shape_is_checked():
    with pytest.raises(ValueError, match=r"\(B, 5, 2\)"):
        crop_faces(torch.rand(1, 3, 64, 64), torch.rand(1, 5, 3))
    with pytest.raises(ValueError, match="coincide"):
        crop_faces(torch.rand(1, 3, 64, 64), torch.ones(1, 5, 2))
