"""Meta-LoRA stage-2 input augmentation: face-centred multi-ratio, multi-scale crops of one photo.

Meta-LoRA (Appendix D) personalises on a single photo by turning it into a small training
set: detect the face, take the longer side of its box (``f_long``), and cut crops with the
aspect ratios 16:9, 4:3, 1:1, 3:4 and 9:16 whose shorter side is ``f_long`` times 1.5, 2,
2.5, 3.5 or 4.5, each centred on the face; when the photo cannot hold a crop, the closest
possible one is used unless an identical crop was already taken; each crop is flipped
horizontally at random. That gives up to 25 images.

Here:

* :func:`plan_crops` does the geometry only (integer pixel boxes, no pixels touched).
  A crop too large for the image is shrunk, keeping its ratio, to the largest that fits
  (``clamped``); a crop that would leave the image is moved by the least amount that puts
  it inside (``shifted``), so the face stays as close to the centre as the image allows.
  Requests that end up as the same box are kept once. Flips are drawn per (ratio, scale)
  slot from ``seed``, so they do not depend on the image.
* :func:`augment` cuts, flips and resizes the crops to about ``out_area`` pixels with
  sides that are multiples of ``multiple`` (so a VAE can encode every one).
* :func:`preview_sheet` draws the plan on the source image; :func:`largest_face_box`
  runs a detector from :mod:`idlora.models.face_detect` and returns the largest face.

Boxes are ``(x0, y0, x1, y1)`` in source pixels, x1 and y1 exclusive for crops.
"""
from __future__ import annotations

import colorsys
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..models.face_detect import FIX_HINT, BoxSize, FaceDetector, NoFaceError, to_rgb_uint8
from .config import Config, ConfigError

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
IntBox = tuple[int, int, int, int]

DEFAULT_RATIOS = ((16, 9), (4, 3), (1, 1), (3, 4), (9, 16))  # (width, height)
DEFAULT_SCALES = (1.5, 2.0, 2.5, 3.5, 4.5)  # shorter crop side, in units of f_long


class AugmentConfigError(ConfigError):
    """An :class:`AugmentConfig` value is invalid; the message names it and says how to fix it."""


class FaceNotFoundError(NoFaceError):
    """No face in one named image (a :class:`NoFaceError`, so also a ValueError)."""

    def __init__(self, name: str, detector: str, size: tuple[int, int]):
        self.indices = [0]
        self.name = name
        by = f" by {detector}" if detector else ""
        ValueError.__init__(self, f"no face found{by} in {name} ({size[0]}x{size[1]} px, WxH): "
                                  f"the augmentation centres its crops on the face. Fix: {FIX_HINT}")


@dataclass
class AugmentConfig(Config):
    """Settings of the stage-2 augmentation.

    ``ratios`` are (width, height) pairs; ``scales`` set the shorter crop side as a multiple
    of the face box's longer side. ``max_images`` caps the number of crops (evenly spread
    over the plan when it must drop some). ``flip_prob`` is the chance of a horizontal flip,
    drawn from ``seed``. Each crop is resized to about ``out_area`` pixels, keeping its
    aspect, with both sides rounded to a multiple of ``multiple``; ``out_area = 0`` keeps
    the crops at source resolution.
    """
    _error, _label = AugmentConfigError, "augmentation settings"
    ratios: Sequence[tuple[int, int]] = DEFAULT_RATIOS
    scales: Sequence[float] = DEFAULT_SCALES
    max_images: int = 25
    flip_prob: float = 0.5
    seed: int = 0
    out_area: int = 512 * 512
    multiple: int = 64

    def validate(self) -> "AugmentConfig":
        """Raise :class:`AugmentConfigError` for the first invalid value; return self."""
        self._validate_ratios()
        self._validate_scales()
        need = self.need
        need(_is_int(self.max_images, 1), "max_images", "use a whole number >= 1, e.g. 25 (5 ratios x 5 scales)")
        need(_is_number(self.flip_prob) and 0.0 <= self.flip_prob <= 1.0, "flip_prob",
             "use a number from 0 (never flip) to 1 (always flip), e.g. 0.5")
        need(_is_int(self.seed), "seed", "use a whole number, e.g. 0")
        need(_is_int(self.multiple, 1), "multiple", "use a whole number >= 1, e.g. 64 (8 for a VAE's minimum)")
        need(_is_int(self.out_area, 0), "out_area", "use a whole number of pixels, e.g. 262144 (512*512), or 0 to "
                                                    "keep the crops' own size")
        need(not 0 < self.out_area < self.multiple ** 2, "out_area", f"it is smaller than multiple**2 = "
             f"{self.multiple ** 2}: raise out_area (e.g. 262144) or lower multiple")
        return self

    def _validate_ratios(self) -> None:
        ratios = list(self.ratios) if isinstance(self.ratios, (list, tuple)) else None
        self.need(bool(ratios), "ratios", f"use a non-empty list of (width, height) pairs, e.g. {DEFAULT_RATIOS}")
        for r in ratios:
            if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_number(v) and v > 0 for v in r)):
                raise AugmentConfigError(f"ratios entry {r!r} is invalid: each ratio is a (width, height) "
                                         f"pair of positive numbers, e.g. (16, 9)")

    def _validate_scales(self) -> None:
        scales = list(self.scales) if isinstance(self.scales, (list, tuple)) else None
        self.need(bool(scales), "scales", f"use a non-empty list of numbers > 0, e.g. {DEFAULT_SCALES}")
        for v in scales:
            if not (_is_number(v) and v > 0):
                raise AugmentConfigError(f"scales entry {v!r} is invalid: each scale is a number > 0 "
                                         f"(shorter crop side / longer face-box side), e.g. 2.0")


@dataclass
class Crop(BoxSize):
    """One planned crop.

    ``box`` is (x0, y0, x1, y1) in source pixels (x1, y1 exclusive); ``ratio`` the requested
    (width, height); ``scale`` the requested scale (the first one that produced this box);
    ``achieved_short_side`` the box's shorter side in pixels. ``clamped``: the requested size
    did not fit and the largest crop of this ratio that fits was used. ``shifted``: the crop
    was moved off the face centre (by the least amount) to stay inside the image.
    """
    box: IntBox
    ratio: tuple[int, int]
    scale: float
    achieved_short_side: int
    flipped: bool
    clamped: bool
    shifted: bool = False

    @property
    def exact(self) -> bool:
        """The crop is as requested: full size and centred on the face."""
        return not (self.clamped or self.shifted)


# --------------------------------------------------------------------------- geometry

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(value: Any, minimum: int | None = None) -> bool:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    return ok and (minimum is None or value >= minimum)


def _round(v: float) -> int:
    """Round half up (Python's round() rounds halves to even)."""
    return int(math.floor(v + 0.5))


def face_long_side(face_box: Box) -> float:
    """f_long: the longer side of a face box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = face_box
    return float(max(x1 - x0, y1 - y0))


def _check_face_box(image_hw: tuple[int, int], face_box: Box) -> None:
    h, w = image_hw
    vals = list(face_box) if isinstance(face_box, (list, tuple, np.ndarray)) else []
    if len(vals) != 4 or not all(_is_number(float(v)) for v in vals):
        raise ValueError(f"face_box = {face_box!r} is invalid: give (x0, y0, x1, y1) in pixels")
    x0, y0, x1, y1 = (float(v) for v in vals)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"face_box = {face_box!r} is empty: x1 must exceed x0 and y1 exceed y0")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if not (0 <= cx <= w and 0 <= cy <= h):
        raise ValueError(f"face_box = {face_box!r} has its centre outside the {w}x{h} image: "
                         f"pass the box in this image's pixels")


def _fit_size(short: int, q: float, short_limit: int, long_limit: int) -> tuple[int, int, bool]:
    """(short, long, clamped): the requested short side, or the largest one whose crop fits.

    ``q`` >= 1 is long/short; long = round(short * q).
    """
    if short <= short_limit and _round(short * q) <= long_limit:
        return short, _round(short * q), False
    best = max(1, min(short_limit, int(math.floor(long_limit / q))))
    while best + 1 <= short_limit and _round((best + 1) * q) <= long_limit:
        best += 1
    return best, min(_round(best * q), long_limit), True


def _crop_size(image_hw: tuple[int, int], ratio: tuple[int, int], short_side: float) -> tuple[int, int, bool]:
    """(width, height, clamped) of a crop of ``ratio`` with the given shorter side, fitted to the image."""
    h_img, w_img = image_hw
    rw, rh = ratio
    short = max(1, _round(short_side))
    if rw >= rh:  # landscape or square: the height is the short side
        h, w, clamped = _fit_size(short, rw / rh, h_img, w_img)
    else:
        w, h, clamped = _fit_size(short, rh / rw, w_img, h_img)
    return w, h, clamped


def _place(center: float, size: int, limit: int) -> tuple[int, bool]:
    """(start, shifted): the start of a ``size`` span centred on ``center``, moved into [0, limit]."""
    ideal = _round(center - size / 2)
    start = min(max(ideal, 0), limit - size)
    return start, start != ideal


def _plan_one(image_hw: tuple[int, int], face_box: Box, ratio: tuple[int, int], scale: float,
              flipped: bool) -> Crop:
    """The crop of one (ratio, scale) request."""
    x0, y0, x1, y1 = (float(v) for v in face_box)
    w, h, clamped = _crop_size(image_hw, ratio, scale * face_long_side(face_box))
    left, shift_x = _place((x0 + x1) / 2, w, image_hw[1])
    top, shift_y = _place((y0 + y1) / 2, h, image_hw[0])
    return Crop(box=(left, top, left + w, top + h), ratio=tuple(ratio), scale=float(scale),
                achieved_short_side=min(w, h), flipped=flipped, clamped=clamped, shifted=shift_x or shift_y)


def _flip_draws(cfg: AugmentConfig) -> np.ndarray:
    """One flip decision per (ratio, scale) slot, ratio-major, from the seed."""
    n = len(cfg.ratios) * len(cfg.scales)
    return np.random.default_rng(cfg.seed).random(n) < cfg.flip_prob


def _spread(crops: list[Crop], limit: int) -> list[Crop]:
    """At most ``limit`` crops, evenly spread over the list (order kept)."""
    n = len(crops)
    if n <= limit:
        return crops
    return [crops[(i * n) // limit] for i in range(limit)]


def plan_crops(image_hw: tuple[int, int], face_box: Box, cfg: AugmentConfig | None = None) -> list[Crop]:
    """The crops for an image of size ``image_hw`` (height, width) with the face at ``face_box``.

    One request per (ratio, scale), ratio-major; identical boxes are kept once (the first
    request wins), then at most ``cfg.max_images`` are kept.
    """
    cfg = (cfg or AugmentConfig()).validate()
    h, w = (int(v) for v in image_hw[:2])
    if h < 1 or w < 1:
        raise ValueError(f"image_hw = {image_hw!r} is invalid: give (height, width) >= 1")
    _check_face_box((h, w), face_box)
    flips = _flip_draws(cfg)
    crops: dict[IntBox, Crop] = {}
    slots = [(r, s) for r in cfg.ratios for s in cfg.scales]
    for (ratio, scale), flipped in zip(slots, flips):
        crop = _plan_one((h, w), face_box, ratio, scale, bool(flipped))
        crops.setdefault(crop.box, crop)
    kept = _spread(list(crops.values()), cfg.max_images)
    log.debug("plan_crops: %dx%d image, f_long %.1f px: %d requests, %d distinct, %d kept, %d clamped",
              w, h, face_long_side(face_box), len(slots), len(crops), len(kept),
              sum(c.clamped for c in kept))
    return kept


# --------------------------------------------------------------------------- pixels

def output_size(width: int, height: int, out_area: int, multiple: int) -> tuple[int, int]:
    """(width, height) of about ``out_area`` pixels with the crop's aspect, sides multiples of ``multiple``.

    ``out_area = 0`` keeps the size.
    """
    if out_area <= 0:
        return width, height
    aspect = width / height
    tw, th = math.sqrt(out_area * aspect), math.sqrt(out_area / aspect)
    return (max(multiple, _round(tw / multiple) * multiple), max(multiple, _round(th / multiple) * multiple))


def cut(image: np.ndarray, crop: Crop, cfg: AugmentConfig) -> np.ndarray:
    """The pixels of one crop: cut, flipped if planned, resized per ``cfg``; (h, w, 3) uint8."""
    x0, y0, x1, y1 = crop.box
    patch = image[y0:y1, x0:x1]
    if crop.flipped:
        patch = patch[:, ::-1]
    size = output_size(crop.width, crop.height, cfg.out_area, cfg.multiple)
    if size == (crop.width, crop.height):
        return np.ascontiguousarray(patch)
    resized = Image.fromarray(np.ascontiguousarray(patch)).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def augment(image: np.ndarray, face_box: Box,
            cfg: AugmentConfig | None = None) -> tuple[list[np.ndarray], list[Crop]]:
    """The augmented images of one (H, W, 3) photo and their plan.

    ``image`` is uint8 RGB (other dtypes and layouts are converted as in
    :func:`idlora.models.face_detect.to_rgb_uint8`); returns uint8 arrays.
    """
    cfg = (cfg or AugmentConfig()).validate()
    rgb = to_rgb_uint8(image)
    crops = plan_crops(rgb.shape[:2], face_box, cfg)
    return [cut(rgb, c, cfg) for c in crops], crops


# --------------------------------------------------------------------------- preview and detection

def _colour(i: int, n: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(i / max(n, 1), 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


_LEGEND_ROW = 12  # px per legend line (PIL's default bitmap font is ~11 px tall)
_LEGEND_COL = 116  # px per legend column


def _label(crop: Crop) -> str:
    return (f"{crop.ratio[0]}:{crop.ratio[1]} x{crop.scale:g}{'*' if crop.clamped else ''}"
            f"{' flip' if crop.flipped else ''}")


def preview_sheet(image: np.ndarray, crops: Sequence[Crop], face_box: Box | None = None) -> np.ndarray:
    """The source image with every crop's box (one colour each) and the face box (white, thicker),
    plus a legend on the right: ``ratio xscale``, ``*`` when clamped, ``flip`` when flipped.

    Returns (H, W + legend, 3) uint8; the image part keeps the source's pixel coordinates.
    """
    rgb = to_rgb_uint8(image)
    h, w = rgb.shape[:2]
    rows = max(1, (h - 4) // _LEGEND_ROW)
    cols = max(1, math.ceil(len(crops) / rows)) if crops else 0
    canvas = Image.new("RGB", (w + cols * _LEGEND_COL, h), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(canvas)
    thick = max(1, _round(max(h, w) / 400))
    for i, crop in enumerate(crops):
        colour = _colour(i, len(crops))
        x0, y0, x1, y1 = crop.box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=thick)
        col, row = divmod(i, rows)
        draw.text((w + col * _LEGEND_COL + 4, 2 + row * _LEGEND_ROW), _label(crop), fill=colour)
    if face_box is not None:
        draw.rectangle(tuple(float(v) for v in face_box), outline=(255, 255, 255), width=thick + 1)
    return np.asarray(canvas, dtype=np.uint8)


def _load(image: Any, name: str | None) -> tuple[np.ndarray, str]:
    """(rgb uint8, name) from a path or an array."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB")), name or str(image)
    return to_rgb_uint8(image), name or "the image"


def largest_face_box(detector: FaceDetector, image: Any, name: str | None = None) -> Box:
    """The box (x0, y0, x1, y1) of the largest face ``detector`` finds in ``image``.

    ``image`` is an (H, W, 3) array or tensor, or a path to a photo; ``name`` labels it in
    errors (default: the path, or "the image"). Raises :class:`FaceNotFoundError` (a
    ValueError) naming the image when there is no face.
    """
    rgb, label = _load(image, name)
    faces = detector.detect(rgb)
    if not faces:
        raise FaceNotFoundError(label, getattr(detector, "name", ""), (rgb.shape[1], rgb.shape[0]))
    face = max(faces, key=lambda f: f.width * f.height)
    log.debug("largest_face_box: %s: %d face(s), largest %.0fx%.0f px", label, len(faces), face.width, face.height)
    return tuple(float(v) for v in face.box)
