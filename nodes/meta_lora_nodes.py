"""Meta-LoRA nodes: stage-1 meta-training (job), Load Meta-Down, stage-2 personalization, augmentation preview."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

import folder_paths
from comfy_api.latest import io

from ..models.lora import PRESETS
from ..training import evaluate as ev
from ..training.diffusion import lora_key_map
from ..training.lora_format import sanitize_save_name
from ..training.meta_augment import AugmentConfig, augment, largest_face_box, preview_sheet
from ..training.lora_format import LoraBundle
from ..training.meta_lora import (STAGE1_PRESETS, STAGE2_METHODS, MetaStage1Config, MetaStage2Config,
                                  check_meta_down, load_meta_down, match_init_lora, stage2_trainer)
from ..training.meta_lora_data import (encode_crops, encode_identity_set, labels_to_identities, load_images,
                                       scan_identity_folder)
from ..training.meta_lora_job import MetaPersonalizeTask, MetaStage1Task
from . import model_source
from .comfy_adapter import ComfyDiffusion, check_targets_fit
from .inputs import (BackgroundNode, JobNode, class_word_input, diffusion_inputs, identity_folder_input,
                     seed_input)
from .job_service import claim_output, load_private_model, manager
from .lora_nodes import background_inputs, check_mode, lora_job_outputs, progress_callback, start_lora_job
from .types import JobHandle, LoraHandle, LoraNameOutput, MetaDownHandle

log = logging.getLogger(__name__)
CATEGORY = "IDLoRA/meta-lora"
FOLDER = "idlora_meta_down"
S1, S2, AUG = MetaStage1Config(), MetaStage2Config(), AugmentConfig()


def meta_down_dir() -> str:
    """models/idlora/meta_down, registered with ComfyUI's folder list."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, "idlora", "meta_down")],
                                                       {".safetensors"})
    return folder_paths.get_folder_paths(FOLDER)[0]


def meta_down_files() -> list[str]:
    meta_down_dir()
    return folder_paths.get_filename_list(FOLDER) or ["none"]


def dataset_path(folder: str) -> Path:
    """An absolute folder, or one relative to ComfyUI's input folder."""
    p = Path(folder.strip()).expanduser()
    return p if p.is_absolute() else Path(folder_paths.get_input_directory()) / p


def photo_crops(photo: torch.Tensor, cfg: AugmentConfig):
    """(crops as uint8 arrays, Crop plans, face box, source uint8) of the first image of a batch."""
    rgb = (photo[0, ..., :3].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    box = largest_face_box(ev.make_detector("retinaface"), rgb, name="the 'photo' input")
    crops, plans = augment(rgb, box, cfg)
    return crops, plans, box, rgb


def _aug_inputs():
    return [io.Int.Input("max_images", default=AUG.max_images, min=1, max=25, optional=True,
                         tooltip="Augmented crops: face-centred at 16:9, 4:3, 1:1, 3:4, 9:16, short side f_long x "
                                 "{1.5, 2, 2.5, 3.5, 4.5} (the closest feasible size when the photo is too small), "
                                 "random flips. The paper uses up to 25."),
            io.Int.Input("resolution", default=512, min=64, max=2048, step=64, optional=True,
                         tooltip="Each crop is resized to about resolution x resolution pixels (sides multiples "
                                 "of 64).")]


def _stage1_preset_input() -> io.Combo.Input:
    paper = ", ".join(f"{k} {v:g}" for k, v in MetaStage1Config.preset_settings("paper").items())
    return io.Combo.Input("preset", options=list(STAGE1_PRESETS), default=STAGE1_PRESETS[0], optional=True,
                          tooltip=f"small: the widgets below as they are (defaults for a CPU and a few identities). "
                                  f"paper: the paper's stage 1 ({paper}; q_warmup = 0.4 x 2500 = 1000); the widgets "
                                  f"of these settings must then keep their defaults (or the paper's value), the "
                                  f"others (targets, seed, ...) apply.")


class MetaStage1(JobNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAMetaLoRAStage1",
            display_name="IDLoRA Meta-LoRA Stage 1",
            category=CATEGORY,
            description="Meta-train a shared LoRA Meta-Down over many identities (Meta-LoRA Algorithm 1) as a "
                        "background job: buckets of identities, a warm-up of each bucket in which only their "
                        "Mid/Up learn, the other identities kept off the device. Writes models/idlora/meta_down/"
                        "<name>.safetensors. For several GPUs use tools/meta_lora_stage1.py under torchrun.",
            is_output_node=True,
            inputs=[
                *diffusion_inputs("The base model; it is not modified."),
                identity_folder_input("dataset"),
                class_word_input("person"),
                io.Int.Input("image_size", default=512, min=64, max=2048, step=64,
                             tooltip="Images are centre-cropped and resized to this square size."),
                _stage1_preset_input(),
                io.Int.Input("r1", default=S1.r1, min=1, max=1024, tooltip="Meta-Down output rank (paper: 128)."),
                io.Int.Input("r2", default=S1.rank, min=1, max=256, tooltip="Mid output rank (paper: 1)."),
                io.Combo.Input("targets", options=list(PRESETS), default=S1.targets, tooltip="LoRA target layers."),
                io.Int.Input("steps", default=S1.steps, min=1, max=10_000_000,
                             tooltip="Total iterations q_total (paper: 50000)."),
                io.Float.Input("learning_rate", default=S1.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate (paper: 4e-4)."),
                io.Int.Input("batch_size", default=S1.batch_size, min=1, max=64, tooltip="Paper: 4."),
                io.Int.Input("identities_per_bucket", default=S1.identities_per_bucket, min=1, max=10000,
                             tooltip="Identities whose Mid/Up are on the device at a time."),
                io.Int.Input("bucket_steps", default=0, min=0, max=1_000_000,
                             tooltip="q_bucket. 0: each image of a bucket is used about 10 times."),
                io.Float.Input("warmup_fraction", default=S1.warmup_fraction, min=0.0, max=0.99, step=0.05,
                               tooltip="q_warmup = fraction x q_bucket (paper: 0.4)."),
                seed_input(),
                io.String.Input("name", default="idlora_meta_down", tooltip="Job and file name."),
                io.Image.Input("images", optional=True, tooltip="Instead of a folder: an IMAGE batch ..."),
                io.String.Input("labels", optional=True, default="",
                                tooltip="... with one identity label per image (lines or commas)."),
            ],
            outputs=[JobHandle.Output(display_name="job", tooltip="Connect to IDLoRA Wait for Job (which = "
                                                                  "meta_down)."),
                     LoraNameOutput(display_name="meta_down_name", tooltip="The file IDLoRA Load Meta-Down reads "
                                                                          "once the job is done.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, class_word, image_size, r1, r2, targets, steps, learning_rate,
                batch_size, identities_per_bucket, bucket_steps, warmup_fraction, seed, name, images=None,
                labels="", preset=STAGE1_PRESETS[0]) -> io.NodeOutput:
        cfg = MetaStage1Config.from_widgets(preset, steps=steps, learning_rate=learning_rate, rank=r2, r1=r1,
                                            targets=targets, batch_size=batch_size,
                                            identities_per_bucket=identities_per_bucket, bucket_steps=bucket_steps,
                                            warmup_fraction=warmup_fraction, seed=seed)
        check_targets_fit(model, targets)  # before the images are encoded and the job starts
        if images is not None:
            identities = [(n, _resize(x, image_size)) for n, x in labels_to_identities(images, labels)]
        else:
            identities = [(n, load_images(paths, image_size)) for n, paths in scan_identity_folder(dataset_path(dataset))]
        sanitize_save_name(name)  # a bad name fails now, before the encoding
        source = model_source.record(cls.hidden.prompt, cls.hidden.unique_id)
        with torch.inference_mode(False):
            data = encode_identity_set(ComfyDiffusion(model, clip, vae, load="none"), identities, class_word, seed)
        stem, (path,) = claim_output(name, meta_down_dir())
        fname = f"{stem}.safetensors"
        task = MetaStage1Task(cfg, path, fname, source, load_private_model, data)
        job = manager().submit(task, name=stem, outputs=[path])
        return io.NodeOutput(job.id, fname, ui={"idlora_job": [job.id]})


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    x = images[..., :3].movedim(-1, 1)
    s = min(x.shape[-2:])
    top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
    x = torch.nn.functional.interpolate(x[..., top:top + s, left:left + s], size=(size, size), mode="bicubic",
                                        antialias=True, align_corners=False)
    return x.clamp(0, 1).movedim(1, -1)


class LoadMetaDown(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRALoadMetaDown",
            display_name="IDLoRA Load Meta-Down",
            category=CATEGORY,
            description="Read a Meta-Down file (stage 1's output) from models/idlora/meta_down/.",
            inputs=[io.Combo.Input("meta_down_name", options=meta_down_files(),
                                   tooltip="A Meta-Down file from IDLoRA Meta-LoRA Stage 1 (or the CLI).")],
            outputs=[MetaDownHandle.Output(display_name="meta_down", tooltip="For IDLoRA Meta-LoRA Personalize.")],
        )

    @classmethod
    def execute(cls, meta_down_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, meta_down_name) if meta_down_name != "none" else None
        if path is None:
            raise FileNotFoundError(f"Meta-Down {meta_down_name!r} is not in {meta_down_dir()}: run IDLoRA Meta-LoRA "
                                    f"Stage 1 (or tools/meta_lora_stage1.py) and put its file there")
        weights, meta = load_meta_down(path)
        text = f"{meta_down_name}: r1 {meta['idlora_r1']}, {len(weights)} layers, base {meta.get('idlora_base_model')}"
        return io.NodeOutput({"weights": weights, "meta": meta, "path": path, "name": meta_down_name},
                             ui={"text": [text]})


class MetaPersonalize(BackgroundNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAMetaLoRAPersonalize",
            display_name="IDLoRA Meta-LoRA Personalize",
            category=CATEGORY,
            description="Meta-LoRA stage 2 (Algorithm 2): fit Mid and Up to one photo's face-centred crops with the "
                        "Meta-Down frozen, then collapse to a standard rank-r2 LoRA (kohya format). method lora_aug: "
                        "the paper's baseline, a plain rank-r2 LoRA on the same crops.",
            inputs=[
                *diffusion_inputs("The base model the Meta-Down was trained on.", "Encodes the prompt.",
                                  "Encodes the crops."),
                io.Image.Input("photo", tooltip="One photo of the person (the first image of the batch is used)."),
                MetaDownHandle.Input("meta_down", tooltip="From IDLoRA Load Meta-Down."),
                io.Combo.Input("method", options=list(STAGE2_METHODS), default=STAGE2_METHODS[0], optional=True,
                               tooltip="meta_lora: Mid and Up on the frozen Meta-Down, collapsed to a rank-r2 LoRA. "
                                       "lora_aug: the paper's baseline 'LoRA + augmented inputs', a plain rank-r2 "
                                       "LoRA (Down and Up train) on the same crops, layers and settings; the "
                                       "Meta-Down gives only its layer list."),
                io.String.Input("prompt", default="a photo of sks person", tooltip="Prompt of every crop."),
                io.Int.Input("r2", default=S2.rank, min=1, max=256, tooltip="Rank of Mid, and of the LoRA "
                                                                           "(paper: 1)."),
                io.Int.Input("steps", default=S2.steps, min=1, max=100000, tooltip="Paper: 375 (LoRA needs 625)."),
                io.Float.Input("learning_rate", default=S2.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Paper: 4e-4."),
                seed_input(tooltip="Seed of init, crops order, noise."),
                *_aug_inputs(),
                *background_inputs("idlora_meta_lora"),
                LoraHandle.Input("init_lora", optional=True,
                                 tooltip="Optional: start from this LoRA instead of from scratch (e.g. a "
                                         "DiffLoRA-sampled LoRA, refined with a few steps). It needs rank r2 and "
                                         "exactly the Meta-Down's layers. Up = its up (scaled), Mid = its down "
                                         "projected onto the Meta-Down (least squares): the start equals it when "
                                         "its down lies in the Meta-Down's row space, otherwise its projection; "
                                         "the projection error is shown."),
            ],
            outputs=lora_job_outputs("collapsed"),
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, photo, meta_down, prompt, r2, steps, learning_rate, seed, max_images=25,
                resolution=512, mode="blocking", name="idlora_meta_lora", init_lora=None,
                method=STAGE2_METHODS[0]) -> io.NodeOutput:
        if not isinstance(meta_down, dict) or "weights" not in meta_down:
            raise ValueError("meta_down is empty: connect IDLoRA Load Meta-Down")
        if method not in STAGE2_METHODS:
            raise ValueError(f"method = {method!r} is invalid: use one of {STAGE2_METHODS}")
        if method == "lora_aug" and init_lora is not None:
            raise ValueError("init_lora is connected, but method = 'lora_aug' (the plain LoRA baseline) starts from "
                             "scratch: set method to 'meta_lora', or leave init_lora unconnected")
        cfg = MetaStage2Config(steps=steps, learning_rate=learning_rate, rank=r2, seed=seed,
                               targets=meta_down["meta"].get("idlora_targets", "attn")).validate()
        aug = AugmentConfig(max_images=max_images, out_area=resolution * resolution, seed=seed).validate()
        if init_lora is not None and not isinstance(init_lora, LoraBundle):
            raise ValueError(f"init_lora is a {type(init_lora).__name__}, not a LoRA: connect an IDLoRA LoRA output "
                             f"(e.g. IDLoRA DiffLoRA Sample or IDLoRA Load LoRA), or leave it unconnected")
        crops, _, _, _ = photo_crops(photo, aug)
        with torch.inference_mode(False):
            if check_mode(mode) == "background":
                diffusion = ComfyDiffusion(model, clip, vae, load="none")
                init = None
                if init_lora is not None:  # checked now, stored by module name in the job's data.pt
                    targets = check_meta_down(meta_down["weights"], meta_down["meta"], diffusion)
                    init = LoraBundle(match_init_lora(init_lora, targets, meta_down["weights"], cfg.rank,
                                                      key_map=lora_key_map(diffusion)))
                if method == "lora_aug":
                    check_meta_down(meta_down["weights"], meta_down["meta"], diffusion)  # its layers fit: now
                return cls.start_job(cfg, meta_down, encode_crops(diffusion, crops, prompt), name, init, method)
            diffusion = ComfyDiffusion(model, clip, vae)
            data = encode_crops(diffusion, crops, prompt)
            trainer = stage2_trainer(method, diffusion, data, cfg, meta_down["weights"], meta_down["meta"], init_lora)
            bundle = trainer.run(progress_callback(cfg.steps))
        text = f"{len(crops)} crops" + (", plain LoRA + augmented inputs (lora_aug)" if method == "lora_aug" else "")
        if getattr(trainer, "init_report", None):
            text += (f"; started from init_lora, relative projection error {trainer.init_report['delta_error']:.2e}"
                     f" (worst layer down {trainer.init_report['down_error']:.2e})")
        return io.NodeOutput(bundle, {"loss": trainer.losses}, "", ui={"text": [text]})

    @classmethod
    def start_job(cls, cfg, meta_down, data, name, init_lora=None, method=STAGE2_METHODS[0]) -> io.NodeOutput:
        return start_lora_job(cls, name, lambda path, lora_name, source: MetaPersonalizeTask(
            cfg, meta_down["path"], path, lora_name, source, load_private_model, data, init_lora=init_lora,
            method=method))


class MetaAugmentPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAMetaLoRAAugmentPreview",
            display_name="IDLoRA Meta-LoRA Augment Preview",
            category=CATEGORY,
            description="Show the crops Meta-LoRA stage 2 trains on: the photo with every crop box and the face box, "
                        "and the crops themselves.",
            inputs=[io.Image.Input("photo", tooltip="The person's photo."), *_aug_inputs(),
                    seed_input(optional=True, tooltip="Seed of the flips.")],
            outputs=[io.Image.Output(display_name="boxes", tooltip="The photo with the crop boxes."),
                     io.Image.Output(display_name="crops", tooltip="The crops, letterboxed to one square size."),
                     io.String.Output(display_name="summary", tooltip="Sizes, clamped and flipped crops.")],
        )

    @classmethod
    def execute(cls, photo, max_images=25, resolution=512, seed=0) -> io.NodeOutput:
        aug = AugmentConfig(max_images=max_images, out_area=resolution * resolution, seed=seed).validate()
        crops, plans, box, rgb = photo_crops(photo, aug)
        sheet = torch.from_numpy(preview_sheet(rgb, plans, box)).float()[None] / 255.0
        side = max(max(c.shape[:2]) for c in crops)
        tiles = torch.zeros(len(crops), side, side, 3)
        for i, c in enumerate(crops):
            y, x = (side - c.shape[0]) // 2, (side - c.shape[1]) // 2
            tiles[i, y:y + c.shape[0], x:x + c.shape[1]] = torch.from_numpy(c).float() / 255.0
        lines = [f"{len(crops)} crops from face box {tuple(round(v) for v in box)}"]
        lines += [f"{p.ratio[0]}:{p.ratio[1]} x{p.scale}: {p.width}x{p.height}" + (" clamped" if p.clamped else "")
                  + (" flipped" if p.flipped else "") for p in plans]
        text = "\n".join(lines)
        return io.NodeOutput(sheet, tiles, text, ui={"text": [text]})


NODES = [MetaStage1, LoadMetaDown, MetaPersonalize, MetaAugmentPreview]
