"""The Meta-LoRA evaluation loop as a node (training/meta_lora_eval.py; the command line: tools/meta_lora_eval.py)."""
from __future__ import annotations

import os

import comfy.samplers
import folder_paths
import torch
from comfy_api.latest import io

from ..training import evaluate as ev
from ..training.meta_lora import STAGE2_METHODS
from ..training.meta_lora_eval import (DEFAULT_PROMPTS, PERCENT_HEADER, MetaEvalConfig, evaluate_meta_lora,
                                       markdown_table, parse_prompts, parse_steps, percent_rows, write_eval_report)
from .comfy_adapter import ComfyDiffusion
from .comfy_sampling import ComfyGenerator
from .face_nodes import NO_CLIP, REPORT_SUBDIR, clip_files, open_clip_scorer, to_image
from .inputs import identity_folder_input, seed_input
from .meta_lora_nodes import CATEGORY, _aug_inputs, dataset_path
from .types import FaceEmbedderHandle, MetaDownHandle

E = MetaEvalConfig()
BOTH = " + ".join(STAGE2_METHODS)
METHOD_CHOICES = (BOTH, *STAGE2_METHODS)


class MetaEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAMetaLoRAEvaluate",
            display_name="IDLoRA Meta-LoRA Evaluate",
            category=CATEGORY,
            description="Meta-LoRA's evaluation loop (the paper's Sec. 4.3 and Algorithm 3): for each identity folder, "
                        "fine-tune on ONE photo (Meta-LoRA stage 2 on the Meta-Down, and the baseline LoRA + "
                        "augmented inputs), generate with the prompts at each step count (snapshots of one run), and "
                        "score R-FaceSim against the identity's OTHER photos (the training photo excluded) and CLIP-T. "
                        "Writes output/idlora/reports/<name>.json, .csv and .md: one row per (method, steps).",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model the Meta-Down was trained on; it is not modified."),
                io.Clip.Input("clip", tooltip="Encodes the training and generation prompts."),
                io.Vae.Input("vae", tooltip="Encodes the crops, decodes the generated images."),
                MetaDownHandle.Input("meta_down", tooltip="From IDLoRA Load Meta-Down."),
                FaceEmbedderHandle.Input("embedder", tooltip="From IDLoRA Face Embedder (dlib is built in; the paper "
                                                             "used a VGGFace2 Inception-ResNet)."),
                identity_folder_input("dataset"),
                io.Combo.Input("methods", options=list(METHOD_CHOICES), default=BOTH,
                               tooltip="meta_lora: stage 2 on the Meta-Down. lora_aug: the paper's baseline, a plain "
                                       "rank-r2 LoRA on the same crops and layers."),
                io.String.Input("steps", default=", ".join(map(str, E.steps)),
                                tooltip="Step counts evaluated, comma-separated (the paper: 250, 375, 500, 625, 750). "
                                        "One run per identity and method; the LoRA is kept at each count. 0: the "
                                        "base model."),
                io.String.Input("prompts", multiline=True, default="\n".join(DEFAULT_PROMPTS),
                                tooltip="One prompt per line; '{}' is the subject ('sks <class word>' to generate, "
                                        "the class word alone for CLIP-T). Defaults after the paper's R-FaceSim "
                                        "prompts (frontal, unoccluded faces)."),
                io.String.Input("class_word", default=E.class_word, tooltip="The subject's class word."),
                io.String.Input("reference", default="",
                                tooltip="The training photo's file name or stem in every identity folder; empty: "
                                        "each folder's first photo by name. The others are scored against."),
                io.Int.Input("r2", default=E.rank, min=1, max=256, tooltip="Rank of both methods' LoRAs (paper: 1)."),
                io.Float.Input("learning_rate", default=E.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Both methods (paper: 4e-4)."),
                seed_input(tooltip="Seed of the training runs and of the first image (the same for every method and "
                                   "step count)."),
                *_aug_inputs(),
                io.Int.Input("images_per_prompt", default=E.images_per_prompt, min=1, max=64,
                             tooltip="Images per prompt (seeds seed, seed + 1, ...)."),
                io.Int.Input("width", default=E.width, min=16, max=4096, step=16, tooltip="Generated image width."),
                io.Int.Input("height", default=E.height, min=16, max=4096, step=16, tooltip="Generated image height."),
                io.Int.Input("sample_steps", default=E.sample_steps, min=1, max=1000, tooltip="Sampling steps "
                                                                                             "(paper: 30)."),
                io.Float.Input("cfg", default=E.cfg, min=0.0, max=100.0, step=0.1,
                               tooltip="CFG scale; on Flux-dev its guidance, with CFG 1 (the paper: 3.5)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default=E.sampler,
                               tooltip="KSampler's sampler."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default=E.scheduler,
                               tooltip="KSampler's scheduler."),
                io.Combo.Input("clip_checkpoint", options=[NO_CLIP, *[f for f in clip_files() if f != NO_CLIP]],
                               default=NO_CLIP, optional=True,
                               tooltip="An open_clip checkpoint in models/clip for CLIP-T (the paper: ViT-B/32); "
                                       "none: CLIP-T is marked not computed."),
                io.String.Input("clip_architecture", default="ViT-B-32", optional=True,
                                tooltip="The checkpoint's open_clip model name."),
                io.String.Input("name", default="idlora_meta_lora_eval", tooltip="Report file name."),
            ],
            outputs=[io.Image.Output(display_name="table", tooltip="The table: one row per (method, steps), x100."),
                     io.String.Output(display_name="summary", tooltip="The table as Markdown, with notes."),
                     io.Image.Output(display_name="images",
                                     tooltip="Every generated image, method by method, step count by step count.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, meta_down, embedder, dataset, methods, steps, prompts, class_word, reference,
                r2, learning_rate, seed, images_per_prompt, width, height, sample_steps, cfg, sampler_name, scheduler,
                name, max_images=25, resolution=512, clip_checkpoint=NO_CLIP,
                clip_architecture="ViT-B-32") -> io.NodeOutput:
        if not isinstance(meta_down, dict) or "weights" not in meta_down:
            raise ValueError("meta_down is empty: connect IDLoRA Load Meta-Down")
        if not isinstance(embedder, ev.FaceEmbedderHandle):
            raise ValueError("embedder is empty: connect an IDLoRA Face Embedder node")
        if methods not in METHOD_CHOICES:
            raise ValueError(f"methods = {methods!r} is invalid: use one of {METHOD_CHOICES}")
        stem = ev.sanitize_report_name(name)
        settings = MetaEvalConfig(
            methods=STAGE2_METHODS if methods == BOTH else (methods,), steps=parse_steps(steps),
            prompts=parse_prompts(prompts), class_word=class_word.strip(), reference=reference.strip(), rank=r2,
            learning_rate=learning_rate, max_images=max_images, resolution=resolution, seed=seed,
            images_per_prompt=images_per_prompt, width=width, height=height, sample_steps=sample_steps, cfg=cfg,
            sampler=sampler_name, scheduler=scheduler).validate()
        scorer = None if clip_checkpoint in (NO_CLIP, "", None) else \
            open_clip_scorer(clip_checkpoint, clip_architecture.strip())
        generate = ComfyGenerator(model, clip, vae, width, height, sample_steps, cfg, sampler_name, scheduler)
        with torch.inference_mode(False):
            report = evaluate_meta_lora(
                lambda: ComfyDiffusion(model, clip, vae), dataset_path(dataset), meta_down["weights"],
                meta_down["meta"], embedder.embedder, generate, settings, ev.make_detector("retinaface"),
                scorer.image_features if scorer else None, scorer.text_features if scorer else None,
                clip_name=f"open_clip {clip_architecture} ({clip_checkpoint})" if scorer else "", keep_images=True)
        folder = os.path.join(folder_paths.get_output_directory(), REPORT_SUBDIR)
        paths = write_eval_report(report, folder, stem)
        table = ev.render_table(PERCENT_HEADER, percent_rows(report), title=f"Meta-LoRA evaluation: {stem}")
        text = markdown_table(report)
        images = torch.cat(list(report["images"].values()))
        rel = [os.path.relpath(p, folder_paths.get_output_directory()) for p in paths]
        return io.NodeOutput(to_image([table]), text, images, ui={"text": [text], "idlora_reports": rel})


NODES = [MetaEvaluate]
