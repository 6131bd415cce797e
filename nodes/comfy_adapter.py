"""ComfyUI side of the trainer interface (training/diffusion.py) and of LoRA patching.

This is the one place, apart from the node files, that knows ComfyUI's objects:
a MODEL (ModelPatcher), a CLIP and a VAE become a ``DiffusionModel`` for the
trainers, and a LoRA bundle becomes weight patches on a cloned MODEL.
"""
from __future__ import annotations

import copy
import functools
import logging
import os

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_base
import comfy.model_management
import comfy.supported_models
import comfy.utils
import folder_paths

from ..models.lora import LoraConfigError, select_targets
from ..models.storage import is_float8, store_linear_weights
from ..models.taesd import TAESD_EXTENSIONS, TAESD_FILES, load_taesd_decoder
from ..training.diffusion import FLOW, Cond
from ..training.lora_trainer import checkpointed_block_list
from ..training.lora_format import LoraBundle, LoraFormatError, MatchReport, resolve

log = logging.getLogger(__name__)

_MT = comfy.model_base.ModelType
# ComfyUI's model types IDLoRA trains, as training.diffusion prediction types: FLUX and FLOW (SD3.x) both use the
# CONST parametrisation (flow matching); they differ in the model's sampling schedule, which ComfyUI holds.
_PREDICTION = {_MT.EPS: "eps", _MT.V_PREDICTION: "v", _MT.FLUX: FLOW, _MT.FLOW: FLOW}
DIT_PIXEL_MULTIPLE = 16  # Flux / SD3: 8x VAE and 2x2 patches

DECODER_KINDS = ("vae", "taesd")


class UnsupportedModelError(ValueError):
    pass


def model_family(patcher) -> str:
    """'sd15', 'sdxl', ... from the model config class ComfyUI detected."""
    return type(patcher.model.model_config).__name__.lower()


def check_targets_fit(model, targets: str, exclude: str | None = None) -> None:
    """Fail now (before a background job starts) when ``targets`` selects no layer of the MODEL, or is a preset for
    another architecture (a U-Net preset on Flux); the message names the value and the presets that fit."""
    try:
        select_targets(model.model.diffusion_model, targets, exclude)
    except LoraConfigError as e:
        raise ValueError(f"{e} (this model: {model_family(model)})") from None


class ComfyDiffusion:
    """A ComfyUI MODEL (+ CLIP, VAE) seen through the trainers' DiffusionModel interface.

    Works on a clone of the MODEL; the input MODEL is never patched. Loading puts the
    (already LoRA-patched, if any) weights on ComfyUI's torch device. The frozen weights
    ComfyUI created under inference mode are replaced once by equal ordinary tensors,
    because autograd cannot save inference tensors for the backward pass.
    """

    def __init__(self, model, clip=None, vae=None, load: str = "shared", stream_blocks: bool = False):
        """``load``: "shared" puts the model on the device through ComfyUI's model management (for training
        inside a prompt); "private" patches it onto the device outside ComfyUI's list of loaded models, so
        that nothing can evict it (background jobs, which own a model of their own); "none" only encodes.
        ``stream_blocks`` (with "private"): the blocks that training streams (``LoraTrainConfig.stream_blocks``)
        stay in CPU memory; only the rest of the model goes to the device, so no full copy of it is ever there."""
        self.patcher = model.clone()
        self.clip, self.vae = clip, vae
        base = self.patcher.model
        if base.model_type not in _PREDICTION:
            raise UnsupportedModelError(
                f"IDLoRA trains eps- and v-prediction U-Nets (SD1.x, SD2.x, SDXL) and the flow-matching DiTs (Flux, "
                f"SD3.x); this model is {type(base.model_config).__name__} with prediction {base.model_type.name}: "
                f"load one of those")
        if load == "shared":
            comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        elif load == "private":
            self.patcher.patch_model(device_to=self.patcher.offload_device if stream_blocks
                                     else self.patcher.load_device)
            if stream_blocks:
                streamed = {id(t) for b in checkpointed_block_list(base.diffusion_model)
                            for t in (*b.parameters(), *b.buffers())}
                for t in (*base.diffusion_model.parameters(), *base.diffusion_model.buffers()):
                    if id(t) not in streamed:
                        t.data = t.data.to(self.patcher.load_device)
            _plain_torch_layers(base.diffusion_model)
            if base.manual_cast_dtype is not None:
                _to_compute_dtype(base.diffusion_model, base.manual_cast_dtype)
        self.base = base
        self.denoiser = base.diffusion_model
        self.prediction_type = _PREDICTION[base.model_type]
        self.sigmas = base.model_sampling.sigmas.detach().float().cpu().clone()
        self.device = self.patcher.load_device
        self.name = model_family(self.patcher)
        # Flux-dev's guidance embedding: the value fed while training (trainers set it; kohya and ai-toolkit use 1.0)
        self.guidance_embed = bool(getattr(getattr(self.denoiser, "params", None), "guidance_embed", False))
        self.guidance = 1.0
        # ComfyUI's DiTs add to each block's residual stream in place (Flux: img += ..., SD3: x += ...): training
        # keeps copies of what autograd saves (training.lora_trainer.saved_copies)
        self.inplace_blocks = self.prediction_type == FLOW
        self._decoders: dict[tuple[str, torch.dtype], torch.nn.Module] = {}
        _uninference(self.denoiser)

    @functools.cached_property
    def lora_stems(self) -> dict[str, str]:
        """Module path -> the file stem kohya writes for this base model (see ``kohya_stems``); built when a LoRA is
        first saved or resolved, not for every encode-only use of the adapter."""
        return kohya_stems(self.patcher)

    def net_forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        ms = self.base.model_sampling
        dtype = self.base.get_dtype() if self.base.manual_cast_dtype is None else self.base.manual_cast_dtype
        xc = ms.calculate_input(sigma, x_noisy).to(dtype)
        t = ms.timestep(sigma).float()
        extra = {k: v.to(self.device, dtype) for k, v in cond.items() if k not in ("context", "guidance")}
        if self.guidance_embed:
            g = cond.get("guidance")
            extra["guidance"] = (torch.full((x_noisy.shape[0],), self.guidance) if g is None else g).to(self.device)
        return self.denoiser(xc, t, context=cond["context"].to(self.device, dtype), **extra)

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        """(H*8, W*8, 3) image in [0, 1] of the first latent through the model's latent-to-RGB factors
        (what ComfyUI's latent2rgb previews use): no VAE needed, a fraction of a millisecond."""
        fmt = self.base.latent_format
        factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)
        bias = getattr(fmt, "latent_rgb_factors_bias", None)
        rgb = latents[0].float().cpu().movedim(0, -1) @ factors + (torch.tensor(bias) if bias is not None else 0)
        rgb = ((rgb + 1) / 2).clamp(0, 1)
        return rgb.repeat_interleave(8, 0).repeat_interleave(8, 1)

    def decoder(self, kind: str = "vae", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """A frozen, differentiable decoder: model-space latents (B, C, h, w) -> RGB (B, 3, 8h, 8w) in about
        [0, 1], not clamped (so that every pixel passes gradients back), float32, on ``self.device``.

        ``kind`` "vae": a private copy of the connected VAE's decoder (the VAE other nodes use is left as it
        is); "taesd": the Tiny AutoEncoder decoder file for this model family from ComfyUI's vae_approx
        folder (never downloaded). The weights are held in ``dtype``; built once per (kind, dtype).
        """
        if kind not in DECODER_KINDS:
            raise ValueError(f"unknown decoder kind {kind!r}; expected one of {DECODER_KINDS}")
        key = (kind, dtype)
        if key not in self._decoders:
            with torch.inference_mode(False):  # nodes run under inference mode; autograd needs ordinary tensors
                net = self._vae_decode_net(dtype) if kind == "vae" else self._taesd_decode_net(dtype)
            self._decoders[key] = net.eval()
            log.info("IDLoRA: built the %s decoder (%s) on %s", kind, str(dtype).removeprefix("torch."),
                     self.device)
        return self._decoders[key]

    def _vae_decode_net(self, dtype: torch.dtype) -> torch.nn.Module:
        if self.vae is None:
            raise ValueError("vae is not connected: connect the VAE output of Load Checkpoint (the identity loss "
                             "decodes latents to pixels with it)")
        self.vae.throw_exception_if_invalid()
        if getattr(self.vae, "latent_dim", 2) != 2:
            raise UnsupportedModelError(f"the connected VAE decodes {self.vae.latent_dim}-D latents; IDLoRA's "
                                        f"identity loss needs an image VAE (SD1.x, SD2.x, SDXL)")
        net = _frozen_copy(self.vae.first_stage_model, self.device, dtype, skip=_ENCODER_PARTS)
        return VaeDecoder(net, self.base.latent_format)

    def _taesd_decode_net(self, dtype: torch.dtype) -> torch.nn.Module:
        net = load_taesd_decoder(find_taesd_decoder(self.name))
        return TaesdModelDecoder(_frozen_copy(net, self.device, dtype))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ValueError("vae is not connected: connect the VAE output of Load Checkpoint")
        multiple = DIT_PIXEL_MULTIPLE if self.prediction_type == FLOW else 8
        h, w = images.shape[1], images.shape[2]
        if h % multiple or w % multiple:
            log.warning("IDLoRA: images of %dx%d px are not a multiple of %d px, which %s needs: training on their "
                        "centre %dx%d px (resize them to a multiple of %d to use every pixel)", w, h, multiple,
                        self.name, w // multiple * multiple, h // multiple * multiple, multiple)
        images = _crop_to_multiple(images[..., :3].clone(), multiple)
        return self.base.process_latent_in(self.vae.encode(images))

    def encode_prompts(self, prompts: list[str], width: int, height: int) -> Cond:
        if self.clip is None:
            raise ValueError("clip is not connected: connect the CLIP output of Load Checkpoint (or a text encoder "
                             "loader), or connect a conditioning instead")
        rows: dict[str, dict[str, torch.Tensor]] = {}
        for p in dict.fromkeys(prompts):  # encode each distinct prompt once
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(p), return_pooled=True)
            rows[p] = self._row(cond, pooled, width, height)
        return _stack_rows([rows[p] for p in prompts])

    def encode_conditioning(self, conditioning: list, n: int, width: int, height: int) -> Cond:
        """``n`` rows from a ComfyUI CONDITIONING (from any text encoder node): one entry for all images, or one
        entry per image. Its own guidance values are not used: the trainer's guidance input is."""
        if not isinstance(conditioning, list) or not conditioning:
            raise ValueError("conditioning is empty: connect the output of a text encode node (e.g. CLIP Text "
                             "Encode)")
        if len(conditioning) not in (1, n):
            raise ValueError(f"conditioning has {len(conditioning)} entries but images has {n} images: combine "
                             f"one conditioning for all images, or give exactly one per image")
        rows = [self._row(c, extra.get("pooled_output"), width, height) for c, extra in conditioning]
        return _stack_rows(rows * n if len(rows) == 1 else rows)

    def _row(self, cross_attn: torch.Tensor, pooled: torch.Tensor | None, width: int, height: int) -> Cond:
        """One conditioning row as the denoiser takes it: the model's own extra_conds (SDXL's size embedding,
        Flux's pooled vector, ...), without guidance (the trainer feeds that)."""
        extra = self.base.extra_conds(cross_attn=cross_attn, pooled_output=pooled, width=width, height=height,
                                      target_width=width, target_height=height, crop_w=0, crop_h=0,
                                      device=self.device, guidance=None)
        if "c_concat" in extra:
            raise UnsupportedModelError("inpainting / concat-conditioned models are not supported for training")
        row = {"context": extra["c_crossattn"].cond}
        if "y" in extra:
            row["y"] = extra["y"].cond
        return {k: v.detach().clone() for k, v in row.items()}


# -- latent -> RGB decoders -----------------------------------------------------

_ENCODER_PARTS = ("encoder", "quant_conv", "taesd_encoder")  # first_stage_model parts decoding does not use


class VaeDecoder(torch.nn.Module):
    """What ComfyUI's ``VAE.decode`` computes, with gradients: model-space latents -> the latent format's
    ``process_out`` (e.g. / 0.18215) -> ``first_stage_model.decode`` -> (x + 1) / 2. ComfyUI then clamps to
    [0, 1] and moves channels last; this module does neither, so it returns (B, 3, H, W) in about [0, 1]."""

    def __init__(self, first_stage_model: torch.nn.Module, latent_format):
        super().__init__()
        self.net = first_stage_model
        self.latent_format = latent_format  # a plain object (not a module): nothing of the U-Net is held
        self.dtype = next(first_stage_model.parameters()).dtype

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.latent_format.process_out(latents.float()).to(self.dtype)
        return (self.net.decode(z).float() + 1) / 2


class TaesdModelDecoder(torch.nn.Module):
    """models.taesd.TaesdDecoder in a chosen weight dtype, float32 in and out. TAESD's network takes the
    model-space latents as they are and outputs RGB in about [0, 1] (ComfyUI's TAESD.decode maps that to
    [-1, 1] and its VAE wrapper back)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.dtype = next(net.parameters()).dtype

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents.to(self.dtype)).float()


def find_taesd_decoder(family: str) -> str:
    """Full path of the TAESD decoder file for a model family in ComfyUI's vae_approx folder(s).

    Raises ValueError for a family without a TAESD decoder and FileNotFoundError when no file is there.
    """
    stems = TAESD_FILES.get(family)
    if stems is None:
        raise ValueError(f"no TAESD decoder is known for model family {family!r} (known: {', '.join(TAESD_FILES)}); "
                         f"use the VAE decoder (kind 'vae') instead")
    wanted = [stem + ext for stem in stems for ext in TAESD_EXTENSIONS]
    by_name: dict[str, list[str]] = {}
    for rel in folder_paths.get_filename_list("vae_approx"):
        by_name.setdefault(os.path.basename(rel), []).append(rel)
    for name in wanted:
        for rel in sorted(by_name.get(name, ())):
            full = folder_paths.get_full_path("vae_approx", rel)
            if full is not None:
                return full
    folders = folder_paths.get_folder_paths("vae_approx")
    raise FileNotFoundError(
        f"no TAESD decoder for {family} in ComfyUI's vae_approx folder ({', '.join(folders)}): expected "
        f"{' or '.join(wanted)}. IDLoRA never downloads it: put {stems[0]}.safetensors from madebyollin's TAESD "
        f"releases into ComfyUI/models/vae_approx, or decode with the VAE (kind 'vae')")


def _frozen_copy(module: torch.nn.Module, device, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """A private deep copy of ``module`` on ``device`` in ``dtype``, eval mode, plain torch layers, ordinary
    (not inference) tensors, every parameter frozen. Submodules named in ``skip`` are left out (set to None)
    instead of being copied, e.g. a VAE's encoder when only decoding is wanted."""
    memo = {id(sub): None for name in skip if isinstance(sub := getattr(module, name, None), torch.nn.Module)}
    out = copy.deepcopy(module, memo)
    out.to(device=device, dtype=dtype)
    _plain_torch_layers(out)
    _uninference(out)
    return out.eval().requires_grad_(False)


def _stack_rows(rows: list[dict[str, torch.Tensor]]) -> Cond:
    out: Cond = {}
    for key in rows[0]:
        tensors = [r[key] for r in rows]
        if key == "context":  # long prompts give more 77-token chunks: pad to the longest by repeating
            n = max(t.shape[1] for t in tensors)
            tensors = [t if t.shape[1] == n else torch.cat([t] * (n // t.shape[1]) + [t[:, :n % t.shape[1]]], 1)
                       for t in tensors]
        out[key] = torch.cat(tensors, 0)
    return out


def _crop_to_multiple(images: torch.Tensor, m: int) -> torch.Tensor:
    h, w = images.shape[1] // m * m, images.shape[2] // m * m
    if h == 0 or w == 0:
        raise ValueError(f"images of {images.shape[2]}x{images.shape[1]} px are too small: use at least {m}x{m}")
    y, x = (images.shape[1] - h) // 2, (images.shape[2] - w) // 2
    return images[:, y:y + h, x:x + w]


def _plain_torch_layers(module: torch.nn.Module) -> None:
    """Turn ComfyUI's layer classes (comfy.ops) into the torch classes they derive from.

    ComfyUI's layers check, and clear, the global interrupt flag on every forward. That flag belongs
    to the running prompt, so a background job's private model must not look at it (else ComfyUI's
    Cancel button would stop the job, and the prompt would miss its own cancel). The weights are
    already patched, on the device and in the compute dtype, so the plain forward is the same.
    """
    for m in module.modules():
        cls = type(m)
        if cls.__module__ == "comfy.ops":
            m.__class__ = next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn."))


def _to_compute_dtype(module: torch.nn.Module, compute: torch.dtype) -> None:
    """A private model whose weights ComfyUI stores in a dtype it cannot compute in: fp8 Linear weights stay fp8
    and are cast layer by layer (models.storage.CastLinear: a 12 B Flux keeps its 12 GB instead of growing to 24 or
    48 GB); any other storage dtype is cast once to the compute dtype, as before."""
    stored = next((m.weight.dtype for m in module.modules() if isinstance(m, torch.nn.Linear)), compute)
    if is_float8(stored):
        n = store_linear_weights(module, stored, compute)
        log.info("IDLoRA: %d Linear layers keep their %s weights, computed in %s", n,
                 str(stored).removeprefix("torch."), str(compute).removeprefix("torch."))
    else:
        module.to(compute)


@torch.no_grad()
def _uninference(module: torch.nn.Module) -> None:
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                with torch.inference_mode(False):
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                with torch.inference_mode(False):
                    sub._buffers[name] = b.clone()


# -- LoRA bundle -> patches on a MODEL ------------------------------------------

def module_shapes(patcher) -> dict[str, tuple]:
    sd = patcher.model.diffusion_model.state_dict()
    return {k[:-len(".weight")]: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight") and v.ndim >= 2}


# Base models kohya sd-scripts trains on diffusers' U-Net, so that its LoRA stems use diffusers' module names.
_DIFFUSERS_STEM_MODELS = (comfy.supported_models.SD15, comfy.supported_models.SD20)


def kohya_stems(patcher) -> dict[str, str]:
    """{module path: LoRA file key stem} as kohya sd-scripts names the modules of this base model.

    SD1.x / SD2.x: diffusers-layout names (``input_blocks.1.1.proj_in`` ->
    ``lora_unet_down_blocks_0_attentions_0_proj_in``), from ComfyUI's map of this model's own U-Net config, for
    every Linear / Conv2d module that has a diffusers name; diffusers and kohya's own loader read only these on
    SD1.x. Other models (SDXL: kohya uses SGM names): {}, so that ``save_lora`` writes the module paths' stems.
    """
    config = patcher.model.model_config
    if not isinstance(config, _DIFFUSERS_STEM_MODELS):
        return {}
    shapes = module_shapes(patcher)
    return {ldm[:-len(".weight")]: "lora_unet_" + diff[:-len(".weight")].replace(".", "_")
            for diff, ldm in comfy.utils.unet_to_diffusers(config.unet_config).items()
            if diff.endswith(".weight") and ldm[:-len(".weight")] in shapes}


def diffusers_key_map(patcher) -> dict[str, str]:
    """ComfyUI's own table of the LoRA key names it accepts for this model (diffusers, kohya, ...),
    plus the plain peft names of attention layers (``...attn1.to_q``, ``...attn1.to_out.0``), which
    ComfyUI 0.3.75 lists only in the old ``.processor.to_q`` / ``.to_out`` spelling."""
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    for k, v in list(key_map.items()):
        if ".processor.to_" in k:
            plain = k.replace(".processor.to_", ".to_")
            key_map.setdefault(plain + ".0" if plain.endswith(".to_out") else plain, v)
    return key_map


def apply_lora(model, bundle: LoraBundle, strength: float):
    """A patched clone of ``model`` with the bundle's LoRA at ``strength``, plus the match report.

    Raises LoraFormatError when no module matches or some shapes disagree (a LoRA of another
    base model), naming the counts.
    """
    weights, report = resolve(bundle, module_shapes(model), diffusers_key_map(model))
    check_report(report, bundle)
    sd: dict[str, torch.Tensor] = {}
    for path, w in weights.items():
        stem = f"diffusion_model.{path}"
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = w.down, w.up
        sd[f"{stem}.alpha"] = torch.tensor(float(w.alpha if w.alpha is not None else w.rank))
    key_map = {f"diffusion_model.{p}": f"diffusion_model.{p}.weight" for p in weights}
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    out = model.clone()
    out.add_patches(patches, strength)
    return out, report


def check_report(report: MatchReport, bundle: LoraBundle) -> None:
    if report.matched == 0 or report.shape_mismatch:
        raise LoraFormatError(
            f"this LoRA does not fit the model: {report.summary()}. It was probably trained for another base "
            f"model (metadata base model: {bundle.metadata.get('idlora_base_model') or bundle.metadata.get('ss_base_model_version', 'unknown')}); "
            f"use a LoRA made for this checkpoint")
    if report.missing:
        log.warning("IDLoRA: %s", report.summary())
