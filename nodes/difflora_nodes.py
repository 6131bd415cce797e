"""DiffLoRA nodes: build the per-identity LoRA dataset (job), train the LoRA autoencoder (job) and the DiT (job),
load a DiffLoRA file, and sample a personalized LoRA from one face photo (seconds, no training).

The training chain runs in one prompt: each training node takes the previous node's ``job`` and waits for it to
succeed before it submits its own job (ComfyUI's Cancel ends the waiting, not the job). The DiffLoRA file is then
read with IDLoRA Wait for Job (which = difflora) -> IDLoRA Load DiffLoRA.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

import folder_paths
from comfy_api.latest import io

from ..models.dit import DiTConfig
from ..models.lora import PRESETS
from ..training.difflora import PRESETS as NET_PRESETS
from ..training.difflora import DiffLora, DiffLoraFileError, DiTTrainConfig, LaeTrainConfig, load_difflora
from ..training.difflora_data import identity_items, reference_embeddings
from ..training.difflora_job import DiffLoraTask, LaeTask, population_key
from ..training.lora_dataset import (TRAINERS, DatasetConfig, LoraDatasetTask, file_sha256, finished,
                                     finished_entries, shard)
from ..training import evaluate as ev
from ..training.lora_format import sanitize_save_name, save_bundle
from ..training.meta_lora_data import scan_identity_folder
from . import model_source
from .comfy_adapter import ComfyDiffusion, apply_lora, kohya_stems, model_family
from .face_nodes import clip_files, open_clip_scorer
from .inputs import JobNode, class_word_input, diffusion_inputs, identity_folder_input, seed_input
from .job_nodes import wait_for_job
from .job_service import claim_output, load_private_model, manager, torch_device
from .lora_nodes import LORA_SUBDIR, idlora_lora_dir
from .meta_lora_nodes import dataset_path
from .types import DiffLoraHandle, FaceEmbedderHandle, JobHandle, LoraHandle, LoraNameOutput, MetaDownHandle

log = logging.getLogger(__name__)
CATEGORY = "IDLoRA/difflora"
DATASETS, DIFFLORA = "idlora_lora_datasets", "idlora_difflora"
NONE = "none"
DS, LAE, DIT = DatasetConfig(), LaeTrainConfig(), DiTTrainConfig()


# -- folders ---------------------------------------------------------------------------------------------------

def _register(key: str, path: str, extensions: set) -> str:
    if key not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[key] = ([path], extensions)
    return folder_paths.get_folder_paths(key)[0]


def lora_datasets_dir() -> str:
    """models/idlora/lora_datasets (one folder per dataset), registered with ComfyUI's folder list."""
    return _register(DATASETS, os.path.join(folder_paths.models_dir, "idlora", "lora_datasets"), set())


def difflora_dir() -> str:
    """models/difflora (LAE and DiffLoRA files), registered with ComfyUI's folder list."""
    return _register(DIFFLORA, os.path.join(folder_paths.models_dir, "difflora"), {".safetensors"})


def difflora_files() -> list[str]:
    difflora_dir()
    return folder_paths.get_filename_list(DIFFLORA) or [NONE]


def dataset_folder(name: str) -> Path:
    """The output folder of a dataset name: models/idlora/lora_datasets/<name>."""
    clean = sanitize_save_name(name)[:-len(".safetensors")]
    return Path(lora_datasets_dir()) / clean


def resolve_dataset(dataset: str) -> Path:
    """An absolute dataset folder, or a name under models/idlora/lora_datasets."""
    text = (dataset or "").strip()
    if not text:
        raise ValueError("dataset is empty: connect the 'dataset' output of IDLoRA Build LoRA Dataset, or type a "
                         f"dataset name under {lora_datasets_dir()}")
    p = Path(text).expanduser()
    p = p if p.is_absolute() else Path(lora_datasets_dir()) / p
    if not p.is_dir():
        raise FileNotFoundError(f"the LoRA dataset folder {p} does not exist: build it with IDLoRA Build LoRA "
                                f"Dataset, or give the folder's absolute path")
    return p


def dataset_identities(folder: Path) -> list[str]:
    """``name:hash`` of the dataset's finished identities (what the LAE / DiT job will train on)."""
    names = population_key(finished_entries(folder))
    if not names:
        raise ValueError(f"the LoRA dataset folder {folder} has no finished identities: run IDLoRA Build LoRA "
                         f"Dataset on it (and wait for its job) first")
    return names


def resolve_difflora(name: str, what: str = "DiffLoRA") -> str:
    """The full path of a file under models/difflora (or an absolute path)."""
    text = (name or "").strip()
    path = None
    if text and text != NONE:
        path = text if os.path.isabs(text) and os.path.isfile(text) else folder_paths.get_full_path(DIFFLORA, text)
    if path is None:
        raise FileNotFoundError(f"{what} file {text!r} is not in {difflora_dir()}: train one (IDLoRA Train LoRA "
                                f"Autoencoder, then IDLoRA Train DiffLoRA) or put its file there and refresh")
    return path


# -- embedders -------------------------------------------------------------------------------------------------

def require_embedder(handle) -> None:
    if not isinstance(handle, ev.FaceEmbedderHandle):
        raise ValueError("face_embedder is empty: connect an IDLoRA Face Embedder node")


def face_embedder_id(handle: ev.FaceEmbedderHandle) -> str:
    """What the face embeddings are called in a dataset / DiffLoRA file: the ArcFace ONNX and torch backends of one
    pack give the same embeddings, so both are 'arcface (<pack>)'."""
    if handle.backend.startswith("arcface") and handle.source:
        return f"arcface ({Path(handle.source).parent.name})"
    return handle.name


def image_embedder_id(architecture: str, checkpoint: str) -> str:
    return f"open_clip {architecture} {checkpoint}"


def face_fn(handle: ev.FaceEmbedderHandle):
    """``images01 (k, H, W, 3) in [0, 1] -> [vector or None]`` through the handle's embedder."""
    def fn(images01: torch.Tensor) -> list:
        arrays = [(x[..., :3].clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8) for x in images01]
        return handle.embedder.embed(arrays).as_list()
    return fn


def image_fn(scorer):
    """``images01 (k, H, W, 3) in [0, 1] -> (k, D)`` CLIP image embeddings (open_clip, unit length)."""
    def fn(images01: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return scorer.image_features(images01[..., :3].movedim(-1, 1).float()).float().cpu()
    return fn


def _clip_inputs() -> list:
    return [io.Combo.Input("clip_checkpoint", options=clip_files(),
                           tooltip="An open_clip state dict in models/clip: gives the CLIP image embedding of each "
                                   "photo (the paper: CLIP ViT). Sampling must use the same one as the dataset."),
            io.String.Input("architecture", default="ViT-B-32",
                            tooltip="The checkpoint's open_clip model name (as in IDLoRA CLIP Score). A custom one: "
                                    "put <name>.json in models/clip.")]


def base_model_id(model, source: dict) -> str:
    """The base model as recorded for the dataset's content hashes: the model family and the loader nodes that
    made the MODEL (node ids left out, so re-queuing the same graph gives the same string)."""
    prompt = source["prompt"]

    def node(nid: str) -> dict:
        n = prompt[nid]
        return {"class_type": n["class_type"],
                "inputs": {k: {"node": node(str(v[0])), "output": v[1]} if isinstance(v, list) else v
                           for k, v in sorted(n["inputs"].items())}}
    nid, index = source["output"]
    return f"{model_family(model)} " + json.dumps({"node": node(str(nid)), "output": index}, sort_keys=True)


def _wait(job: str | None, what: str) -> None:
    if job:
        log.info("IDLoRA: waiting for %s job %s", what, job)
        wait_for_job(job)


def _submit(task, name: str, text: str, first: str, outputs: list[str] = ()) -> io.NodeOutput:
    job = manager().submit(task, name=name, outputs=outputs)
    return io.NodeOutput(first, job.id, ui={"idlora_job": [job.id], "text": [text]})


# -- 1. the LoRA dataset ---------------------------------------------------------------------------------------

class BuildLoraDataset(JobNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRABuildLoraDataset",
            display_name="IDLoRA Build LoRA Dataset",
            category=CATEGORY,
            description="DiffLoRA's LoRA dataset (Section 3.5): one LoRA per identity folder, all of one "
                        "architecture, with each identity's face and CLIP image embeddings, as a background job "
                        "into models/idlora/lora_datasets/<name>. Identities whose images and settings are "
                        "unchanged are skipped (content hashes), so re-queuing finishes an interrupted build; "
                        "shards split the identities across processes or servers building into one folder.",
            is_output_node=True,
            inputs=[
                *diffusion_inputs("The base model every LoRA is trained on; it is not modified."),
                identity_folder_input("folder"),
                FaceEmbedderHandle.Input("face_embedder", tooltip="From IDLoRA Face Embedder (the paper: ArcFace). "
                                                                  "Sampling must use the same embedder."),
                *_clip_inputs(),
                io.Combo.Input("trainer", options=list(TRAINERS), default=DS.trainer,
                               tooltip="lora: a plain LoRA per identity. meta_lora: Meta-LoRA stage 2 on the "
                                       "connected Meta-Down (fewer steps; rank = r2, targets = the Meta-Down's)."),
                io.Int.Input("steps", default=DS.steps, min=1, max=100000, tooltip="Training steps per identity."),
                io.Int.Input("rank", default=DS.rank, min=1, max=256,
                             tooltip="LoRA rank of every identity (r2 with trainer meta_lora)."),
                io.Combo.Input("targets", options=list(PRESETS), default=DS.targets,
                               tooltip="LoRA target layers of every identity (trainer lora)."),
                io.Float.Input("learning_rate", default=DS.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate of each identity's LoRA."),
                seed_input(DS.seed, "One seed for all identities: every LoRA starts from the same init, so the "
                                    "population shares one coordinate system for the autoencoder."),
                io.Int.Input("resolution", default=DS.resolution, min=64, max=2048, step=64,
                             tooltip="Images are centre-cropped and resized to this square size (the face and CLIP "
                                     "embeddings are taken from these images too)."),
                class_word_input(DS.class_word),
                io.Int.Input("face_keep", default=DS.face_keep, min=0, max=100000, optional=True,
                             tooltip="Face filter: keep at most this many images of each identity, those whose face "
                                     "embedding is most similar to the identity's reference (face_reference); "
                                     "images without a face are dropped first. 0: no limit. The paper keeps the "
                                     "top 85 of 100 by InsightFace similarity."),
                io.Float.Input("face_keep_fraction", default=DS.face_keep_fraction, min=0.01, max=1.0, step=0.01,
                               optional=True,
                               tooltip="Face filter: keep at most this fraction of each identity's images, rounded "
                                       "up (the paper: 0.85). 1: no limit. With face_keep 0 and 1 here, the filter "
                                       "is off and every image is trained on."),
                io.String.Input("face_reference", default=DS.face_reference, optional=True,
                                tooltip="Face filter: what similarity is measured to. 'mean': the normalised mean "
                                        "of the identity's face embeddings. Or the file name (or stem) of a "
                                        "reference image in every identity's folder (the paper: the original photo "
                                        "the identity's images were generated from)."),
                io.Boolean.Input("augment", default=DS.augment, optional=True,
                                 tooltip=f"Crop / flip augmentation (the paper: cropping and flipping): each kept "
                                         f"image gives a centred square crop of "
                                         f"{', '.join(f'{v:.0%}' for v in DS.augment_scales)} of its shorter side, "
                                         f"each flipped with probability {DS.augment_flip:g}. Off: the centre square "
                                         f"only."),
                io.Int.Input("shard_index", default=0, min=0, max=9999,
                             tooltip="This process's shard (from 0): it builds the identities at positions i with "
                                     "i % shard_count == shard_index of the name-sorted list."),
                io.Int.Input("shard_count", default=1, min=1, max=10000,
                             tooltip="Number of shards building into the same folder (1: all identities here)."),
                io.String.Input("name", default="idlora_lora_dataset",
                                tooltip="Dataset and job name: the folder models/idlora/lora_datasets/<name>."),
                MetaDownHandle.Input("meta_down", optional=True,
                                     tooltip="trainer meta_lora: the Meta-Down from IDLoRA Load Meta-Down."),
            ],
            outputs=[io.String.Output(display_name="dataset", tooltip="The dataset folder, for IDLoRA Train LoRA "
                                                                      "Autoencoder / Train DiffLoRA."),
                     JobHandle.Output(display_name="job", tooltip="The build job (empty when every identity is "
                                                                  "finished already); the next node waits for it.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, folder, face_embedder, clip_checkpoint, architecture, trainer, steps, rank,
                targets, learning_rate, seed, resolution, class_word, shard_index, shard_count, name,
                meta_down=None, face_keep=DS.face_keep, face_keep_fraction=DS.face_keep_fraction,
                face_reference=DS.face_reference, augment=DS.augment) -> io.NodeOutput:
        require_embedder(face_embedder)
        meta_down_path = None
        if trainer == "meta_lora":
            if not isinstance(meta_down, dict) or "path" not in meta_down:
                raise ValueError("trainer is 'meta_lora' but meta_down is not connected: connect IDLoRA Load "
                                 "Meta-Down, or use trainer 'lora'")
            meta_down_path, targets = meta_down["path"], meta_down["meta"].get("idlora_targets", targets)
        elif meta_down is not None:
            raise ValueError("meta_down is connected but trainer is 'lora': set trainer to 'meta_lora' to train on "
                             "the Meta-Down, or disconnect it")
        scorer = open_clip_scorer(clip_checkpoint, architecture.strip())
        embedders = {"face": face_embedder_id(face_embedder), "image": image_embedder_id(scorer.arch, clip_checkpoint)}
        cfg = DatasetConfig(trainer=trainer, steps=steps, learning_rate=learning_rate, rank=rank, targets=targets,
                            seed=seed, resolution=resolution, class_word=class_word, embedders=embedders,
                            face_keep=face_keep, face_keep_fraction=face_keep_fraction,
                            face_reference=face_reference.strip(), augment=augment).validate()
        out = dataset_folder(name)
        everyone = scan_identity_folder(dataset_path(folder))
        identities = shard(everyone, shard_index, shard_count)
        source = model_source.record(cls.hidden.prompt, cls.hidden.unique_id)
        extra = file_sha256(meta_down_path) if meta_down_path else ""
        done: list[str] = []

        def skip(n: str, h: str) -> bool:
            if finished(out, n, h):
                done.append(n)
                return True
            return False
        with torch.inference_mode(False):
            diffusion = ComfyDiffusion(model, clip, vae, load="none")
            items = identity_items(diffusion, identities, cfg, face_fn(face_embedder), image_fn(scorer),
                                   base_model_id(model, source), extra, skip)
        text = f"{len(identities)} identities: {len(items)} to train, {len(done)} finished"
        if shard_count > 1:
            text += f" (shard {shard_index} of {shard_count}; {len(everyone)} in the folder)"
        log.info("IDLoRA Build LoRA Dataset %s: %s", out, text)
        if not items:
            return io.NodeOutput(str(out), "", ui={"text": [text]})
        task = LoraDatasetTask(cfg, out, items, source, load_private_model, meta_down_path)
        return _submit(task, out.name, text, str(out))


# -- 2. the LoRA autoencoder -----------------------------------------------------------------------------------

def _dataset_inputs() -> list:
    return [io.String.Input("dataset", default="idlora_lora_dataset",
                            tooltip="A LoRA dataset: the 'dataset' output of IDLoRA Build LoRA Dataset, a folder "
                                    "name under models/idlora/lora_datasets, or an absolute path."),
            JobHandle.Input("job", optional=True,
                            tooltip="The job that must succeed first (the previous node's 'job'); this node waits "
                                    "for it, and stops with its error if it failed.")]


def _preset_input(cls) -> io.Combo.Input:
    paper = ", ".join(f"{k} {v:g}" for k, v in cls.preset_settings("paper").items())
    return io.Combo.Input("preset", options=list(NET_PRESETS), default=NET_PRESETS[0], optional=True,
                          tooltip=f"small: the widgets below as they are (defaults for a CPU and tens of LoRAs). "
                                  f"paper: the paper's settings ({paper}); the widgets of these settings must then "
                                  f"keep their defaults (or the paper's value), the others (steps, seed, ...) apply.")


def _name_input(default: str) -> io.String.Input:
    return io.String.Input("name", default=default, tooltip="Job and file name (models/difflora).")


def _file_job_outputs(file: str, file_tip: str, job_tip: str) -> list:
    """The outputs of a training node: the file it writes under models/difflora, and its job."""
    return [LoraNameOutput(display_name=file, tooltip=f"{file_tip} (written when the job is done)."),
            JobHandle.Output(display_name="job", tooltip=job_tip)]


class TrainLoraAutoencoder(JobNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRATrainLoraAutoencoder",
            display_name="IDLoRA Train LoRA Autoencoder",
            category=CATEGORY,
            description="DiffLoRA's LoRA weights autoencoder (LAE, Section 3.2) on a LoRA dataset, as a background "
                        "job: a 1D-conv encoder / attention decoder, reconstruction + weight-preserved loss. Writes "
                        "models/difflora/<name>.safetensors; its log reports the compression ratio and the "
                        "reconstruction error.",
            is_output_node=True,
            inputs=[
                *_dataset_inputs(),
                _preset_input(LaeTrainConfig),
                io.Int.Input("steps", default=LAE.steps, min=1, max=10_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=LAE.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip=f"AdamW learning rate. The paper: 2e-5 (batch 4, 100k LoRAs; preset paper). "
                                       f"The default {LAE.learning_rate:g} is for a CPU and tens of LoRAs, which "
                                       f"train far too slowly at 2e-5."),
                io.Int.Input("batch_size", default=LAE.batch_size, min=1, max=1024, tooltip="LoRAs per step "
                                                                                            "(paper: 4)."),
                io.Float.Input("wp_weight", default=LAE.wp_weight, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the weight-preserved loss (Eq. 2); 0 turns it off."),
                io.Int.Input("patch", default=LAE.patch, min=1, max=1024,
                             tooltip="Numbers per input patch. The compression ratio is about patch x "
                                     "2^(levels-1) / latent_channels (patch 16: 64x; the paper's ~300x: patch 75, "
                                     "5 levels, 4 latent channels)."),
                io.Int.Input("levels", default=LAE.levels, min=1, max=8,
                             tooltip="Encoder layers, each halving the length after the first (paper: 5)."),
                io.Int.Input("channels", default=LAE.channels, min=8, max=1024, step=8,
                             tooltip="Feature channels (a multiple of 8 and of 4 heads)."),
                io.Int.Input("latent_channels", default=LAE.latent_channels, min=1, max=64,
                             tooltip="Channels of the latent the DiT denoises."),
                seed_input(LAE.seed),
                _name_input("idlora_lae"),
            ],
            outputs=_file_job_outputs("lae", "The LAE file under models/difflora, for IDLoRA Train DiffLoRA",
                                      "The LAE job; IDLoRA Train DiffLoRA waits for it."),
        )

    @classmethod
    def execute(cls, dataset, steps, learning_rate, batch_size, wp_weight, patch, levels, channels, latent_channels,
                seed, name, job=None, preset=NET_PRESETS[0]) -> io.NodeOutput:
        cfg = LaeTrainConfig.from_widgets(preset, steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                                          wp_weight=wp_weight, patch=patch, levels=levels, channels=channels,
                                          latent_channels=latent_channels, seed=seed)
        cfg.lae_config(1)  # channels / heads errors now, not in the job
        sanitize_save_name(name)  # a bad name fails now, before the wait
        _wait(job, "the LoRA dataset")
        folder = resolve_dataset(dataset)
        names = dataset_identities(folder)
        stem, (out,) = claim_output(name, difflora_dir())
        fname = f"{stem}.safetensors"
        task = LaeTask(cfg, str(folder), out, fname, names, torch_device())
        return _submit(task, stem, f"LAE on {len(names)} LoRAs of {folder.name}", fname, [out])


# -- 3. the DiT ------------------------------------------------------------------------------------------------

class TrainDiffLora(JobNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRATrainDiffLoRA",
            display_name="IDLoRA Train DiffLoRA",
            category=CATEGORY,
            description="DiffLoRA's DiT (Sections 3.3-3.4) on the LAE latents of a LoRA dataset, as a background "
                        "job: adaLN-Zero conditioning on the timestep and the mixed face / CLIP image features, x0 "
                        "objective, 1000-step linear schedule. Writes models/difflora/<name>.safetensors (LAE + DiT: "
                        "the file IDLoRA Load DiffLoRA reads).",
            is_output_node=True,
            inputs=[
                *_dataset_inputs(),
                io.Combo.Input("lae", options=difflora_files(),
                               tooltip="The LAE file (models/difflora) trained on this dataset; link the 'lae' "
                                       "output of IDLoRA Train LoRA Autoencoder, or pick a file."),
                _preset_input(DiTTrainConfig),
                io.Int.Input("steps", default=DIT.steps, min=1, max=10_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=DIT.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate (paper: 1e-4)."),
                io.Int.Input("batch_size", default=DIT.batch_size, min=1, max=4096, tooltip="Latents per step "
                                                                                            "(paper: 32)."),
                io.Int.Input("hidden", default=DIT.hidden, min=8, max=4096,
                             tooltip="Transformer width (paper: 1454); a multiple of heads."),
                io.Int.Input("depth", default=DIT.depth, min=1, max=64, tooltip="Transformer blocks (paper: 16)."),
                io.Int.Input("heads", default=DIT.heads, min=1, max=64,
                             tooltip="Attention heads. The paper gives none; its 1454 = 2 x 727 allows 1, 2, 727 "
                                     "or 1454 (preset paper: 2)."),
                seed_input(DIT.seed),
                _name_input("idlora_difflora"),
            ],
            outputs=_file_job_outputs("difflora", "The DiffLoRA file under models/difflora",
                                      "The DiT job: IDLoRA Wait for Job (which = difflora) -> IDLoRA Load DiffLoRA."),
        )

    @classmethod
    def execute(cls, dataset, lae, steps, learning_rate, batch_size, hidden, depth, heads, seed, name,
                job=None, preset=NET_PRESETS[0]) -> io.NodeOutput:
        cfg = DiTTrainConfig.from_widgets(preset, steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                                          hidden=hidden, depth=depth, heads=heads, seed=seed)
        DiTConfig(1, 1, 1, 1, cfg.hidden, cfg.depth, cfg.heads).validate()  # hidden / heads errors now, not in the job
        sanitize_save_name(name)  # a bad name fails now, before the wait
        _wait(job, "the LAE")
        folder = resolve_dataset(dataset)
        names = dataset_identities(folder)
        lae_path = resolve_difflora(lae, "LAE")
        stem, (out,) = claim_output(name, difflora_dir())  # never the LAE's file: that one exists
        fname = f"{stem}.safetensors"
        task = DiffLoraTask(cfg, str(folder), lae_path, out, fname, names, torch_device())
        return _submit(task, stem, f"DiT on {len(names)} LoRAs of {folder.name}", fname, [out])


# -- 4. load ---------------------------------------------------------------------------------------------------

class LoadDiffLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRALoadDiffLoRA",
            display_name="IDLoRA Load DiffLoRA",
            category=CATEGORY,
            description="Read a DiffLoRA file (LAE + DiT, from IDLoRA Train DiffLoRA) from models/difflora onto "
                        "the torch device.",
            inputs=[io.Combo.Input("difflora_name", options=difflora_files(),
                                   tooltip="A DiffLoRA file in models/difflora, or the 'lora_name' of IDLoRA Wait for "
                                           "Job (which = difflora).")],
            outputs=[DiffLoraHandle.Output(display_name="difflora", tooltip="For IDLoRA Sample LoRA from Face.")],
        )

    @classmethod
    def fingerprint_inputs(cls, difflora_name: str | None = None, **kwargs):
        if difflora_name is None:  # linked: the upstream node decides
            return ""
        try:
            path = resolve_difflora(difflora_name)
        except FileNotFoundError:
            return difflora_name
        return f"{path} {os.path.getmtime(path)}"  # a retrained file of the same name is read again

    @classmethod
    def execute(cls, difflora_name: str) -> io.NodeOutput:
        path = resolve_difflora(difflora_name)
        model = load_difflora(path, torch_device())
        if model.dit is None:
            raise DiffLoraFileError(f"{difflora_name} holds only a LoRA autoencoder (written by IDLoRA Train LoRA "
                                    f"Autoencoder): train the DiT on it with IDLoRA Train DiffLoRA and load the file "
                                    f"that job writes")
        model.file_name = difflora_name
        meta, spec = model.meta, model.layout.layers[0]
        emb = meta.get("embedders") or {}
        text = (f"{difflora_name}: {len(model.layout.layers)} layers, rank {spec.rank}, base "
                f"{meta.get('base_model') or '?'}, {meta.get('identities', '?')} identities; face "
                f"{emb.get('face', '?')} ({model.dit.cfg.face_dim}-d), image {emb.get('image', '?')} "
                f"({model.dit.cfg.image_dim}-d)")
        return io.NodeOutput(model, ui={"text": [text]})


# -- 5. sample -------------------------------------------------------------------------------------------------

def check_embedders(model: DiffLora, face: torch.Tensor, image: torch.Tensor, face_id: str, image_id: str) -> None:
    """A different embedding size is an error naming both embedders; a different name of the same size a
    warning (e.g. another file of one architecture)."""
    trained = model.meta.get("embedders") or {}
    for what, vec, dim, now in (("face", face, model.dit.cfg.face_dim, face_id),
                                ("image", image, model.dit.cfg.image_dim, image_id)):
        was = trained.get(what) or "an unrecorded embedder"
        if int(vec.shape[1]) != dim:
            raise ValueError(f"the {what} embedder {now} gives {int(vec.shape[1])}-d embeddings, but this DiffLoRA "
                             f"was trained on {dim}-d {what} embeddings from {was}: use the {what} embedder the "
                             f"DiffLoRA was trained with")
        if trained.get(what) and trained[what] != now:
            log.warning("IDLoRA Sample LoRA from Face: the %s embedder is %s, the DiffLoRA was trained with %s (same "
                        "size %d): the LoRA may not match the face", what, now, was, dim)


class SampleLoraFromFace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRASampleLoraFromFace",
            display_name="IDLoRA Sample LoRA from Face",
            category=CATEGORY,
            description="DiffLoRA inference: the face photo's face and CLIP image embeddings condition the DiT, DDIM "
                        "sampling gives an LAE latent, the LAE decodes it to LoRA weights, and the LoRA patches a "
                        "clone of the model. Seconds, no training; optionally saved as a kohya LoRA.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model the DiffLoRA was trained on; a patched clone is "
                                                "returned."),
                DiffLoraHandle.Input("difflora", tooltip="From IDLoRA Load DiffLoRA."),
                io.Image.Input("image", tooltip="The face photo (the first image of the batch in which a face is "
                                                "found)."),
                FaceEmbedderHandle.Input("face_embedder", tooltip="The face embedder the DiffLoRA was trained with "
                                                                  "(IDLoRA Face Embedder)."),
                *_clip_inputs(),
                io.Int.Input("steps", default=100, min=1, max=1000,
                             tooltip="DDIM steps (the paper: 100); fewer is faster."),
                seed_input(tooltip="Seed of the initial noise: a seed always gives the same LoRA."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Multiplier of the LoRA update on the model."),
                io.String.Input("save_name", default="", optional=True,
                                tooltip="Empty: the LoRA is not saved. Else it is written (replacing a file of that "
                                        "name) to models/loras/idlora/<save_name>.safetensors in kohya format, for "
                                        "the stock LoraLoader."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched clone."),
                     LoraHandle.Output(display_name="lora", tooltip="The sampled LoRA (IDLoRA Save / Apply LoRA)."),
                     LoraNameOutput(display_name="lora_name", tooltip="The saved file under models/loras, for the "
                                                                      "stock LoraLoader; empty when not saved.")],
        )

    @classmethod
    def execute(cls, model, difflora, image, face_embedder, clip_checkpoint, architecture, steps, seed, strength,
                save_name="") -> io.NodeOutput:
        start = time.perf_counter()
        if not isinstance(difflora, DiffLora):
            raise ValueError("difflora is empty: connect IDLoRA Load DiffLoRA")
        if difflora.dit is None:
            raise DiffLoraFileError("this DiffLoRA holds only a LoRA autoencoder: load a file written by IDLoRA "
                                    "Train DiffLoRA")
        require_embedder(face_embedder)
        base, family = difflora.meta.get("base_model"), model_family(model)
        if base and base != family:
            raise ValueError(f"this DiffLoRA was trained on base model {base!r}, this model is {family!r}: use the "
                             f"model it was trained on, or train a DiffLoRA for this one")
        fname = sanitize_save_name(save_name) if save_name and save_name.strip() else ""
        scorer = open_clip_scorer(clip_checkpoint, architecture.strip())
        face, img = reference_embeddings(image, face_fn(face_embedder), image_fn(scorer), "the 'image' input")
        check_embedders(difflora, face, img, face_embedder_id(face_embedder),
                        image_embedder_id(scorer.arch, clip_checkpoint))
        weights = difflora.sample(face, img, steps, seed)[0]
        dev = next(difflora.dit.parameters()).device
        s_img, s_face = difflora.dit.mif.scores(face.float().to(dev), img.float().to(dev))[0].tolist()
        bundle = difflora.bundle(weights, {"idlora_difflora": getattr(difflora, "file_name", ""),
                                           "idlora_seed": str(seed), "idlora_ddim_steps": str(steps)},
                                  stems=kohya_stems(model))
        patched, report = apply_lora(model, bundle, strength)
        lora_name, ui = "", {}
        if fname:
            save_bundle(os.path.join(idlora_lora_dir(), fname), bundle)
            lora_name = f"{LORA_SUBDIR}/{fname}"
            ui["lora_files"] = [lora_name]
        took = time.perf_counter() - start
        text = (f"LoRA sampled and applied in {took:.2f} s ({steps} DDIM steps, seed {seed}, "
                f"{report.matched} modules); MIF gate S_face {s_face:.3f}, S_img {s_img:.3f}"
                + (f"; saved {lora_name}" if lora_name else ""))
        log.info("IDLoRA Sample LoRA from Face: %s", text)
        return io.NodeOutput(patched, bundle, lora_name, ui={"text": [text], **ui})


NODES = [BuildLoraDataset, TrainLoraAutoencoder, TrainDiffLora, LoadDiffLora, SampleLoraFromFace]
