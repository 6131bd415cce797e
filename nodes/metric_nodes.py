"""The paper metrics with their own networks: FID and ImageReward (DiffLoRA), CSD-s (DuoLoRA), DreamSim
(identity stylization). Each reads the user's weight files from its models/ folder (nothing is downloaded) and
feeds the IDLoRA Evaluation Report like the face and CLIP metrics."""
from __future__ import annotations

import os
from pathlib import Path

import torch

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..models.csd import CSD_FILE, CSD_SOURCE, CSDScorer
from ..models.dreamsim_metric import DREAMSIM_FILES, DREAMSIM_TYPES, DreamSimScorer, find_dreamsim_folder
from ..models.fid_inception import FID_SOURCE, FID_WEIGHTS, load_inception, load_statistics
from ..models.image_reward import IMAGE_REWARD_WEIGHTS, ImageRewardScorer, find_image_reward_folder
from ..models.metric_files import METRIC_FOLDERS, find_model_file
from ..training import evaluate as ev
from ..training import paper_metrics as pm
from .face_nodes import CAT_METRICS, metric_output, to_nchw
from .types import MetricsHandle

WEIGHT_EXTENSIONS = (".pth", ".pt", ".tar", ".safetensors", ".bin")
_REFRESH = " Refresh the page after adding a file."


def metric_dirs(metric: str) -> list[str]:
    """The models/<folder> folders of a metric (registered with ComfyUI when it does not know the name), so that
    extra_model_paths.yaml can add more."""
    name = METRIC_FOLDERS[metric]
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
    return folder_paths.get_folder_paths(name)


def weight_files(metric: str, default: str) -> list[str]:
    """The weight files in a metric's folders, with the published name first (listed even when absent, so that
    running the node says where to put it)."""
    found = {p.name for d in map(Path, metric_dirs(metric)) if d.is_dir() for p in d.iterdir()
             if p.is_file() and p.name.lower().endswith(WEIGHT_EXTENSIONS)}
    return [default] + sorted(found - {default})


def _device() -> str:
    return str(comfy.model_management.get_torch_device())


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


_LOADED: dict[str, tuple[tuple, object]] = {}  # metric -> (what was loaded, the model): one model per metric


def _load(metric: str, where: str, name: str, stamp: float, device: str):
    key = (where, name, stamp, device)
    if metric in _LOADED and _LOADED[metric][0] == key:
        return _LOADED[metric][1]
    _LOADED.pop(metric, None)  # free the old one first
    with torch.inference_mode(False):  # plain tensors: the models stay usable outside ComfyUI's inference mode
        if metric == "FID":
            model = load_inception([where], name, device)
        elif metric == "CSD":
            model = CSDScorer([where], name, device)
        elif metric == "DreamSim":
            model = DreamSimScorer([where], name, device)
        else:
            model = ImageRewardScorer([where], device)
    _LOADED[metric] = (key, model)
    return model


def scorer(metric: str, name: str = ""):
    """The metric's model from the first of its folders that has the files; kept until its file, its type or the
    device changes (one model per metric, like the CLIP Score node's cache)."""
    dirs = metric_dirs(metric)
    if metric == "DreamSim":
        where = find_dreamsim_folder(dirs, name)
        stamp = max((_mtime(where / f) for f in DREAMSIM_FILES[name]), default=0.0)
    elif metric == "ImageReward":
        where, name = find_image_reward_folder(dirs), IMAGE_REWARD_WEIGHTS
        stamp = _mtime(where / name)
    else:
        path = find_model_file(metric, name, dirs, FID_SOURCE if metric == "FID" else CSD_SOURCE)
        where, name, stamp = path.parent, path.name, _mtime(path)
    return _load(metric, str(where), name, stamp, _device())


def _stats(name: str):
    """({'mu', 'sigma'}, count) from an .npz given as a path or a name in models/fid; None for ''."""
    name = name.strip()
    if not name:
        return None
    path = find_model_file("FID", name, metric_dirs("FID"), "FID statistics (.npz with 'mu' and 'sigma') of your "
                           "reference set, e.g. written by tools/idlora_metrics.py fid --save-stats")
    return load_statistics(path)


def _done(results: dict, key: str) -> io.NodeOutput:
    metrics, text = metric_output(results)
    return io.NodeOutput(ev.as_float(results[key]), text, metrics, ui={"text": [text]})


def _outputs(name: str, tip: str) -> list:
    return [io.Float.Output(display_name=name, tooltip=tip),
            io.String.Output(display_name="summary", tooltip="The value as text."),
            MetricsHandle.Output(display_name="metrics", tooltip="For IDLoRA Evaluation Report.")]


class FIDScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAFIDScore",
            display_name="IDLoRA FID",
            category=CAT_METRICS,
            description="FID (DiffLoRA's image-quality metric; lower is better): Frechet distance of the Inception "
                        "v3 pool features of the generated images and of a reference set (images, or saved "
                        "statistics such as MS-COCO's). torch-fidelity's TF-FID Inception, weights from models/fid.",
            inputs=[
                io.Combo.Input("weights", options=weight_files("FID", FID_WEIGHTS),
                               tooltip=f"torch-fidelity's Inception v3 file ({FID_WEIGHTS}) in models/fid; nothing "
                                       f"is downloaded." + _REFRESH),
                io.Image.Input("images", tooltip="The generated images (at least 2; FID is meaningful with "
                                                 "thousands, and only comparable between equal set sizes)."),
                io.Image.Input("reference_images", optional=True,
                               tooltip="The reference set (real images). Or use reference_stats."),
                io.String.Input("reference_stats", default="", optional=True,
                                tooltip="Instead of reference_images: an .npz with 'mu' and 'sigma' (pytorch-fid / "
                                        "tools/idlora_metrics.py fid --save-stats), a path or a name in models/fid."),
            ],
            outputs=_outputs("fid", "The FID (>= 0, lower is better). NaN when no reference is connected."),
        )

    @classmethod
    def execute(cls, weights, images, reference_images=None, reference_stats="") -> io.NodeOutput:
        model = scorer("FID", weights)
        ref = None if reference_images is None else to_nchw(reference_images)
        results = pm.fid_metrics(model, to_nchw(images), ref, _stats(reference_stats or ""), model=model.name)
        return _done(results, "FID")


class CSDScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRACSDScore",
            display_name="IDLoRA CSD Style Score",
            category=CAT_METRICS,
            description="DuoLoRA's CSD-s: mean pairwise cosine of CSD style descriptors (a CLIP ViT-L/14 trained to "
                        "separate styles) of the generated and the style images; higher is closer in style.",
            inputs=[
                io.Combo.Input("checkpoint", options=weight_files("CSD", CSD_FILE),
                               tooltip=f"CSD's released ViT-L checkpoint ({CSD_FILE}) in models/csd." + _REFRESH),
                io.Image.Input("images", tooltip="The generated images."),
                io.Image.Input("style_images", tooltip="The style reference image(s)."),
            ],
            outputs=_outputs("csd_s", "Mean pairwise cosine of the style descriptors, in [-1, 1]."),
        )

    @classmethod
    def execute(cls, checkpoint, images, style_images) -> io.NodeOutput:
        model = scorer("CSD", checkpoint)
        return _done(pm.csd_metrics(model.style_features, to_nchw(images), to_nchw(style_images), model.name),
                     "CSD-s")


class DreamSimScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRADreamSimScore",
            display_name="IDLoRA DreamSim",
            category=CAT_METRICS,
            description="DreamSim distance (the identity-stylization paper's perceptual metric): 1 - cosine of "
                        "DreamSim embeddings; 0 for identical images, lower is more similar. Weights from "
                        "models/dreamsim (the dreamsim package; nothing is downloaded).",
            inputs=[
                io.Combo.Input("dreamsim_type", options=list(DREAMSIM_TYPES), default="ensemble",
                               tooltip="ensemble: DreamSim's default and best (DINO + CLIP + OpenCLIP ViT-B/16). The "
                                       "others are its single-backbone variants. Each needs its release files in "
                                       "models/dreamsim (the node's error lists them)."),
                io.Image.Input("images", tooltip="The generated (e.g. stylized) images."),
                io.Image.Input("reference_images", tooltip="The images to compare with (e.g. the input photo)."),
                io.Combo.Input("pairs", options=["all pairs", "paired"], default="all pairs",
                               tooltip="all pairs: the mean over every (image, reference) pair. paired: image i "
                                       "against reference i (equal counts)."),
            ],
            outputs=_outputs("dreamsim", "Mean DreamSim distance (lower is more similar)."),
        )

    @classmethod
    def execute(cls, dreamsim_type, images, reference_images, pairs) -> io.NodeOutput:
        model = scorer("DreamSim", dreamsim_type)
        results = pm.dreamsim_metrics(model.embed, to_nchw(images), to_nchw(reference_images),
                                      paired=pairs == "paired", model=model.name)
        return _done(results, "DreamSim")


class ImageRewardScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAImageReward",
            display_name="IDLoRA ImageReward",
            category=CAT_METRICS,
            description="ImageReward (DiffLoRA's text-image preference score; higher is better): BLIP scores each "
                        "image with its prompt. Needs ImageReward.pt and bert-base-uncased's vocab.txt in "
                        "models/image_reward.",
            inputs=[
                io.Image.Input("images", tooltip="The generated images."),
                io.String.Input("prompt", multiline=True, default="a photo of a person",
                                tooltip="The prompt of the images: one for all, or one line per image."),
            ],
            outputs=_outputs("image_reward", "Mean ImageReward (normalised: 0 is the average of its training "
                                             "set's images)."),
        )

    @classmethod
    def execute(cls, images, prompt) -> io.NodeOutput:
        model = scorer("ImageReward")
        return _done(pm.image_reward_metrics(model.score, to_nchw(images), prompt, model.name), "ImageReward")


NODES = [FIDScore, CSDScore, DreamSimScore, ImageRewardScore]
