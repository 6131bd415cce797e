"""IDLoRA Content/Style Guidance: ConsisLoRA's inference guidance (arXiv 2503.10614, Sec. 4.3) as a GUIDER.

A content LoRA (trained on a person's photo) and a style LoRA (trained on a style image) are
patched into one model. Classifier-free guidance alone cannot turn their intensities up or down
separately, so ConsisLoRA adds one guidance term per LoRA. In denoised (x0) space, which for a
fixed noisy latent x and sigma is an affine image of eps space (x0 = x - sigma * eps; the CFG weights
sum to 1 and each guidance difference's to 0, so the same formula holds in eps), each step predicts

    D = D_u + w * (D_c - D_u)                                       plain CFG, model M
      + lambda_c * (D[M_c+; content_positive] - D[M_c-; content_negative])
      + lambda_s * (D[M_s+; style_positive]   - D[M_s-; style_negative])

    M    = base + s_c * content + s_s * style    (the LoRAs at their strengths; D_c / D_u use
                                                  the positive / negative conditioning)
    M_c+ = base + content                        (content LoRA alone, at 1.0)
    M_s+ = base + style                          (style LoRA alone, at 1.0)
    M_c- = base, or base + content_negative_lora (at 1.0) when one is chosen
    M_s- = base, or base + style_negative_lora (at 1.0) when one is chosen

"base" is the input MODEL as it comes in (with whatever patches it already carries).
Each optional branch conditioning defaults to the main positive conditioning. ConsisLoRA's
reference pipeline uses the "other" image's LoRA in the negative branches (e.g. the content LoRA
trained on the style image) plus extra prompts: choosing those files as the negative LoRAs and
wiring those prompts reproduces it; the default negative branch is the base model alone.

Cost: one batched CFG evaluation per step (as the stock CFGGuider) plus two U-Net evaluations per
nonzero lambda; a lambda of 0 adds nothing, and with both at 0 this is exactly the stock CFG
guider on the LoRA-patched model.

How the branches are computed: ComfyUI patches M's weights into the one loaded U-Net. A branch
model differs from M by a sum of LoRA updates (e.g. M_c+ = M + (1 - s_c) * content - s_s * style),
so for a branch call, forward hooks on the LoRA-carrying Linear/Conv2d modules add
``sum(coefficient * LoRA(x))`` (models/lora.py's LoraLayer: up(down(x)) * alpha / rank) to the
module outputs; the hooks are removed right after the call. Branch conditionings live in the
guider's conds dict, so the sampler encodes them like the positive and negative ones.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

import comfy.samplers
import folder_paths
from comfy_api.latest import io

from ..models.lora import LoraLayer
from ..training.lora_format import LoraBundle, LoraFormatError, LoraWeight, load_lora, resolve
from .comfy_adapter import apply_lora, check_report, diffusers_key_map, module_shapes
from .lora_nodes import require_lora, resolve_lora_path
from .types import LoraHandle

log = logging.getLogger(__name__)
CATEGORY = "IDLoRA/stylize"
NONE = "none"
CONTENT, STYLE = "content", "style"
NEGATIVE = {CONTENT: "content_negative_lora", STYLE: "style_negative_lora"}  # roles (= input names) of those LoRAs

Mix = dict[str, float]  # LoRA role -> multiplier added on top of the main model's weights


@dataclass(frozen=True)
class GuidanceTerm:
    """lambda * (D[main + positive_mix; conds[name_positive]] - D[main + negative_mix; conds[name_negative]])."""

    name: str
    scale: float
    positive_mix: Mix
    negative_mix: Mix

    @property
    def positive_key(self) -> str:
        return f"{self.name}_positive"

    @property
    def negative_key(self) -> str:
        return f"{self.name}_negative"


# -- LoRA side branches as forward hooks ------------------------------------------

class LoraDeltas:
    """Adds weighted LoRA branches to the outputs of a diffusion model's modules, one call at a time.

    ``weights`` maps a role ("content", "style", ...) to {module path: LoraWeight}, already resolved
    onto the model. ``load`` builds the LoraLayers on the sampling device, ``applied`` hooks a mix
    in for the duration of a with-block, ``unload`` drops the layers.
    """

    def __init__(self, weights: dict[str, dict[str, LoraWeight]]):
        self.weights = weights
        self.layers: dict[tuple[str, str], LoraLayer] = {}
        self.modules: dict[str, nn.Module] = {}

    def check_modules(self, diffusion_model: nn.Module) -> None:
        for role, by_path in self.weights.items():
            for path in by_path:
                module = diffusion_model.get_submodule(path)
                if not _hookable(module):
                    raise ValueError(
                        f"the {role} LoRA changes {path}, a {type(module).__name__} layer; the guidance branches "
                        f"can only add LoRA updates to Linear and ungrouped Conv2d layers: set the matching "
                        f"guidance to 0, or use a LoRA of attention / linear / conv layers")

    def load(self, diffusion_model: nn.Module, device: torch.device) -> None:
        self.modules = {p: diffusion_model.get_submodule(p) for by_path in self.weights.values() for p in by_path}
        self.layers = {(role, p): _layer(self.modules[p], w, device)
                       for role, by_path in self.weights.items() for p, w in by_path.items()}

    def unload(self) -> None:
        self.layers, self.modules = {}, {}

    @contextmanager
    def applied(self, mix: Mix) -> Iterator[None]:
        handles = []
        try:
            for path, terms in self._terms_by_module(mix).items():
                handles.append(self.modules[path].register_forward_hook(_add_branches(terms)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _terms_by_module(self, mix: Mix) -> dict[str, list[tuple[float, LoraLayer]]]:
        if not self.layers:
            raise RuntimeError("LoraDeltas.applied called outside sampling: call load() first")
        out: dict[str, list[tuple[float, LoraLayer]]] = {}
        for role, coef in mix.items():
            for path in self.weights[role]:
                out.setdefault(path, []).append((coef, self.layers[(role, path)]))
        return out


def _hookable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _layer(module: nn.Module, weight: LoraWeight, device: torch.device) -> LoraLayer:
    """A frozen fp32 LoraLayer for ``module`` holding ``weight`` (a Linear LoRA on a 1x1 conv, or the
    reverse, is reshaped the way ComfyUI reshapes its delta)."""
    layer = LoraLayer(module, weight.rank)
    layer.set_weights(weight.down.reshape(layer.down.shape), weight.up.reshape(layer.up.shape), weight.alpha)
    return layer.to(device).requires_grad_(False)


def _add_branches(terms: list[tuple[float, LoraLayer]]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = sum(coef * layer(args[0]) for coef, layer in terms)
        return output + delta.to(output.dtype)
    return hook


# -- the guider -------------------------------------------------------------------

class ContentStyleGuider(comfy.samplers.CFGGuider):
    """CFG on the LoRA-patched model plus ConsisLoRA's content and style guidance terms."""

    def __init__(self, model_patcher, deltas: LoraDeltas, terms: list[GuidanceTerm]):
        super().__init__(model_patcher)
        self.deltas = deltas
        self.terms = terms

    def set_conds(self, positive, negative, branch_conds: dict | None = None):
        self.inner_set_conds({"positive": positive, "negative": negative, **(branch_conds or {})})

    def inner_sample(self, noise, latent_image, device, *args, **kwargs):
        if not self.terms:
            return super().inner_sample(noise, latent_image, device, *args, **kwargs)
        self.deltas.load(self.inner_model.diffusion_model, device)
        try:
            return super().inner_sample(noise, latent_image, device, *args, **kwargs)
        finally:
            self.deltas.unload()

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = {} if model_options is None else model_options
        out = super().predict_noise(x, timestep, model_options, seed)
        for term in self.terms:
            pos = self.branch(term.positive_key, term.positive_mix, x, timestep, model_options)
            neg = self.branch(term.negative_key, term.negative_mix, x, timestep, model_options)
            out = out + term.scale * (pos - neg)
        return out

    def branch(self, key: str, mix: Mix, x, timestep, model_options) -> torch.Tensor:
        """The denoised prediction of the main model plus ``mix`` for the conditioning ``conds[key]``."""
        with self.deltas.applied(mix):
            return comfy.samplers.calc_cond_batch(self.inner_model, [self.conds[key]], x, timestep, model_options)[0]


# -- building it --------------------------------------------------------------------

def pick_lora(which: str, handle: LoraBundle | None, name: str | None) -> LoraBundle | None:
    """The handle if connected, else the chosen file, else None."""
    if handle is not None:
        require_lora(handle)
        return handle
    if name in (None, "", NONE):
        return None
    log.info("IDLoRA Content/Style Guidance: %s LoRA from file %s", which, name)
    return load_lora(resolve_lora_path(name))


@contextmanager
def _naming(role: str) -> Iterator[None]:
    """Prefix a LoraFormatError (from check_report) with the input it concerns."""
    try:
        yield
    except LoraFormatError as e:
        raise LoraFormatError(f"{role if role in NEGATIVE.values() else role + ' LoRA'}: {e}") from e


def resolved(model, bundle: LoraBundle, role: str) -> dict[str, LoraWeight]:
    with _naming(role):
        weights, report = resolve(bundle, module_shapes(model), diffusers_key_map(model))
        check_report(report, bundle)
    return weights


def patch_main(model, loras: dict[str, LoraBundle], strengths: dict[str, float]):
    """A clone of ``model`` with each LoRA patched in at its strength (a LoRA at strength 0 is only checked)."""
    main = model.clone()
    for role, bundle in loras.items():
        if strengths[role] == 0:
            resolved(model, bundle, role)
            continue
        with _naming(role):
            main, report = apply_lora(main, bundle, strengths[role])
        log.info("IDLoRA Content/Style Guidance: %s LoRA at %.3g: %s", role, strengths[role], report.summary())
    return main


def term_for(name: str, scale: float, strengths: dict[str, float], has_negative_lora: bool) -> GuidanceTerm:
    """Mixes relative to the main model: the LoRA ``name`` alone at 1.0 vs the base (+ its negative LoRA)."""
    remove_all = {role: -s for role, s in strengths.items()}
    positive = {**remove_all, name: 1.0 - strengths[name]}
    negative = {**remove_all, **({NEGATIVE[name]: 1.0} if has_negative_lora else {})}
    return GuidanceTerm(name, scale, _nonzero(positive), _nonzero(negative))


def _nonzero(mix: Mix) -> Mix:
    return {role: c for role, c in mix.items() if c != 0}


def build_guider(model, positive, negative, cfg: float, loras: dict[str, LoraBundle],
                 strengths: dict[str, float], scales: dict[str, float],
                 negative_loras: dict[str, LoraBundle], branch_conds: dict[str, list]) -> ContentStyleGuider:
    """``loras``: the given roles only; ``scales``: lambda per role; ``negative_loras`` and ``branch_conds``
    (key "<role>_positive" / "<role>_negative"; missing ones default to ``positive``) for active terms."""
    strengths = {role: strengths[role] for role in loras}
    main = patch_main(model, loras, strengths)
    terms = [term_for(role, scales[role], strengths, role in negative_loras) for role in loras if scales[role] != 0]
    used = {role for t in terms for role in (*t.positive_mix, *t.negative_mix)}
    all_loras = {**loras, **{NEGATIVE[r]: b for r, b in negative_loras.items()}}
    deltas = LoraDeltas({role: resolved(model, all_loras[role], role) for role in sorted(used)})
    deltas.check_modules(model.model.diffusion_model)
    conds = {key: branch_conds.get(key) or positive for t in terms for key in (t.positive_key, t.negative_key)}
    guider = ContentStyleGuider(main, deltas, terms)
    guider.set_conds(positive, negative, conds)
    guider.set_cfg(cfg)
    log.info("IDLoRA Content/Style Guidance: guidance terms %s; %d U-Net evaluations per step (1 CFG batch + 2 "
             "per term)", [t.name for t in terms] or "none", 1 + 2 * len(terms))
    return guider


def _check_scales(loras: dict[str, LoraBundle], scales: dict[str, float]) -> None:
    if not loras:
        raise ValueError("no LoRA given: connect a LoRA handle to 'content_lora' or 'style_lora', or choose a file "
                         "in 'content_lora_name' or 'style_lora_name' (at least one of the two)")
    for role, scale in scales.items():
        if scale != 0 and role not in loras:
            raise ValueError(f"{role}_guidance is {scale} but no {role} LoRA is given: connect '{role}_lora' or "
                             f"choose '{role}_lora_name', or set {role}_guidance to 0")


def _negative_loras(scales: dict[str, float], names: dict[str, str]) -> dict[str, LoraBundle]:
    out = {}
    for role, name in names.items():
        if name in (None, "", NONE):
            continue
        if scales[role] == 0:
            log.info("IDLoRA Content/Style Guidance: %s_negative_lora %s is not used: %s_guidance is 0",
                     role, name, role)
            continue
        out[role] = load_lora(resolve_lora_path(name))
    return out


# -- the node -------------------------------------------------------------------------

def _lora_inputs(role: str, what: str) -> list:
    files = [NONE] + folder_paths.get_filename_list("loras")
    return [
        LoraHandle.Input(f"{role}_lora", optional=True,
                         tooltip=f"The {role} LoRA ({what}) as a handle from an IDLoRA training or load node. "
                                 f"Takes precedence over {role}_lora_name."),
        io.Combo.Input(f"{role}_lora_name", options=files, default=NONE, optional=True,
                       tooltip=f"Or the {role} LoRA as a file under models/loras."),
    ]


def _branch_inputs(role: str) -> list:
    files = [NONE] + folder_paths.get_filename_list("loras")
    return [
        io.Conditioning.Input(f"{role}_positive", optional=True,
                              tooltip=f"Conditioning of the {role} branch's LoRA-on prediction. Default: the main "
                                      f"positive conditioning."),
        io.Conditioning.Input(f"{role}_negative", optional=True,
                              tooltip=f"Conditioning of the {role} branch's reference prediction. Default: the "
                                      f"main positive conditioning."),
        io.Combo.Input(f"{role}_negative_lora", options=files, default=NONE, optional=True,
                       tooltip=f"LoRA (at 1.0) of the {role} branch's reference prediction. none: the base model "
                               f"without LoRA (IDLoRA's default). ConsisLoRA uses the LoRA trained on the other "
                               f"image here (e.g. for content: the content LoRA trained on the style image)."),
    ]


def _strength(role: str) -> io.Float.Input:
    return io.Float.Input(f"{role}_strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                          tooltip=f"Strength of the {role} LoRA in the main (CFG) prediction (1.0 = as trained).")


def _guidance(role: str) -> io.Float.Input:
    return io.Float.Input(f"{role}_guidance", default=0.0, min=-10.0, max=30.0, step=0.1, round=0.01,
                          tooltip=f"lambda_{role[0]}: weight of the {role} guidance term, D[{role} LoRA alone at "
                                  f"1.0] - D[base or {role}_negative_lora]. Higher: more {role}. 0: no term and no "
                                  f"extra cost; each nonzero value costs 2 U-Net evaluations per step.")


class ContentStyleGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAContentStyleGuidance",
            display_name="IDLoRA Content/Style Guidance",
            category=CATEGORY,
            description=(
                "ConsisLoRA's inference guidance (arXiv 2503.10614, Sec. 4.3) for SamplerCustomAdvanced: CFG on the "
                "model with the content and style LoRAs at their strengths, plus content_guidance * (D[content LoRA "
                "alone] - D[reference]) and style_guidance * (D[style LoRA alone] - D[reference]), so content and "
                "style intensity are set separately. The reference is the base model (the input MODEL) unless a "
                "negative LoRA is chosen; ConsisLoRA's own pipeline uses the other image's LoRA there. Both "
                "guidance values at 0: plain CFG with both LoRAs, no extra cost."),
            inputs=[
                io.Model.Input("model", tooltip="The base model. It is not modified; the guider samples a patched "
                                                "clone."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning of the main CFG prediction."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning of the main CFG prediction."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale w of the main prediction."),
                _strength(CONTENT), _strength(STYLE), _guidance(CONTENT), _guidance(STYLE),
                *_lora_inputs(CONTENT, "trained on the subject's photo"),
                *_lora_inputs(STYLE, "trained on the style image"),
                *_branch_inputs(CONTENT), *_branch_inputs(STYLE),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="Connect to SamplerCustomAdvanced's guider.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg: float, content_strength: float, style_strength: float,
                content_guidance: float, style_guidance: float, content_lora=None, content_lora_name=NONE,
                style_lora=None, style_lora_name=NONE, content_positive=None, content_negative=None,
                content_negative_lora=NONE, style_positive=None, style_negative=None,
                style_negative_lora=NONE) -> io.NodeOutput:
        scales = {CONTENT: content_guidance, STYLE: style_guidance}
        given = {CONTENT: pick_lora(CONTENT, content_lora, content_lora_name),
                 STYLE: pick_lora(STYLE, style_lora, style_lora_name)}
        loras = {role: b for role, b in given.items() if b is not None}
        _check_scales(loras, scales)
        negative_loras = _negative_loras(scales, {CONTENT: content_negative_lora, STYLE: style_negative_lora})
        branch_conds = {"content_positive": content_positive, "content_negative": content_negative,
                        "style_positive": style_positive, "style_negative": style_negative}
        guider = build_guider(model, positive, negative, cfg, loras,
                              {CONTENT: content_strength, STYLE: style_strength}, scales, negative_loras,
                              {k: v for k, v in branch_conds.items() if v is not None})
        return io.NodeOutput(guider)


NODES = [ContentStyleGuidance]
