"""Text-to-image in-process with ComfyUI's own sampler, for loops that generate from many LoRAs (the Meta-LoRA
evaluation loop, training/meta_lora_eval.py): what Load LoRA (model only) -> CLIP Text Encode -> Empty Latent Image ->
KSampler -> VAE Decode compute, as one call. Imports ComfyUI (like comfy_adapter.py), so it runs inside ComfyUI or
after tools/meta_lora_stage1.setup_comfy.
"""
from __future__ import annotations

import logging

import torch

import comfy.sample
import comfy.samplers
import node_helpers

from ..training.lora_format import LoraBundle
from .comfy_adapter import apply_lora

log = logging.getLogger(__name__)


class ComfyGenerator:
    """``(LoRA or None, prompts, seeds) -> (N, H, W, 3) images in [0, 1]``, one image per (prompt, seed), each sampled
    as KSampler samples it (``comfy.sample.sample``: the same noise for the same seed) and decoded by the VAE. The
    LoRA patches a clone of the MODEL (never the input), at strength 1; the text encoder is not patched (IDLoRA's
    LoRAs have no text-encoder layers). On a model with a guidance embedding (Flux-dev) ``cfg`` is its guidance (the
    paper's Meta-LoRA inference: guidance 3.5, true CFG 1) and the sampler's CFG is 1; elsewhere ``cfg`` is the
    classifier-free guidance scale, with an empty negative prompt."""

    def __init__(self, model, clip, vae, width: int, height: int, steps: int, cfg: float, sampler: str = "euler",
                 scheduler: str = "normal"):
        if sampler not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"sampler = {sampler!r} is not a ComfyUI sampler: use e.g. euler "
                             f"(one of {comfy.samplers.KSampler.SAMPLERS})")
        if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(f"scheduler = {scheduler!r} is not a ComfyUI scheduler: use one of "
                             f"{comfy.samplers.KSampler.SCHEDULERS}")
        if clip is None or vae is None:
            raise ValueError("generation needs the CLIP and the VAE: connect them (or use a checkpoint that has them)")
        self.model, self.clip, self.vae = model, clip, vae
        self.width, self.height, self.steps, self.sampler, self.scheduler = width, height, steps, sampler, scheduler
        diffusion = getattr(model.model, "diffusion_model", None)
        self.guidance = bool(getattr(getattr(diffusion, "params", None), "guidance_embed", False))
        self.cfg, self.guidance_value = (1.0, cfg) if self.guidance else (cfg, None)
        self._conds: dict[str, list] = {}

    def encode(self, prompt: str) -> list:
        if prompt not in self._conds:
            cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(prompt))
            if self.guidance_value is not None:
                cond = node_helpers.conditioning_set_values(cond, {"guidance": self.guidance_value})
            self._conds[prompt] = cond
        return self._conds[prompt]

    def __call__(self, lora: LoraBundle | None, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
        model = self.model if lora is None else apply_lora(self.model, lora, 1.0)[0]
        negative = self.encode("")
        out = []
        with torch.inference_mode():  # as ComfyUI runs a prompt
            for prompt, seed in zip(prompts, seeds):
                latent = torch.zeros(1, 4, self.height // 8, self.width // 8)
                latent = comfy.sample.fix_empty_latent_channels(model, latent)
                noise = comfy.sample.prepare_noise(latent, seed)
                samples = comfy.sample.sample(model, noise, self.steps, self.cfg, self.sampler, self.scheduler,
                                              self.encode(prompt), negative, latent, denoise=1.0, disable_pbar=True,
                                              seed=seed)
                out.append(self.vae.decode(samples)[..., :3].float().cpu())
        return torch.cat([x.reshape(-1, *x.shape[-3:]) for x in out]).clone()
