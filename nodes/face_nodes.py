"""Face and metrics nodes: detect and align faces, face embedders, FaceSim / R-FaceSim, CLIP-T / CLIP-I,
DINO, and an evaluation report (JSON + CSV + table image)."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

import comfy.clip_model
import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..models.face_embed import OpenClipScorer
from ..training import evaluate as ev
from .types import FaceEmbedderHandle, MetricsHandle

log = logging.getLogger(__name__)
CAT_FACES = "IDLoRA/faces"
CAT_METRICS = "IDLoRA/metrics"
DETECTORS = ["retinaface", "insightface buffalo_l", "insightface antelopev2"]
CLIP_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin")
NO_CLIP = "none (put an open_clip checkpoint in models/clip)"
REPORT_SUBDIR = os.path.join("idlora", "reports")
_NAN_TIP = "NaN when it cannot be computed (input not connected, or no face at all); never 0."


def insightface_roots() -> list[str]:
    """The models/insightface folders ComfyUI knows (registered here when it does not)."""
    if "insightface" not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path("insightface", os.path.join(folder_paths.models_dir, "insightface"))
    return folder_paths.get_folder_paths("insightface")


def clip_dirs() -> list[str]:
    """models/clip, plus any folder named 'clip' that ComfyUI lists under text_encoders (legacy 'clip')."""
    dirs = [os.path.join(folder_paths.models_dir, "clip")]
    dirs += [p for p in folder_paths.get_folder_paths("text_encoders") if os.path.basename(p.rstrip("/\\")) == "clip"]
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs))


def clip_files() -> list[str]:
    found = [str(p.relative_to(d)) for d in map(Path, clip_dirs()) if d.is_dir()
             for p in sorted(d.rglob("*")) if p.is_file() and p.suffix.lower() in CLIP_EXTENSIONS]
    return sorted(dict.fromkeys(found)) or [NO_CLIP]


def to_nchw(images: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, C) as (B, 3, H, W) float in [0, 1], outside inference mode."""
    return images[..., :3].movedim(-1, 1).float().clone()


def to_image(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays of one size to a ComfyUI IMAGE."""
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


@functools.lru_cache(maxsize=4)
def _detector(kind: str, provider: str, threshold: float):
    return ev.make_detector(kind, ev.PROVIDERS[provider], threshold, insightface_roots())


def _out_of_place(layer):
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


@contextlib.contextmanager
def autograd_safe(model: torch.nn.Module):
    """ComfyUI's CLIPLayer adds its residuals in place, which autograd rejects. For a differentiable call,
    give its layers an out-of-place forward (the same numbers) and restore them afterwards."""
    layers = [m for m in model.modules() if isinstance(m, comfy.clip_model.CLIPLayer) and "forward" not in vars(m)]
    for m in layers:
        m.forward = _out_of_place(m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def clip_vision_fn(clip_vision, prefer_cls: bool = False):
    """``(B, 3, H, W) in [0, 1] -> (B, D)`` through a ComfyUI CLIP_VISION, differentiable (own preprocessing)."""
    if clip_vision is None or not hasattr(clip_vision, "model"):
        raise ValueError("clip_vision is empty: connect a Load CLIP Vision node (a model in models/clip_vision)")

    def fn(images01: torch.Tensor) -> torch.Tensor:
        comfy.model_management.load_model_gpu(clip_vision.patcher)
        px = ev.vision_pixels(images01.to(clip_vision.load_device), clip_vision.image_size,
                              clip_vision.image_mean, clip_vision.image_std)
        if torch.is_grad_enabled() and px.requires_grad:
            with autograd_safe(clip_vision.model):
                out = clip_vision.model(pixel_values=px)
        else:
            out = clip_vision.model(pixel_values=px)
        return ev.pick_embedding(out[2], out[0], prefer_cls).float()
    return fn


def _is_dino(clip_vision) -> bool:
    return type(getattr(clip_vision, "model", None)).__name__.lower().startswith("dino")


def metric_output(results: dict) -> tuple[dict, str]:
    """(IDLORA_METRICS value, summary text) from a dict of MetricResult."""
    metrics = {k: ev.jsonable(v) for k, v in results.items()}
    return metrics, ev.summary_text(metrics)


class FaceDetect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAFaceDetect",
            display_name="IDLoRA Face Detect",
            category=CAT_FACES,
            description="Find faces with 5 landmarks and align them to the ArcFace template; draws a preview.",
            inputs=[
                io.Image.Input("images", tooltip="Photos or generated images (a batch)."),
                io.Combo.Input("detector", options=DETECTORS, default="retinaface",
                               tooltip="retinaface: built in (RetinaFace-MobileNet0.25, CPU, no download). "
                                       "insightface <pack>: the SCRFD detector of a pack you put in "
                                       "models/insightface/models/<pack>/ (det_10g.onnx for buffalo_l, "
                                       "scrfd_10g_bnkps.onnx for antelopev2)."),
                io.Combo.Input("provider", options=list(ev.PROVIDERS), default="CPU",
                               tooltip="onnxruntime device. CUDA needs onnxruntime-gpu; falls back to CPU "
                                       "with a warning."),
                io.Int.Input("crop_size", default=112, min=32, max=1024, step=8,
                             tooltip="Side of the aligned crops in px (ArcFace uses 112; the template is "
                                     "scaled)."),
                io.Combo.Input("faces", options=["largest", "all"], default="largest",
                               tooltip="largest: one crop per image. all: a crop for every face found."),
                io.Combo.Input("if_no_face", options=["error", "skip"], default="error",
                               tooltip="error: stop with the index of each image without a face. skip: leave "
                                       "those images out of the crops (they stay in the preview)."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Minimum face score. 0 keeps the detector's default (RetinaFace 0.8, "
                                       "insightface 0.5); lower it when a real face is missed."),
            ],
            outputs=[
                io.Image.Output(display_name="crops", tooltip="Aligned faces, N x crop_size x crop_size."),
                io.Image.Output(display_name="preview", tooltip="The input images with boxes, landmarks "
                                                                "and scores."),
                io.String.Output(display_name="face_counts", tooltip="Faces found per input image, as a "
                                                                     "JSON list, e.g. [1, 0, 2]."),
            ],
        )

    @classmethod
    def execute(cls, images, detector, provider, crop_size, faces, if_no_face, threshold) -> io.NodeOutput:
        found = ev.detect_and_crop(_detector(detector, provider, round(threshold, 4)), images, crop_size, faces,
                                   if_no_face)
        counts = json.dumps(found.counts)
        return io.NodeOutput(to_image(found.crops), to_image(found.previews), counts,
                             ui={"text": [f"faces per image: {counts}"]})


class FaceEmbedder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAFaceEmbedder",
            display_name="IDLoRA Face Embedder",
            category=CAT_FACES,
            description="Load a face-recognition embedder for the identity metrics (and, where differentiable, "
                        "identity losses).",
            inputs=[
                io.Combo.Input("backend", options=list(ev.BACKENDS), default="dlib",
                               tooltip="dlib: built in, 128-d, scoring only. arcface-onnx: insightface's "
                                       "recognizer (w600k_r50 / glintr100 from models/insightface). "
                                       "arcface-torch: the same file in a PyTorch IResNet (differentiable). "
                                       "clip-vision / dinov2: the connected CLIP_VISION model on aligned face "
                                       "crops (differentiable)."),
                io.Combo.Input("pack", options=["buffalo_l", "antelopev2", "idlora_demo"], default="buffalo_l",
                               tooltip="arcface backends: the insightface pack whose recognizer is used "
                                       "(buffalo_l: w600k_r50.onnx; antelopev2: glintr100.onnx), from "
                                       "models/insightface/models/<pack>/. idlora_demo: random weights of "
                                       "the same architecture that ./idlora start writes so the bundled "
                                       "workflows run; not a face model."),
                io.Combo.Input("device", options=list(ev.PROVIDERS), default="CPU",
                               tooltip="arcface backends: onnxruntime provider / torch device."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="clip-vision / dinov2 backends: a CLIP vision or DINOv2 model from "
                                            "the stock Load CLIP Vision node."),
                io.Combo.Input("dlib_detector", options=["hog", "cnn"], default="hog", optional=True,
                               tooltip="dlib backend: face detector (hog is fast; cnn finds harder faces, "
                                       "slowly on a CPU)."),
            ],
            outputs=[FaceEmbedderHandle.Output(display_name="embedder",
                                               tooltip="For IDLoRA Identity Similarity.")],
        )

    @classmethod
    def execute(cls, backend, pack, device, clip_vision=None, dlib_detector="hog") -> io.NodeOutput:
        fn = None
        if backend in ("clip-vision", "dinov2") and clip_vision is not None:
            fn = clip_vision_fn(clip_vision, prefer_cls=backend == "dinov2")
        torch_device = "cuda" if device == "CUDA" and torch.cuda.is_available() else "cpu"
        with torch.inference_mode(False):  # the torch backends stay usable in losses
            handle = ev.build_face_embedder(backend, insightface_roots=insightface_roots(), pack=pack,
                                            providers=ev.PROVIDERS[device], device=torch_device, vision_fn=fn,
                                            dlib_detector=dlib_detector)
        return io.NodeOutput(handle, ui={"text": [f"{handle.name} ({handle.source})"]})


class IdentitySimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAIdentitySimilarity",
            display_name="IDLoRA Identity Similarity",
            category=CAT_METRICS,
            description="FaceSim (generated vs reference) and R-FaceSim (generated vs the person's OTHER photos, "
                        "Meta-LoRA). Images without a face are counted, never scored 0.",
            inputs=[
                FaceEmbedderHandle.Input("embedder", tooltip="From IDLoRA Face Embedder."),
                io.Image.Input("generated", tooltip="The generated images (a batch)."),
                io.Image.Input("reference", tooltip="The reference photo the LoRA / conditioning was made from "
                                                    "(several: each face's score is its mean over them)."),
                io.Image.Input("others", optional=True,
                               tooltip="Other photos of the same person, NOT the reference: gives R-FaceSim, "
                                       "which does not reward copying the reference's pose and lighting."),
            ],
            outputs=[
                io.Float.Output(display_name="facesim", tooltip="Mean cosine to the reference. " + _NAN_TIP),
                io.Float.Output(display_name="r_facesim", tooltip="R-FaceSim. NaN when 'others' is not "
                                                                  "connected. " + _NAN_TIP),
                io.String.Output(display_name="summary", tooltip="The values, counts and images without a face."),
                MetricsHandle.Output(display_name="metrics", tooltip="For IDLoRA Evaluation Report."),
            ],
        )

    @classmethod
    def execute(cls, embedder, generated, reference, others=None) -> io.NodeOutput:
        if not isinstance(embedder, ev.FaceEmbedderHandle):
            raise ValueError("embedder is empty: connect an IDLoRA Face Embedder node")
        results = ev.identity_metrics(embedder.embedder, generated, reference, others)
        metrics, text = metric_output(results)
        return io.NodeOutput(ev.as_float(results["FaceSim"]), ev.as_float(results["R-FaceSim"]), text, metrics,
                             ui={"text": [text]})


@functools.lru_cache(maxsize=2)
def _scorer(path: str, mtime: float, arch: str, device: str) -> OpenClipScorer:
    with torch.inference_mode(False):
        return OpenClipScorer(arch, checkpoint=path, device=device)


def open_clip_scorer(checkpoint: str, arch: str) -> OpenClipScorer:
    """The user's open_clip checkpoint from models/clip; ``<arch>.json`` there registers a custom config."""
    dirs = clip_dirs()
    path = next((os.path.join(d, checkpoint) for d in dirs if os.path.isfile(os.path.join(d, checkpoint))), None)
    if checkpoint == NO_CLIP or path is None:
        raise FileNotFoundError(f"checkpoint {checkpoint!r} is not in models/clip ({', '.join(dirs)}): put an "
                                f"open_clip state dict there (e.g. ViT-B-32 weights as .safetensors) and choose "
                                f"it; set 'architecture' to its open_clip model name")
    import open_clip
    for d in dirs:
        if arch not in open_clip.list_models() and os.path.isfile(os.path.join(d, f"{arch}.json")):
            open_clip.add_model_config(os.path.join(d, f"{arch}.json"))
    if arch not in open_clip.list_models():
        raise ValueError(f"architecture {arch!r} is not an open_clip model name (e.g. ViT-B-32, ViT-L-14, "
                         f"ViT-H-14): fix it, or put {arch}.json (an open_clip model config) in models/clip")
    device = str(comfy.model_management.get_torch_device())
    return _scorer(path, os.path.getmtime(path), arch, device)


class ClipScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAClipScore",
            display_name="IDLoRA CLIP Score",
            category=CAT_METRICS,
            description="CLIP-T (image vs prompt), CLIP-I vs style images (DuoLoRA) and vs non-personalized "
                        "images (Meta-LoRA), with an open_clip model. Raw cosines in [-1, 1].",
            inputs=[
                io.Combo.Input("checkpoint", options=clip_files(),
                               tooltip="An open_clip state dict in models/clip (.safetensors / .pt). The papers "
                                       "use ViT-B-32. Refresh the page after adding a file."),
                io.String.Input("architecture", default="ViT-B-32",
                                tooltip="The checkpoint's open_clip model name (OpenAI's ViT-B/32 weights: "
                                        "ViT-B-32-quickgelu). A custom one: put <name>.json in models/clip."),
                io.Image.Input("images", tooltip="The generated images."),
                io.String.Input("prompt", multiline=True, default="a photo of a person",
                                tooltip="The prompt of the images: one for all, or one line per image."),
                io.Image.Input("style_images", optional=True,
                               tooltip="Style reference(s): CLIP-I (style) is the mean cosine over all pairs."),
                io.Image.Input("non_personalized", optional=True,
                               tooltip="The same prompts and seeds without the LoRA, in the same order: "
                                       "CLIP-I (personalized), pair by pair."),
            ],
            outputs=[
                io.Float.Output(display_name="clip_t", tooltip="Mean CLIP-T."),
                io.Float.Output(display_name="clip_i_style", tooltip="CLIP-I vs style images. " + _NAN_TIP),
                io.Float.Output(display_name="clip_i_personalized",
                                tooltip="CLIP-I vs non-personalized images. " + _NAN_TIP),
                io.String.Output(display_name="summary", tooltip="The values as text."),
                MetricsHandle.Output(display_name="metrics", tooltip="For IDLoRA Evaluation Report."),
            ],
        )

    @classmethod
    def execute(cls, checkpoint, architecture, images, prompt, style_images=None,
                non_personalized=None) -> io.NodeOutput:
        scorer = open_clip_scorer(checkpoint, architecture.strip())
        optional = [None if x is None else to_nchw(x) for x in (style_images, non_personalized)]
        results = ev.clip_metrics(scorer.image_features, scorer.text_features, to_nchw(images), prompt, *optional,
                                  model=f"open_clip {scorer.arch} ({checkpoint})")
        metrics, text = metric_output(results)
        floats = [ev.as_float(results[k]) for k in ("CLIP-T", "CLIP-I (style)", "CLIP-I (personalized)")]
        return io.NodeOutput(*floats, text, metrics, ui={"text": [text]})


class DinoScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRADinoScore",
            display_name="IDLoRA DINO Score",
            category=CAT_METRICS,
            description="DuoLoRA's DINO content score: mean pairwise cosine of DINOv2 image embeddings of the "
                        "generated and reference images.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="A DINOv2 model from the stock Load CLIP Vision node "
                                                           "(models/clip_vision); a CLIP vision model also runs."),
                io.Image.Input("images", tooltip="The generated images."),
                io.Image.Input("reference_images", tooltip="The content (subject) images."),
            ],
            outputs=[
                io.Float.Output(display_name="dino", tooltip="Mean pairwise cosine, in [-1, 1]."),
                io.String.Output(display_name="summary", tooltip="The value as text."),
                MetricsHandle.Output(display_name="metrics", tooltip="For IDLoRA Evaluation Report."),
            ],
        )

    @classmethod
    def execute(cls, clip_vision, images, reference_images) -> io.NodeOutput:
        fn = clip_vision_fn(clip_vision, prefer_cls=_is_dino(clip_vision))
        results = ev.dino_metrics(fn, to_nchw(images), to_nchw(reference_images),
                                  model=type(clip_vision.model).__name__)
        metrics, text = metric_output(results)
        return io.NodeOutput(ev.as_float(results["DINO"]), text, metrics, ui={"text": [text]})


class EvaluationReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        tip = ("Metrics from an IDLoRA metric node: Identity Similarity, CLIP Score, DINO Score, FID, CSD Style "
               "Score, DreamSim or ImageReward (optional).")
        return io.Schema(
            node_id="IDLoRAEvaluationReport",
            display_name="IDLoRA Evaluation Report",
            category=CAT_METRICS,
            description="Collect metrics into output/idlora/reports/<name>.json and .csv, and draw them as a "
                        "table.",
            is_output_node=True,
            inputs=[
                io.String.Input("name", default="idlora_eval",
                                tooltip="Report file name, without folders; an existing report of that name is "
                                        "replaced."),
                *[MetricsHandle.Input(f"metrics_{i}", optional=True, tooltip=tip) for i in range(1, 5)],
            ],
            outputs=[
                io.Image.Output(display_name="table", tooltip="The metrics as a table image."),
                io.String.Output(display_name="summary", tooltip="The metrics as text."),
            ],
        )

    @classmethod
    def execute(cls, name, metrics_1=None, metrics_2=None, metrics_3=None, metrics_4=None) -> io.NodeOutput:
        metrics = ev.merge_metrics([metrics_1, metrics_2, metrics_3, metrics_4])
        if not metrics:
            raise ValueError("no metrics connected: link the 'metrics' output of an IDLoRA metric node (Identity "
                             "Similarity, CLIP Score, DINO Score, FID, CSD Style Score, DreamSim, ImageReward) to "
                             "metrics_1")
        folder = os.path.join(folder_paths.get_output_directory(), REPORT_SUBDIR)
        paths = ev.write_metrics_report(folder, name, metrics, {"name": name})
        table = ev.render_table(ev.CSV_HEADER, ev.metric_rows(metrics), title=f"IDLoRA report: {name}")
        rel = [os.path.relpath(p, folder_paths.get_output_directory()) for p in paths]
        text = ev.summary_text(metrics)
        return io.NodeOutput(to_image([table]), text, ui={"text": [text], "idlora_reports": rel})


NODES = [FaceDetect, FaceEmbedder, IdentitySimilarity, ClipScore, DinoScore, EvaluationReport]
