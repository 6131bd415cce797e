"""DuoLoRA nodes: merge a content and a style LoRA (DuoLoRA, ZipRank, ZipLoRA, naive), combine merged pairs
(multi-concept), and inspect the learned masks."""
from __future__ import annotations

import json
import logging

import torch

import folder_paths
from comfy_api.latest import io

from ..training.duolora import (DRAW_MODES, LOSS_WEIGHTINGS, MAX_TRANSLATE_STEPS, MERGE_METHODS,
                                 PRIOR_NORMALIZATIONS, RECON_LOSSES, LoraMerger, MergeConfig, MergeData,
                                 check_prompts, combine, resolve_pair)
from ..training.duolora_job import MergeTask
from ..training.lora_format import LoraBundle, load_lora
from ..training.lora_trainer import check_images, prepare_data
from ..training.mask_plot import mask_rank_table, render_mask_ranks
from .comfy_adapter import ComfyDiffusion, diffusers_key_map, module_shapes
from .inputs import BackgroundNode, diffusion_inputs, prompt_inputs, seed_input
from .job_service import load_private_model
from .lora_nodes import (background_inputs, check_mode, lora_job_outputs, progress_callback, require_lora,
                         resolve_lora_path, start_lora_job)
from .types import LoraHandle

log = logging.getLogger(__name__)
CATEGORY = "IDLoRA/duolora"
D = MergeConfig()
NONE = "none"
METHOD_TIP = ("duolora: ZipRank rank masks + layer priors (prior-informed init and the rank hinge) + the Constyle "
              "cycle loss. ziprank: rank masks and reconstruction only. ziplora: the ZipLoRA baseline (output-"
              "dimension masks, as the papers define them, + its orthogonality term). naive: a scalar blend, no "
              "training.")

# the paper's ambiguous readings: MergeConfig's defaults were chosen by measurement (docs/duolora.md, "The paper's
# readings"); the tooltips name the default so that the two cannot drift apart
MEASURED = "chosen by measurement on IDLoRA's synthetic merge tasks (docs/duolora.md)"
WEIGHTING_TIP = (f"duolora: how the loss terms are weighted. 'text': reconstruction + lambda_cycle * cycle + "
                 f"lambda_layer_prior * prior (the paper's text and its Table 9). 'equation': the paper's total-loss "
                 f"equation, lambda_layer_prior * prior + lambda_cycle * (reconstruction + cycle). Default "
                 f"'{D.loss_weighting}', {MEASURED}.")
NORMALIZATION_TIP = (f"duolora: the layer prior's size. 'mean': each layer's term divided by its mask length (the "
                     f"share of active rank components) and averaged over the layers, so it does not grow with the "
                     f"rank or the number of layers. 'sum': the raw terms of every layer added. Default "
                     f"'{D.prior_normalization}', {MEASURED}.")
RECON_TIP = (f"duolora: the reconstruction terms. 'mse': mean squared error. 'norm': the L2 norm of the difference "
             f"per sample, as the paper writes ||.|| (its size grows with the latent's size). Default "
             f"'{D.recon_loss}', {MEASURED}.")
DRAWS_TIP = (f"'fresh': a new image, timestep and noise every step, the single LoRAs' targets recomputed (two more "
             f"U-Net passes per step, four with the cycle). 'cached': {D.cached_draws} draws computed once and "
             f"reused (cheaper steps). Default '{D.draws}', {MEASURED}.")
LAMBDA_CYCLE_TIP = ("Weight of the Constyle loss (paper: 0.01): with loss_weighting 'text' of the cycle terms only "
                    "(the reconstruction has weight 1), with 'equation' of reconstruction and cycle together.")


def pick(handle, name: str, what: str) -> LoraBundle:
    if handle is not None:
        require_lora(handle)
        return handle
    if name in (None, "", NONE):
        raise ValueError(f"no {what} LoRA: connect a LoRA handle to '{what}_lora' or choose a file in "
                         f"'{what}_lora_name'")
    return load_lora(resolve_lora_path(name))


def _lora_inputs(what: str, trained_on: str) -> list:
    return [LoraHandle.Input(f"{what}_lora", optional=True,
                             tooltip=f"The {what} LoRA ({trained_on}), from a training or load node. Any rank, any "
                                     f"supported key format. Takes precedence over {what}_lora_name."),
            io.Combo.Input(f"{what}_lora_name", options=[NONE] + folder_paths.get_filename_list("loras"),
                           default=NONE, optional=True, tooltip=f"Or the {what} LoRA as a file under models/loras.")]


class DuoLoRAMerge(BackgroundNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRADuoLoRAMerge",
            display_name="IDLoRA DuoLoRA Merge",
            category=CATEGORY,
            description="Merge a content LoRA and a style LoRA into one standard LoRA by learning masks (DuoLoRA: "
                        "rank-dimension masks, layer priors, cycle loss; or the ZipLoRA / naive baselines). The "
                        "masks fold into the factors, so the export is exact.",
            inputs=[
                *diffusion_inputs("The base model both LoRAs were trained on; it is not modified.",
                                  "Encodes the three prompts once."),
                *_lora_inputs("content", "trained on the subject"), *_lora_inputs("style", "trained on the style"),
                io.Image.Input("content_images", tooltip="Images of the subject (what the content LoRA learned)."),
                io.Image.Input("style_image", tooltip="The style image (what the style LoRA learned)."),
                *prompt_inputs(
                    content_prompt=("a <V1> object in <S1> style", "p_c: the content LoRA's training prompt."),
                    style_prompt=("a <V2> object in <S2> style", "p_s: the style LoRA's training prompt."),
                    mixed_prompt=("a <V1> object in <S2> style",
                                  "p_cs: the content in the style, used by the cycle loss and at inference.")),
                io.Combo.Input("method", options=list(MERGE_METHODS), default=D.method, tooltip=METHOD_TIP),
                io.Int.Input("steps", default=D.steps, min=1, max=100000, tooltip="Mask training steps (paper: "
                                                                                  "100)."),
                io.Float.Input("learning_rate", default=D.learning_rate, min=1e-6, max=10.0, step=1e-3,
                               tooltip="Adam learning rate of the masks (paper: 0.01)."),
                io.Float.Input("lambda_cycle", default=D.lambda_cycle, min=0.0, max=100.0, step=0.001,
                               tooltip=LAMBDA_CYCLE_TIP),
                io.Float.Input("lambda_layer_prior", default=D.lambda_layer_prior, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the layer-prior loss (paper: 0.1)."),
                io.Float.Input("t_content", default=D.t_content, min=0.0, max=1.0, step=0.05,
                               tooltip="Prior-informed init: share of ones in the dominant concept's rank mask "
                                       "(Table 7)."),
                io.Float.Input("t_style", default=D.t_style, min=0.0, max=1.0, step=0.05,
                               tooltip="... and in the other concept's mask."),
                io.Int.Input("cycle_every", default=D.cycle_every, min=1, max=1000,
                             tooltip="The cycle terms every k steps (each costs two more U-Net passes)."),
                io.Float.Input("naive_content_weight", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="naive: the content LoRA's weight."),
                io.Float.Input("naive_style_weight", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="naive: the style LoRA's weight."),
                seed_input(tooltip="Seed of the init and the draws."),
                *background_inputs("idlora_duolora", work="merge"),
                io.String.Input("content_blocks", default="", optional=True,
                                tooltip="duolora's layer priors by layer name, for models whose layers have no "
                                        "feature-map size (Flux, SD3): a pattern (RE2) of the content-dominant "
                                        "layers, e.g. ^double_blocks\. on Flux. Empty: U-Nets classify by "
                                        "feature-map size, DiT layers by the two LoRAs' weight shares. Set both "
                                        "or neither."),
                io.String.Input("style_blocks", default="", optional=True,
                                tooltip="The style-dominant layers' pattern, e.g. ^single_blocks\. on Flux (a "
                                        "split of our choosing: no paper gives one for Flux)."),
                io.Combo.Input("loss_weighting", options=list(LOSS_WEIGHTINGS), default=D.loss_weighting,
                               optional=True, tooltip=WEIGHTING_TIP),
                io.Combo.Input("prior_normalization", options=list(PRIOR_NORMALIZATIONS),
                               default=D.prior_normalization, optional=True, tooltip=NORMALIZATION_TIP),
                io.Combo.Input("recon_loss", options=list(RECON_LOSSES), default=D.recon_loss, optional=True,
                               tooltip=RECON_TIP),
                io.Combo.Input("draws", options=list(DRAW_MODES), default=D.draws, optional=True, tooltip=DRAWS_TIP),
                io.Boolean.Input("cycle_translate_grad", default=D.cycle_translate_grad, optional=True,
                                 tooltip="duolora: let the gradient flow through the cycle's translating pass too "
                                         "(I_cs, I_sc; the paper does not say). Off: the translation is data for "
                                         "the reconstructing pass, and costs no backward through it (the cost "
                                         "of each option: benchmarks/results/bench_duolora.md)."),
                io.Int.Input("translate_steps", default=D.translate_steps, min=1, max=MAX_TRANSLATE_STEPS,
                             optional=True,
                             tooltip="duolora: denoising steps of the cycle's translating pass (I_cs, I_sc and the "
                                     "references' first pass), deterministic (DDIM) steps down the model's "
                                     "schedule. 1: the one-step x0 estimate. Each more step costs two more U-Net "
                                     "passes per cycle (four with fresh draws)."),
            ],
            outputs=lora_job_outputs("merged"),
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, content_images, style_image, content_prompt, style_prompt, mixed_prompt,
                method, steps, learning_rate, lambda_cycle, lambda_layer_prior, t_content, t_style, cycle_every,
                naive_content_weight, naive_style_weight, seed, content_lora=None, content_lora_name=NONE,
                style_lora=None, style_lora_name=NONE, mode="blocking", name="idlora_duolora", content_blocks="",
                style_blocks="", loss_weighting=D.loss_weighting, prior_normalization=D.prior_normalization,
                recon_loss=D.recon_loss, draws=D.draws, cycle_translate_grad=D.cycle_translate_grad,
                translate_steps=D.translate_steps) -> io.NodeOutput:
        cfg = MergeConfig(method=method, steps=steps, learning_rate=learning_rate, lambda_cycle=lambda_cycle,
                          lambda_layer_prior=lambda_layer_prior, t_content=t_content, t_style=t_style,
                          cycle_every=cycle_every, naive_weights=(naive_content_weight, naive_style_weight),
                          seed=seed, content_blocks=content_blocks.strip(), style_blocks=style_blocks.strip(),
                          loss_weighting=loss_weighting, prior_normalization=prior_normalization,
                          recon_loss=recon_loss, draws=draws, cycle_translate_grad=bool(cycle_translate_grad),
                          translate_steps=int(translate_steps)).validate()
        check_prompts(content_prompt=content_prompt, style_prompt=style_prompt, mixed_prompt=mixed_prompt)
        check_images(content_images), check_images(style_image)
        content, style = resolve_pair(pick(content_lora, content_lora_name, "content"),
                                      pick(style_lora, style_lora_name, "style"), module_shapes(model),
                                      diffusers_key_map(model))
        with torch.inference_mode(False):
            if check_mode(mode) == "background":
                data = encode(ComfyDiffusion(model, clip, vae, load="none"), content_images, style_image,
                              content_prompt, style_prompt, mixed_prompt)
                return cls.start_job(cfg, content, style, data, name)
            diffusion = ComfyDiffusion(model, clip, vae)
            data = encode(diffusion, content_images, style_image, content_prompt, style_prompt, mixed_prompt)
            merger = LoraMerger(diffusion, data, cfg, content, style)
            bundle = merger.run(progress_callback(cfg.steps))
        text = f"{method}: {len(bundle.weights)} layers, rank <= {max(w.rank for w in bundle.weights.values())}"
        return io.NodeOutput(bundle, {"loss": merger.losses}, "", ui={"text": [text]})

    @classmethod
    def start_job(cls, cfg, content, style, data, name) -> io.NodeOutput:
        return start_lora_job(cls, name, lambda path, lora_name, source: MergeTask(
            cfg, content, style, path, lora_name, source, load_private_model, data))


def encode(diffusion, content_images, style_image, p_c: str, p_s: str, p_cs: str) -> MergeData:
    c = prepare_data(diffusion, content_images.clone(), p_c)
    s = prepare_data(diffusion, style_image[:1].clone(), p_s)
    with torch.no_grad():
        cs = diffusion.encode_prompts([p_cs], content_images.shape[2], content_images.shape[1])
    return MergeData(c.latents, s.latents, {k: v[:1] for k, v in c.cond.items()}, s.cond,
                     {k: v.to(c.latents.device) for k, v in cs.items()})


class MultiConceptMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAMultiConceptMerge",
            display_name="IDLoRA Multi-Concept Merge",
            category=CATEGORY,
            description="DuoLoRA Sec. 3.5: combine merged <concept_i, style> LoRAs as sum_i alpha_i <C_i, S>, "
                        "alpha_i = 1/n unless weights are given. Exact (the ranks are concatenated).",
            inputs=[LoraHandle.Input("lora_1", tooltip="A merged <concept, style> LoRA."),
                    LoraHandle.Input("lora_2", tooltip="Another one (same style, same base model)."),
                    LoraHandle.Input("lora_3", optional=True, tooltip="Optional."),
                    LoraHandle.Input("lora_4", optional=True, tooltip="Optional."),
                    io.String.Input("weights", default="", optional=True,
                                    tooltip="Optional alpha_i, comma-separated; empty: 1/n each.")],
            outputs=[LoraHandle.Output(display_name="lora", tooltip="The combined LoRA.")],
        )

    @classmethod
    def execute(cls, lora_1, lora_2, lora_3=None, lora_4=None, weights="") -> io.NodeOutput:
        bundles = [b for b in (lora_1, lora_2, lora_3, lora_4) if b is not None]
        for b in bundles:
            require_lora(b)
        alphas = None
        if weights.strip():
            try:
                alphas = [float(w) for w in weights.split(",")]
            except ValueError:
                raise ValueError(f"weights {weights!r} are not numbers: give comma-separated alphas, e.g. "
                                 f"'0.5, 0.5'") from None
            if len(alphas) != len(bundles):
                raise ValueError(f"{len(alphas)} weights for {len(bundles)} LoRAs: give one per connected LoRA")
        return io.NodeOutput(combine(bundles, alphas))


class MaskInspector(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAMaskInspector",
            display_name="IDLoRA Mask Inspector",
            category=CATEGORY,
            description="The active ranks of the content and style masks per layer of a merged LoRA, split into "
                        "content- and style-dominant layers (like DuoLoRA's Figure 4).",
            is_output_node=True,
            inputs=[LoraHandle.Input("lora", tooltip="A LoRA from IDLoRA DuoLoRA Merge (its masks are in its "
                                                     "metadata), or loaded from such a file."),
                    io.Float.Input("threshold", default=0.5, min=0.0, max=10.0, step=0.05,
                                   tooltip="A mask entry counts as active when |m| > threshold.")],
            outputs=[io.Image.Output(display_name="image", tooltip="The mask-rank plot."),
                     io.String.Output(display_name="summary", tooltip="Per-layer active ranks, as text.")],
        )

    @classmethod
    def execute(cls, lora, threshold) -> io.NodeOutput:
        require_lora(lora)
        meta = lora.metadata
        if "idlora_masks" not in meta:
            raise ValueError("this LoRA has no merge masks in its metadata: inspect a LoRA made by IDLoRA DuoLoRA "
                             "Merge")
        masks, kinds = json.loads(meta["idlora_masks"]), json.loads(meta.get("idlora_layer_kinds", "{}"))
        if any("c" not in m for m in masks.values()):
            raise ValueError("this merge (ZipLoRA) stores only mask means in its metadata; the per-entry masks of "
                             "output-dimension merges are too long for it")
        rows = mask_rank_table(masks, kinds, threshold)
        img = torch.from_numpy(render_mask_ranks(masks, kinds, threshold)).float()[None] / 255.0
        text = "\n".join(f"{r['name']} [{r['kind']}]: content {r['active_c']}/{r['rank_c']}, "
                         f"style {r['active_s']}/{r['rank_s']}" for r in rows)
        return io.NodeOutput(img, text, ui={"text": [text[:4000]]})


NODES = [DuoLoRAMerge, MultiConceptMerge, MaskInspector]
