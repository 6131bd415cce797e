"""Identity-preserving stylization: one node trains the content LoRA (x0 + identity loss) and the style LoRA as
a background job of three phases (training/idstyle.py)."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from comfy_api.latest import io

from ..models.face_detect import detect_batch, to_rgb_uint8_list
from ..training import evaluate as ev
from ..training.identity_loss import DECODERS, TARGETS, IdentityConfig, IdentityLoss
from ..training.idstyle import (BLOCK_PRESETS, PAPER_STEPS, IdentityStyleConfig, IdentityStyleData, IdentityStyleTask,
                                X0TrainConfig, fitting_block_presets)
from ..training.lora_format import sanitize_save_name
from ..training.lora_trainer import check_images, prepare_data
from . import model_source
from .comfy_adapter import ComfyDiffusion, _crop_to_multiple, model_family
from .inputs import JobNode, diffusion_inputs, prompt_inputs, seed_input
from .job_service import claim_output, load_identity_resources, manager
from .lora_nodes import LORA_SUBDIR, idlora_lora_dir
from .types import FaceEmbedderHandle, JobHandle, LoraNameOutput

log = logging.getLogger(__name__)
CATEGORY = "IDLoRA/stylize"
D = IdentityStyleConfig()
DI = D.identity
_BLOCKS_TIP = "; ".join(f"{k}: {v[2]}" for k, v in BLOCK_PRESETS.items())


def embed_fn(handle):
    """The differentiable ``(B, 3, S, S) -> (B, D)`` of a face-embedder handle, on the caller's device."""
    if handle is None or not getattr(handle, "differentiable", False):
        backend = getattr(handle, "backend", None)
        raise ValueError(f"the embedder ({backend}) is not differentiable, so it cannot drive an identity loss: "
                         f"set IDLoRA Face Embedder's backend to arcface-torch, clip-vision or dinov2, or set "
                         f"identity_weight to 0")
    device = getattr(handle.embedder, "device", None)

    def fn(images01: torch.Tensor) -> torch.Tensor:
        out = handle.torch_fn(images01.to(device) if device is not None else images01)
        return out.to(images01.device)
    return fn


def photo_landmarks(photo: torch.Tensor) -> torch.Tensor:
    """(N, 5, 2) landmarks of the largest face of each photo (built-in RetinaFace); names a photo without one."""
    found = detect_batch(ev.make_detector("retinaface"), to_rgb_uint8_list(photo))
    missing = [i for i, faces in enumerate(found) if not faces]
    if missing:
        raise ValueError(f"no face found in image {missing[0]} (0-based) of the 'photo' input "
                         f"({len(photo)} image(s), {photo.shape[2]}x{photo.shape[1]} px): the content photo must "
                         f"show the person's face, frontal and at least ~40 px wide. (The style image may have "
                         f"a face or not.)")
    best = [max(faces, key=lambda f: f.width * f.height) for faces in found]
    return torch.tensor(np.stack([f.landmarks for f in best]), dtype=torch.float32)


class TrainIdentityStyle(JobNode):
    @classmethod
    def define_schema(cls):
        c, s = D.content, D.style
        return io.Schema(
            node_id="IDLoRATrainIdentityStyle",
            display_name="IDLoRA Train Identity Content + Style LoRAs",
            category=CATEGORY,
            description="Identity-preserving stylization (ConsisLoRA + identity loss), as a background job of "
                        "three phases: ConsisLoRA's decoupling LoRA on the style image, the style LoRA, then a "
                        "content LoRA on the photo (noise loss, then x0 loss plus lambda * (1 - cos) of the face "
                        "embeddings of the stylized x0, content + style LoRA, and the photo). With identity_target "
                        "reconstruction (or no identity term) the content LoRA comes first and the term scores its "
                        "own reconstruction. Writes models/loras/idlora/<name>_content / _style.safetensors.",
            is_output_node=True,  # it starts a job: a prompt of this node alone is valid
            inputs=[
                *diffusion_inputs("The base model (SD1.5 or SDXL). It is not modified.",
                                  "Encodes the three prompts once.",
                                  "Encodes the images, and decodes x0 for the identity loss (decoder 'vae')."),
                io.Image.Input("photo", tooltip="The person's photo(s): one batch of equal size, a face in each. "
                                                "Cropped to a multiple of 8 px."),
                io.Image.Input("style_image", tooltip="The style exemplar (a face in it is fine)."),
                FaceEmbedderHandle.Input("embedder", optional=True,
                                         tooltip="IDLoRA Face Embedder with a differentiable backend "
                                                 "(arcface-torch, clip-vision, dinov2) for the identity loss. "
                                                 "Not connected: no identity term (plain ConsisLoRA)."),
                *prompt_inputs(
                    content_prompt=("a photo of [c] person", "Prompt of the photo. Use the same words at inference."),
                    style_prompt=("an image in the style of [v]", "Prompt of the style LoRA (ConsisLoRA's)."),
                    style_content_prompt=("a [v]", "Prompt of the decoupling LoRA on the style image (ConsisLoRA's)."),
                    stylized_prompt=("a photo of [c] person in the style of [v]",
                                     "Prompt of the stylized x0 that identity_target stylized scores: the prompt "
                                     "you will generate with (content and style words).")),
                io.Combo.Input("blocks", options=list(BLOCK_PRESETS), default="attn",
                               tooltip="Where the content and the style LoRA go. " + _BLOCKS_TIP),
                io.Int.Input("rank", default=c.rank, min=1, max=256, tooltip="Rank of all three LoRAs."),
                seed_input(c.seed, "Seed of every phase."),
                io.Int.Input("content_steps", default=c.steps, min=1, max=100000,
                             tooltip=f"Content phase steps (ConsisLoRA: {PAPER_STEPS['content']}, the default)."),
                io.Int.Input("x0_start_step", default=c.x0_start_step, min=0, max=100000,
                             tooltip=f"Content: noise-prediction loss before this step, x0 loss (and the identity "
                                     f"term) from it (ConsisLoRA: {PAPER_STEPS['x0_start_step']} of "
                                     f"{PAPER_STEPS['content']}, the default). 0: x0 from the start."),
                io.Float.Input("learning_rate", default=c.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Content: learning rate of the noise-loss steps."),
                io.Float.Input("x0_learning_rate", default=c.x0_learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Content: learning rate once the x0 loss is on."),
                io.Float.Input("identity_weight", default=DI.weight, min=0.0, max=100.0, step=0.01,
                               tooltip="lambda of the identity term (x0-loss steps only). 0: off."),
                io.Int.Input("identity_every", default=DI.every, min=1, max=1000,
                             tooltip="Apply the identity term every k steps (each costs a decode)."),
                io.Float.Input("identity_max_noise", default=DI.timestep_range[1], min=0.01, max=1.0, step=0.01,
                               tooltip="Apply it only for timesteps below this fraction of the schedule "
                                       "(x0 estimates are blurry at high noise)."),
                io.Combo.Input("identity_target", options=list(TARGETS), default=DI.target,
                               tooltip="Whose face the identity term scores against the photo. stylized (the "
                                       "paper's reading, default): the x0 of content + style LoRA together under "
                                       "stylized_prompt; the style LoRA is trained first and the term updates both "
                                       "LoRAs (one more denoiser pass per identity step). reconstruction: the "
                                       "content LoRA's own reconstruction of the photo (content LoRA first)."),
                io.Combo.Input("decoder", options=list(DECODERS), default=DI.decoder,
                               tooltip="Decoder of x0 for the identity term: vae (the checkpoint's, exact, "
                                       "costly) or taesd (needs taesd_decoder / taesdxl_decoder in "
                                       "models/vae_approx; far cheaper)."),
                io.Boolean.Input("face_region", default=DI.face_region,
                                 tooltip="Decode only the latent window around the face (plus a margin) "
                                         "instead of the whole image: much cheaper, same face."),
                io.Int.Input("style_content_steps", default=D.style_content_steps, min=0, max=100000,
                             tooltip=f"Steps of ConsisLoRA's decoupling LoRA on the style image (a content LoRA: "
                                     f"{PAPER_STEPS['style_content']}, the default). 0 skips it."),
                io.Int.Input("style_steps", default=s.steps, min=1, max=100000,
                             tooltip=f"Style phase steps (ConsisLoRA: {PAPER_STEPS['style']}, the default)."),
                io.Float.Input("style_learning_rate", default=s.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Style phase learning rate (x0 loss throughout)."),
                io.Float.Input("noise_offset", default=s.noise_offset, min=0.0, max=1.0, step=0.01,
                               tooltip="Style phase offset noise (ConsisLoRA: 0.03)."),
                io.String.Input("name", default="idlora_idstyle",
                                tooltip="Job name and file stem: <name>_content / <name>_style.safetensors."),
                io.Int.Input("sample_every", default=25, min=0, max=100000, optional=True,
                             tooltip="Every N steps a preview of the x0 estimate goes to the jobs panel. 0: none."),
            ],
            outputs=[
                JobHandle.Output(display_name="job", tooltip="The job id: connect to IDLoRA Wait for Job "
                                                             "(which = content / style)."),
                LoraNameOutput(display_name="content_lora_name", tooltip="File of the content LoRA (written "
                                                                         "when the content phase ends)."),
                LoraNameOutput(display_name="style_lora_name", tooltip="File of the style LoRA (written when "
                                                                       "its phase ends; with identity_target "
                                                                       "stylized again, identity-tuned, when the "
                                                                       "job ends)."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, photo, style_image, content_prompt, style_prompt, style_content_prompt,
                blocks, rank, seed, content_steps, x0_start_step, learning_rate, x0_learning_rate,
                identity_weight, identity_every, identity_max_noise, decoder, face_region, style_content_steps,
                style_steps, style_learning_rate, noise_offset, name, embedder=None,
                sample_every=25, identity_target=DI.target,
                stylized_prompt="a photo of [c] person in the style of [v]") -> io.NodeOutput:
        fits = fitting_block_presets(model.model.diffusion_model)  # fail now, not in the job
        if blocks not in fits:
            raise ValueError(f"blocks = {blocks!r} selects no layers of this model ({model_family(model)}): use one "
                             f"of {', '.join(fits)}")
        content_targets, style_targets, _ = BLOCK_PRESETS[blocks]
        cfg = IdentityStyleConfig(
            content=X0TrainConfig(steps=content_steps, learning_rate=learning_rate, rank=rank, seed=seed,
                                  targets=content_targets, x0_start_step=min(x0_start_step, content_steps),
                                  x0_learning_rate=x0_learning_rate),
            style_content_steps=style_content_steps,
            style=X0TrainConfig(steps=style_steps, learning_rate=style_learning_rate, rank=rank, seed=seed,
                                targets=style_targets, noise_offset=noise_offset),
            identity=IdentityConfig(weight=identity_weight if embedder is not None else 0.0, every=identity_every,
                                    timestep_range=(0.0, identity_max_noise), decoder=decoder,
                                    face_region=face_region, target=identity_target)).validate()
        photo = _crop_to_multiple(check_images(photo)[..., :3].clone(), 8)
        check_images(style_image)
        embed = embed_fn(embedder) if embedder is not None and identity_weight > 0 else None
        sanitize_save_name(name)  # a bad name fails now, before the encoding
        prompt, uid = cls.hidden.prompt, cls.hidden.unique_id
        sources = {"model": model_source.record(prompt, uid, "model"), "vae": model_source.record(prompt, uid, "vae")}
        if embed is not None:
            sources["embedder"] = model_source.record(prompt, uid, "embedder")
        with torch.inference_mode(False):
            data = cls.encode(ComfyDiffusion(model, clip, vae, load="none"), photo, style_image, content_prompt,
                              style_prompt, style_content_prompt, embed, embedder,
                              stylized_prompt if cfg.stylized_identity() else None)
        stem, paths = claim_output(name, idlora_lora_dir(), ("_content", "_style"))
        outputs = {p: {"path": path, "name": f"{LORA_SUBDIR}/{os.path.basename(path)}"}
                   for p, path in zip(("content", "style"), paths)}
        task = IdentityStyleTask(cfg, outputs, sources, load_identity_resources, data=data, sample_every=sample_every)
        job = manager().submit(task, name=stem, outputs=paths)
        return io.NodeOutput(job.id, outputs["content"]["name"], outputs["style"]["name"], ui={"idlora_job": [job.id]})

    @staticmethod
    def encode(diffusion, photo, style_image, content_prompt, style_prompt, style_content_prompt, embed,
               handle, stylized_prompt: str | None = None) -> IdentityStyleData:
        landmarks = photo_landmarks(photo)
        crop = getattr(handle, "crop_size", 112)
        refs = (IdentityLoss.reference_embeddings(embed, photo.movedim(-1, 1), landmarks, crop) if embed
                else torch.zeros(len(photo), 1))
        style = prepare_data(diffusion, style_image.clone(), style_prompt)
        with torch.no_grad():  # the decoupling LoRA sees the same latents with its own prompt
            style_content = diffusion.encode_prompts([style_content_prompt] * len(style), style_image.shape[2],
                                                     style_image.shape[1])
            stylized = None if stylized_prompt is None else \
                diffusion.encode_prompts([stylized_prompt] * len(photo), photo.shape[2], photo.shape[1])
        content = prepare_data(diffusion, photo, content_prompt)
        return IdentityStyleData(content, style, {k: v.to(style.latents.device) for k, v in style_content.items()},
                                 landmarks, refs.cpu(), crop,
                                 None if stylized is None else {k: v.to(content.latents.device)
                                                                for k, v in stylized.items()})


NODES = [TrainIdentityStyle]
