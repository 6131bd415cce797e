"""Plain LoRA nodes: train, save, load, apply, and plot the loss."""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..models.lora import PRESET_DOCS, PRESETS
from ..training.diffusion import TIMESTEP_SAMPLING_DOCS, TIMESTEP_SAMPLINGS
from ..training.lora_format import LoraBundle, LoraFormatError, load_lora, sanitize_save_name, save_bundle
from ..training.lora_job import LoraJobTask
from ..training.lora_trainer import LoraTrainConfig, LoraTrainer, check_images, prepare_data, split_prompts
from ..training.loss_plot import plot_losses
from . import model_source
from .comfy_adapter import ComfyDiffusion, apply_lora, check_targets_fit
from .inputs import BackgroundNode, diffusion_inputs, seed_input
from .job_service import claim_output, load_private_model, manager
from .types import JobHandle, LoraHandle, LoraNameOutput

log = logging.getLogger(__name__)
CATEGORY = "IDLoRA"
LORA_SUBDIR = "idlora"
D = LoraTrainConfig()
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PRESET_TIP = "; ".join(f"{k}: {v}" for k, v in PRESET_DOCS.items())
_SAMPLING_TIP = "; ".join(f"{k}: {v}" for k, v in TIMESTEP_SAMPLING_DOCS.items())


def progress_callback(total: int):
    """Progress bar updates plus ComfyUI's interrupt check, once per step."""
    bar = comfy.utils.ProgressBar(total)

    def on_step(step: int, _total: int, loss: float) -> None:
        bar.update_absolute(step, total)
        comfy.model_management.throw_exception_if_processing_interrupted()
    return on_step


def idlora_lora_dir() -> str:
    return os.path.join(folder_paths.get_folder_paths("loras")[0], LORA_SUBDIR)


def lora_job_outputs(what: str = "trained") -> list:
    """The outputs of a node that trains a LoRA in the prompt or as a background job: (lora, loss, job)."""
    return [LoraHandle.Output(display_name="lora", tooltip=f"The {what} LoRA (blocking mode; connect to Save / "
                                                            f"Apply)."),
            io.LossMap.Output(display_name="loss", tooltip="Loss per step (blocking mode; connect to IDLoRA Loss "
                                                           "Plot)."),
            JobHandle.Output(display_name="job", tooltip="The job id (background mode).")]


def background_inputs(default_name: str, work: str = "train") -> list:
    """The optional ``mode`` and ``name`` inputs of a node that can run as a background job."""
    return [io.Combo.Input("mode", options=["blocking", "background"], default="blocking", optional=True,
                           tooltip=f"blocking: {work} in this prompt and output the LoRA. background: a job that "
                                   f"writes models/loras/idlora/<name>.safetensors (<name>_0001... if that file "
                                   f"exists: a job never replaces another file)."),
            io.String.Input("name", default=default_name, optional=True, tooltip="Background: job and file name.")]


MODES = ("blocking", "background")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode = {mode!r} is invalid: use 'blocking' (train in this prompt) or 'background' (a job)")
    return mode


def start_lora_job(node_cls, name: str, make_task) -> io.NodeOutput:
    """Submit a background job whose product is models/loras/idlora/<name>.safetensors (<name>_0001... when that
    file exists or belongs to another job: each job writes a file of its own).

    ``make_task(output_path, lora_name, model_source)`` builds the task; the node's outputs are (no LoRA, no loss,
    the job id), and the job id goes to the UI."""
    stem, (path,) = claim_output(name, idlora_lora_dir())
    source = model_source.record(node_cls.hidden.prompt, node_cls.hidden.unique_id)
    task = make_task(path, f"{LORA_SUBDIR}/{stem}.safetensors", source)
    job = manager().submit(task, name=stem, outputs=[path])
    return io.NodeOutput(None, None, job.id, ui={"idlora_job": [job.id]})


class TrainLoRA(BackgroundNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRATrainLoRA",
            display_name="IDLoRA Train LoRA",
            category=CATEGORY,
            description="Train a plain LoRA on images with a frozen model (the baseline for every IDLoRA method).",
            inputs=[
                *diffusion_inputs("The model to train on. It is not modified; use IDLoRA Apply LoRA or save the "
                                  "LoRA and load it to use it.",
                                  "Text encoder used to encode the prompt(s) once before training (or connect "
                                  "'conditioning' instead).",
                                  "VAE used to encode the images to latents once before training.",
                                  clip_optional=True),
                io.Image.Input("images", tooltip="Training images, one batch of equal size (e.g. from Load Image or "
                                                 "an image batch node). Sizes are cropped to a multiple of 8 px "
                                                 "(16 px on Flux and SD3), keeping the centre."),
                io.String.Input("prompt", multiline=True, default="a photo of sks person",
                                tooltip="One prompt for all images, or one line per image (the line count must "
                                        "then equal the number of images)."),
                io.Int.Input("steps", default=D.steps, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=D.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate."),
                io.Int.Input("rank", default=D.rank, min=1, max=1024, tooltip="LoRA rank r (size of the bottleneck)."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=4096.0, step=1.0,
                               tooltip="LoRA alpha; the update is scaled by alpha/rank. 0 means alpha = rank "
                                       "(scale 1.0)."),
                io.Combo.Input("targets", options=list(PRESETS), default=D.targets,
                               tooltip="Which layers get LoRA branches. " + _PRESET_TIP),
                io.String.Input("target_pattern", default="", optional=True,
                                tooltip="Optional regular expression over module names (e.g. 'attn2\\.to_(k|v)$'); "
                                        "when set it replaces the preset."),
                io.Int.Input("batch_size", default=D.batch_size, min=1, max=64, tooltip="Images per step."),
                seed_input(D.seed, "Seed for the LoRA init, the batch order, the noise and the timesteps."),
                io.Boolean.Input("gradient_checkpointing", default=D.gradient_checkpointing,
                                 tooltip="Recompute block activations in the backward pass: less memory, "
                                         "about 30% slower."),
                io.Combo.Input("precision", options=["auto", "fp32", "bf16", "fp16"], default=D.precision,
                               tooltip="auto: bf16 autocast on CUDA when supported, fp32 on the CPU."),
                io.Combo.Input("mode", options=["blocking", "background"], default="blocking", optional=True,
                               tooltip="blocking: train inside this prompt and output the LoRA. background: start "
                                       "a job and output its id at once (connect 'job' to IDLoRA Wait for Job); "
                                       "the LoRA is written to models/loras/idlora/<job_name>.safetensors when it "
                                       "completes (<job_name>_0001... if that file exists: a job never replaces "
                                       "another file). Each queue run starts a new job."),
                io.String.Input("job_name", default="idlora_lora", optional=True,
                                tooltip="Background mode: the name of the job and of its LoRA file."),
                io.Int.Input("sample_every", default=25, min=0, max=100000, optional=True,
                             tooltip="Background mode: every N steps, a preview of the model's denoised "
                                     "estimate of the first image (latent-to-RGB, no VAE) goes to the jobs "
                                     "panel. 0: none."),
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLINGS), default=D.timestep_sampling,
                               optional=True, tooltip="How training noise levels are drawn. " + _SAMPLING_TIP),
                io.Float.Input("guidance", default=0.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Flux-dev's guidance value while training. 0: the default, 1.0 on models "
                                       "with a guidance embedding (as kohya and ai-toolkit train) and none on the "
                                       "others; a value > 0 on a model without one is an error."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Instead of clip + prompt: the output of any text encode node (e.g. "
                                              "for a text encoder that is not a CLIP input). One entry for all "
                                              "images, or one per image; the prompt then only names the run."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="torch.compile the model's blocks for training (inductor fuses their "
                                         "norm, activation and LoRA-add work). The first step compiles: about 40 s "
                                         "(Flux) to 3 min (SD1.5) on a 2-core CPU. On the CPU it measured no faster "
                                         "(Flux 0.98x, SD1.5 1.13x: those steps are matmul-bound); meant for GPUs, "
                                         "where it is not measured yet. Not with gradient checkpointing on Flux / "
                                         "SD3."),
                io.Boolean.Input("stream_blocks", default=False, optional=True,
                                 tooltip="Keep the model's blocks in CPU memory and copy them to the GPU two at a "
                                         "time as they run (needs gradient_checkpointing). The GPU then holds a "
                                         "fraction of the model: a background job adds no second full copy next "
                                         "to ComfyUI's, and bf16 Flux-dev fits a 24 GB card (predicted: 6.4 GiB "
                                         "at 1024 px). Costs a host-to-GPU copy of the blocks twice per step."),
            ],
            outputs=lora_job_outputs(),
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, vae, images, prompt, steps, learning_rate, rank, alpha, targets,
                batch_size, seed, gradient_checkpointing, precision, clip=None, target_pattern="", mode="blocking",
                job_name="idlora_lora", sample_every=25, timestep_sampling="auto", guidance=0.0,
                conditioning=None, compile=False, stream_blocks=False) -> io.NodeOutput:
        cfg = LoraTrainConfig(steps=steps, learning_rate=learning_rate, rank=rank, alpha=alpha or None,
                              targets=target_pattern.strip() or targets, batch_size=batch_size, seed=seed,
                              gradient_checkpointing=gradient_checkpointing, precision=precision,
                              timestep_sampling=timestep_sampling, guidance=guidance or None,
                              compile=bool(compile), stream_blocks=bool(stream_blocks)).validate()
        split_prompts(prompt, check_images(images).shape[0])  # fail fast, before the model loads
        check_targets_fit(model, cfg.targets, cfg.exclude)
        if check_mode(mode) == "background":
            return cls.start_job(model, clip, vae, images, prompt, cfg, job_name, sample_every, conditioning)
        with torch.inference_mode(False):
            diffusion = ComfyDiffusion(model, clip, vae)
            data = prepare_data(diffusion, images.clone(), prompt, conditioning)
            trainer = LoraTrainer(diffusion, data, cfg)
            bundle = trainer.run(progress_callback(cfg.steps))
        return io.NodeOutput(bundle, {"loss": trainer.losses}, "")

    @classmethod
    def start_job(cls, model, clip, vae, images, prompt, cfg, job_name, sample_every,
                  conditioning=None) -> io.NodeOutput:
        with torch.inference_mode(False):
            data = prepare_data(ComfyDiffusion(model, clip, vae, load="none"), images.clone(), prompt, conditioning)
        return start_lora_job(cls, job_name, lambda path, lora_name, source: LoraJobTask(
            cfg, path, lora_name, source, load_private_model, data=data, sample_every=sample_every))


class SaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRASaveLoRA",
            display_name="IDLoRA Save LoRA",
            category=CATEGORY,
            description="Write a LoRA as a kohya-format safetensors file into models/loras/idlora/.",
            is_output_node=True,
            inputs=[
                LoraHandle.Input("lora", tooltip="A LoRA from an IDLoRA training or load node."),
                io.String.Input("name", default="my_lora",
                                tooltip="File name, without folders (letters, digits, '-', '_', '.', spaces). "
                                        "'.safetensors' is added."),
                io.Boolean.Input("overwrite", default=True,
                                 tooltip="Replace an existing file of that name (never the output file of a "
                                         "background job). Off: add a number to the name."),
                io.Combo.Input("precision", options=list(SAVE_DTYPES), default="fp32", optional=True,
                               tooltip="fp32 keeps exactly what the trainer learned; fp16 / bf16 halve the file."),
            ],
            outputs=[LoraNameOutput(display_name="lora_name",
                                    tooltip="The saved file's name under models/loras; can feed the stock "
                                            "LoraLoader's lora_name.")],
        )

    @classmethod
    def execute(cls, lora: LoraBundle, name: str, overwrite: bool, precision: str = "fp32") -> io.NodeOutput:
        require_lora(lora)
        if lora.key_style != "module":
            raise LoraFormatError("this LoRA was read from a file, so it is saved already: use that file (copy it "
                                  "to keep it under another name)")
        fname = sanitize_save_name(name)
        folder = idlora_lora_dir()
        path = os.path.join(folder, fname)
        if not overwrite:
            stem, n = fname[:-len(".safetensors")], 1
            while os.path.exists(path) or manager().owner(path) is not None:
                path = os.path.join(folder, f"{stem}_{n:04d}.safetensors")
                n += 1
        owner = manager().owner(path)
        if owner is not None:
            raise ValueError(f"{os.path.basename(path)} is the output file of background job "
                             f"{owner or '(reserved)'}: give this LoRA another name, so that neither replaces the other")
        save_bundle(path, lora, dtype=SAVE_DTYPES[precision])
        rel = f"{LORA_SUBDIR}/{os.path.basename(path)}"
        log.info("IDLoRA: saved %s", path)
        return io.NodeOutput(rel, ui={"lora_files": [rel]})


class LoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRALoadLoRA",
            display_name="IDLoRA Load LoRA",
            category=CATEGORY,
            description="Read a LoRA file in kohya, ComfyUI-native or peft/diffusers key style, any rank.",
            inputs=[io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="A file under models/loras.")],
            outputs=[LoraHandle.Output(display_name="lora", tooltip="The LoRA, for IDLoRA Apply LoRA and the "
                                                                    "merge/eval nodes.")],
        )

    @classmethod
    def execute(cls, lora_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_lora(resolve_lora_path(lora_name)))


def require_lora(lora) -> None:
    if lora is None:
        raise ValueError("the LoRA input is empty: a training node in background mode outputs no LoRA; connect "
                         "its 'job' output to IDLoRA Wait for Job and take the LoRA from there")


def resolve_lora_path(lora_name: str) -> str:
    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise FileNotFoundError(f"LoRA file {lora_name!r} is not in models/loras ({folder_paths.get_folder_paths('loras')}); "
                                f"put it there and refresh the page")
    return path


class ApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAApplyLoRA",
            display_name="IDLoRA Apply LoRA",
            category=CATEGORY,
            description="Patch a clone of the model with a LoRA (handle or file) at a strength.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch; a patched clone is returned, the input is "
                                                "left as it is."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Multiplier of the LoRA update (1.0 = as trained)."),
                LoraHandle.Input("lora", optional=True, tooltip="A LoRA handle (from training or IDLoRA Load "
                                                               "LoRA). Takes precedence over lora_name."),
                io.Combo.Input("lora_name", options=["none"] + folder_paths.get_filename_list("loras"),
                               default="none", optional=True, tooltip="Or a file under models/loras."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched clone.")],
        )

    @classmethod
    def execute(cls, model, strength: float, lora: LoraBundle | None = None, lora_name: str = "none"):
        if lora is None:
            if lora_name in (None, "", "none"):
                raise ValueError("no LoRA given: connect a LoRA handle to 'lora' or choose a file in 'lora_name'")
            lora = load_lora(resolve_lora_path(lora_name))
        require_lora(lora)
        patched, report = apply_lora(model, lora, strength)
        log.info("IDLoRA Apply LoRA: %s", report.summary())
        return io.NodeOutput(patched)


class LossPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRALossPlot",
            display_name="IDLoRA Loss Plot",
            category=CATEGORY,
            description="Draw a loss history as an image (raw loss and a moving average).",
            inputs=[
                io.LossMap.Input("loss", tooltip="Loss history from an IDLoRA training node."),
                io.Int.Input("width", default=768, min=128, max=4096, tooltip="Image width in px."),
                io.Int.Input("height", default=384, min=96, max=4096, tooltip="Image height in px."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The plot, as an IMAGE.")],
        )

    @classmethod
    def execute(cls, loss, width: int, height: int) -> io.NodeOutput:
        values = [float(v) for v in loss.get("loss", [])] if isinstance(loss, dict) else []
        img = plot_losses(values, width, height)
        return io.NodeOutput(torch.from_numpy(img)[None])


NODES = [TrainLoRA, SaveLoRA, LoadLoRA, ApplyLoRA, LossPlot]
