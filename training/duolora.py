"""DuoLoRA (Roy et al., 2025): merging a content LoRA and a style LoRA with masks in the rank dimension (ZipRank),
layer priors and the Constyle cycle loss; ZipLoRA and the naive blend as baselines (models/merge.py).

The merge trains only masks: one or more content images with the content prompt p_c ("a <V1> object in <S1>
style"), the style image with p_s ("a <V2> object in <S2> style"), and the mixed prompt p_cs ("a <V1> object in
<S2> style"). Per step, a draw (content image, style image, a timestep and a noise for each):

- reconstruction: ||(D+L_m)(x_c, p_c) - (D+L_c)(x_c, p_c)|| + ||(D+L_m)(x_s, p_s) - (D+L_s)(x_s, p_s)||, the
  single-LoRA targets computed without gradients. ``recon_loss``: "mse" (the mean squared error) or "norm" (the
  paper's ||.||: the L2 norm of the difference per sample). ``draws``: "fresh" (a new draw every step, its targets
  recomputed: the paper's training loop) or "cached" (``cached_draws`` draws whose targets are computed once, the
  steps cycling through them: cheaper per step).
- Constyle cycles (Sec. 3.4): I_cs = (D+L_m)(noisy I_c, p_cs) denoised to x0, re-noised and denoised with p_c:
  I_csc, against I_cc, the content LoRA alone through the same passes with p_c: MSE(I_cc, I_csc); and the same
  from the style image: MSE(I_ss, I_scs). (So identical content and style LoRAs, prompts and a merge equal to
  either LoRA give a cycle loss of exactly zero: only what the cycle adds and removes is measured.)
  ``translate_steps``: the translating pass (I_cs, I_sc and the references' first pass) denoises in that many
  deterministic (DDIM) steps down the model's schedule; 1 is the one-step x0 estimate. ``cycle_translate_grad``:
  the gradient also flows through the translating pass (the paper does not say; off, it is data for the
  reconstructing pass, as a CycleGAN generator's output is for its reconstruction, and costs no backward).
- layer priors (Algorithm 1): on content-dominant layers ||m_c||_1 + h * max(0, ||m_s||_* - ||m_c||_*), on
  style-dominant ones the same with c and s swapped. For a diagonal mask the nuclear norm is the sum of the
  absolute diagonal entries, i.e. the L1 norm of the mask vector. ``prior_normalization``: "mean" divides each
  layer's term by the length of its longer mask and averages over the layers with a prior, so the term is the
  share of active rank components (Table 7's thresholds are shares too) and its size does not grow with the rank
  or the number of layers, as the reconstruction's mean does not; "sum" adds the raw terms of every layer (the
  paper writes Eq. 1 for one layer and does not say how layers combine).
- ``loss_weighting``: "equation" is the paper's total loss, L = lambda_layer_prior * L_prior + lambda_cycle *
  L_constyle, with the reconstruction inside L_constyle; "text" is L = L_recon + lambda_cycle * L_cycle +
  lambda_layer_prior * L_prior (its text: lambda_cycle "controls the weight of the cycle-consistency losses";
  its Table 9 at lambda 0 / 0 scores as ZipRank, i.e. the reconstruction kept its weight there).
- The defaults of these readings were chosen by measurement (benchmarks/bench_duolora.py, quality part: the
  lowest mean error over two synthetic tasks and three seeds with the paper's hyperparameters); docs/duolora.md
  gives the numbers. Configs saved before the options existed load with the old behaviour (``from_saved``).
- ZipLoRA: MSE reconstruction + lambda_zip * sum over layers of |m_c . m_s| (its orthogonality term).

Layers are classified by the resolution of their feature map, measured with forward hooks: content-dominant when
it is at most a quarter of the latent's side (32 px of a 1024 px SDXL image: down_blocks.2, mid_block, up_blocks.0,
the paper's mapping), style-dominant otherwise (64 px: down_blocks.1, up_blocks.1). Layers with no feature-map
size (every layer of a DiT such as Flux; a U-Net's time embedding) are classified by the two LoRAs' weight shares
(``classify_by_weights``), or by the user's ``content_blocks`` / ``style_blocks`` patterns.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.lora import LoraConfigError, compile_pattern
from ..models.merge import MergeNetwork
from .diffusion import Cond, DiffusionModel, add_noise, lora_stems, sample_sigmas, to_eps, to_x0
from .lora_format import LoraBundle, LoraWeight

from .lora_trainer import LoraTrainConfig, LoraTrainer, TrainingInputError

log = logging.getLogger(__name__)

MERGE_METHODS = ("duolora", "ziprank", "ziplora", "naive")
CONTENT, STYLE, OTHER = "content", "style", "other"
LOSS_WEIGHTINGS = ("equation", "text")   # the paper's total-loss equation, or its text (see the module docstring)
PRIOR_NORMALIZATIONS = ("mean", "sum")
RECON_LOSSES = ("mse", "norm")
DRAW_MODES = ("fresh", "cached")
MAX_TRANSLATE_STEPS = 50
# the readings IDLoRA used before these options existed: a saved config without them resumes with these
LEGACY_READINGS = dict(loss_weighting="text", prior_normalization="sum", recon_loss="mse", draws="cached",
                       cycle_translate_grad=False, translate_steps=1)


@dataclass
class MergeConfig(LoraTrainConfig):
    """Defaults from DuoLoRA Sec. 4: Adam, lr 0.01, 100 steps, lambda_cycle 0.01, lambda_layer_prior 0.1."""
    method: str = "duolora"
    steps: int = 100
    learning_rate: float = 0.01
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    lambda_cycle: float = 0.01
    lambda_layer_prior: float = 0.1
    prior_hinge: float = 1.0          # h in Algorithm 1 (the Lagrange weight of the rank constraint)
    t_content: float = 0.75           # prior-informed init (Table 7): share of ones in the dominant concept's mask
    t_style: float = 0.5              # ... and in the other concept's mask
    cycle_every: int = 1              # the cycle terms every k steps
    lambda_ziplora: float = 0.01      # ZipLoRA's mask-orthogonality weight
    naive_weights: tuple[float, float] = (1.0, 1.0)
    cached_draws: int = 8             # draws="cached": (image, timestep, noise) draws whose targets are cached
    # the paper's ambiguous readings (module docstring); defaults chosen by measurement (docs/duolora.md)
    loss_weighting: str = "text"      # "text": L_recon + l_cycle L_cycle + l_prior L_prior; "equation":
    #                                   l_prior L_prior + l_cycle (L_recon + L_cycle)
    prior_normalization: str = "mean"  # "mean": per layer / mask length, averaged over layers; "sum": raw sum
    recon_loss: str = "norm"          # DuoLoRA's reconstruction terms: "norm" (the paper's ||.||, per sample), or "mse"
    draws: str = "fresh"              # "fresh": new noise and timesteps each step; "cached": cached_draws, reused
    cycle_translate_grad: bool = False  # the gradient also flows through the cycle's translating pass
    translate_steps: int = 1          # denoising steps of the translating pass (1: the one-step x0 estimate)
    prune_below: float = 0.0          # export: drop rank components with |mask| <= this (0: exact zeros only)
    content_blocks: str = ""          # layer priors by name (RE2 patterns), instead of by feature-map size: the
    style_blocks: str = ""            # rule for DiTs such as Flux, whose layers all work on the same tokens

    def validate(self) -> "MergeConfig":
        need = self.need
        need(self.method in MERGE_METHODS, "method", f"use one of {MERGE_METHODS}")
        if self.method == "naive":
            self.steps = max(self.steps, 1)
        super().validate()
        need(self.lambda_cycle >= 0, "lambda_cycle", "use a number >= 0 (the paper: 0.01)")
        need(self.lambda_layer_prior >= 0, "lambda_layer_prior", "use a number >= 0 (the paper: 0.1)")
        need(self.prior_hinge >= 0, "prior_hinge", "use a number >= 0")
        need(0 <= self.t_content <= 1, "t_content", "use a fraction 0..1 (Table 7: 0.75)")
        need(0 <= self.t_style <= 1, "t_style", "use a fraction 0..1 (Table 7: 0.5)")
        need(isinstance(self.cycle_every, int) and self.cycle_every >= 1, "cycle_every", "use a whole number >= 1")
        need(isinstance(self.cached_draws, int) and self.cached_draws >= 1, "cached_draws", "use a whole number >= 1")
        need(self.loss_weighting in LOSS_WEIGHTINGS, "loss_weighting",
             f"use one of {LOSS_WEIGHTINGS}: 'equation' weighs the prior and the whole Constyle loss (reconstruction "
             f"and cycle) as the paper's total loss does, 'text' gives the reconstruction weight 1 and lambda_cycle "
             f"to the cycle terms only")
        need(self.method != "duolora" or self.loss_weighting != "equation" or self.lambda_cycle > 0, "lambda_cycle",
             "use a number > 0 with loss_weighting 'equation': it weighs the reconstruction too, so 0 would train "
             "the masks on the layer prior alone (or choose loss_weighting 'text')")
        need(self.prior_normalization in PRIOR_NORMALIZATIONS, "prior_normalization",
             f"use one of {PRIOR_NORMALIZATIONS}: 'mean' (each layer's term over its mask length, averaged over the "
             f"layers) or 'sum' (the raw terms of every layer added)")
        need(self.recon_loss in RECON_LOSSES, "recon_loss",
             f"use one of {RECON_LOSSES}: 'mse' (mean squared error) or 'norm' (the L2 norm per sample)")
        need(self.draws in DRAW_MODES, "draws",
             f"use one of {DRAW_MODES}: 'fresh' (new noise and timesteps every step) or 'cached' (cached_draws "
             f"draws, reused)")
        need(isinstance(self.cycle_translate_grad, bool), "cycle_translate_grad", "use true or false")
        need(isinstance(self.translate_steps, int) and not isinstance(self.translate_steps, bool)
             and 1 <= self.translate_steps <= MAX_TRANSLATE_STEPS, "translate_steps",
             f"use a whole number from 1 (the one-step x0 estimate) to {MAX_TRANSLATE_STEPS}")
        need(self.prune_below >= 0, "prune_below", "use 0 (exact export) or a small positive threshold")
        need(bool(self.content_blocks) == bool(self.style_blocks), "content_blocks",
             "give both content_blocks and style_blocks, or neither (then the layers' feature-map sizes decide)")
        for field_name in ("content_blocks", "style_blocks"):
            if getattr(self, field_name):
                try:
                    compile_pattern(getattr(self, field_name), field_name)
                except LoraConfigError as e:
                    raise TrainingInputError(str(e)) from None
        return self

    @classmethod
    def from_saved(cls, d: dict) -> "MergeConfig":
        """A config as saved by a job or in a file's metadata; one saved before the paper's readings were options
        (it has none of them) gets the readings it was trained with (LEGACY_READINGS), so a resumed job continues
        the same objective. Unknown keys are errors, as in ``from_dict``."""
        if isinstance(d, dict) and not set(LEGACY_READINGS) & set(d):
            d = {**LEGACY_READINGS, **d}
        return cls.from_dict(d)


@dataclass
class MergeData:
    """Encoded once: content latents (N, C, h, w), one style latent (1, C, h, w), and the three prompts' rows."""
    content: torch.Tensor
    style: torch.Tensor
    cond_c: Cond
    cond_s: Cond
    cond_cs: Cond

    @property
    def device(self) -> torch.device:
        return self.content.device

    def to(self, device) -> "MergeData":
        mv = lambda c: {k: v.to(device) for k, v in c.items()}  # noqa: E731
        return MergeData(self.content.to(device), self.style.to(device), mv(self.cond_c), mv(self.cond_s),
                         mv(self.cond_cs))


# -- layer priors ------------------------------------------------------------------------------------

def classify_layers(denoiser: nn.Module, names: list[str], run_forward, latent_hw: tuple[int, int]) -> dict:
    """{name: (content | style | other, (h, w))} from the feature-map size each layer works at.

    ``run_forward()`` runs the denoiser once on latents of ``latent_hw``. A layer's size is that of the 4-D input
    of the closest module containing it (its SpatialTransformer, or the layer itself for a Conv2d). The denoiser's
    own input does not count: a layer with no 4-D container below it works at no feature-map size and is
    ``other`` (a U-Net's time embedding; every layer of a DiT such as Flux, whose blocks all see the same tokens)."""
    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for n, m in denoiser.named_modules():
        def pre(module, args, n=n):
            if args and torch.is_tensor(args[0]) and args[0].ndim == 4:
                sizes[n] = tuple(args[0].shape[-2:])
        handles.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in names:
        parts = name.split(".")
        hw = next((sizes[".".join(parts[:i])] for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in sizes),
                  None)  # the closest container with a 4-D input, below the denoiser itself
        if hw is None:
            out[name] = (OTHER, None)
        else:
            out[name] = (CONTENT if min(hw) * 4 <= min(latent_hw) else STYLE, hw)
    return out


def classify_by_name(names: list[str], content_blocks: str, style_blocks: str) -> dict:
    """{name: (content | style | other, None)} by the user's patterns (RE2, searched in the module name): the layer
    priors' rule where feature-map sizes say nothing (a DiT). A layer both patterns match is an error."""
    c, s = compile_pattern(content_blocks, "content_blocks"), compile_pattern(style_blocks, "style_blocks")
    out = {}
    for name in names:
        is_c, is_s = c.search(name) is not None, s.search(name) is not None
        if is_c and is_s:
            raise TrainingInputError(f"layer {name!r} matches both content_blocks {content_blocks!r} and "
                                     f"style_blocks {style_blocks!r}: make the two patterns disjoint")
        out[name] = (CONTENT if is_c else STYLE if is_s else OTHER, None)
    return out


def lora_norm(weight: tuple | None) -> float:
    """||scale * up @ down||_F of one LoRA layer (down, up, alpha), without forming the product; 0 when absent."""
    if weight is None:
        return 0.0
    down, up, alpha = weight
    rank = down.shape[0]
    d, u = down.detach().float().reshape(rank, -1), up.detach().float().reshape(up.shape[0], rank)
    gram = (u.T @ u) * (d @ d.T)  # ||U D||_F^2 = trace((U^T U)(D D^T)): this product's sum
    return float(gram.sum().clamp_min(0).sqrt()) * (alpha if alpha is not None else rank) / rank


def classify_by_weights(names: list[str], content: dict, style: dict) -> dict:
    """{name: (content | style, None)} from the two LoRAs themselves: the rule where feature-map sizes say nothing
    (every layer of a DiT such as Flux). Each LoRA's change is split over the layers, ||dW_l||_F / sum_k ||dW_k||_F;
    a layer is content-dominant where the content LoRA's share is at least the style LoRA's, else style-dominant
    (a layer only one LoRA adapts belongs to it). Every layer gets a kind. IDLoRA's rule, not the paper's: the paper
    maps SDXL's blocks by resolution, which a DiT does not have."""
    nc = {n: lora_norm(content.get(n)) for n in names}
    ns = {n: lora_norm(style.get(n)) for n in names}
    tc, ts = sum(nc.values()) or 1.0, sum(ns.values()) or 1.0
    return {n: (CONTENT if nc[n] / tc >= ns[n] / ts else STYLE, None) for n in names}


def prior_masks(rank_c: int, rank_s: int, kind: str, t_content: float, t_style: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Prior-informed initial rank masks: in a content-dominant layer a share t_content of m_c's entries and t_style
    of m_s's are 1 (chosen by the order of a random vector), the rest 0; reversed in style-dominant layers; all ones
    elsewhere. (The paper gives the thresholds, Table 7, and leaves the exact procedure to its supplement.)"""
    if kind == OTHER:
        return torch.ones(rank_c), torch.ones(rank_s)
    share_c, share_s = (t_content, t_style) if kind == CONTENT else (t_style, t_content)

    def mask(r: int, share: float) -> torch.Tensor:
        m = torch.zeros(r)
        m[torch.randperm(r, generator=generator)[:max(0, round(share * r))]] = 1.0
        return m
    return mask(rank_c, share_c), mask(rank_s, share_s)


def layer_prior_loss(network: MergeNetwork, kinds: dict, hinge: float, normalization: str = "sum") -> torch.Tensor:
    """Algorithm 1 over the layers with a prior. ||m||_* of a diagonal mask = sum |m_i| (its singular values).

    ``normalization`` "sum": the layers' terms added (its size grows with the rank and the number of layers);
    "mean": each layer's term divided by the length of its longer mask (for masks in [0, 1] the L1 part is the
    share of active rank components, at most 1, and the hinge at most h), then averaged over the layers."""
    terms = []
    for name, layer in network.items():
        kind = kinds.get(name, (OTHER, None))[0]
        if kind == OTHER:
            continue
        dom, other = (layer.m_c, layer.m_s) if kind == CONTENT else (layer.m_s, layer.m_c)
        nuc_dom, nuc_other = dom.abs().sum(), other.abs().sum()
        term = nuc_dom + hinge * F.relu(nuc_other - nuc_dom)
        terms.append(term / max(dom.numel(), other.numel()) if normalization == "mean" else term)
    if not terms:
        return torch.zeros(())
    total = torch.stack(terms).sum()
    return total / len(terms) if normalization == "mean" else total


def ziplora_orthogonality(network: MergeNetwork) -> torch.Tensor:
    return sum((layer.m_c * layer.m_s).sum().abs() for _, layer in network.items())


# -- the merger ----------------------------------------------------------------------------------------

class LoraMerger(LoraTrainer):
    """Trains the merge masks (LoraTrainer's loop, checkpoints and jobs; the network is a MergeNetwork)."""

    method = "duolora"

    def __init__(self, model: DiffusionModel, data: MergeData, config: MergeConfig, content: dict, style: dict,
                 layer_kinds: dict | None = None):
        self.content_w, self.style_w = content, style
        super().__init__(model, data, config)
        if layer_kinds is None:  # only DuoLoRA's priors use them
            layer_kinds = self.measure_layer_kinds() if config.method == "duolora" else {}
        self.layer_kinds = layer_kinds
        self.method = config.method
        self.draws: list[dict] | None = None  # draws="cached": built on the first step
        self.draw: dict | None = None         # this step's draw
        self.cycle_draw: dict | None = None   # the draw the cycle runs on (cached: its own walk)
        if config.method == "duolora":
            g = torch.Generator().manual_seed(config.seed)
            self.network.set_masks({n: prior_masks(l.m_c.numel(), l.m_s.numel(), self.layer_kinds.get(n, (OTHER,))[0],
                                                   config.t_content, config.t_style, g)
                                    for n, l in self.network.items()})
        elif config.method == "naive":
            self.network.set_masks({n: (torch.full((1,), config.naive_weights[0]),
                                        torch.full((1,), config.naive_weights[1])) for n in self.network.names})

    def measure_layer_kinds(self) -> dict:
        """Content- / style-dominant layers: by the config's block patterns when given, else from one forward pass
        on the first content latent (feature-map sizes)."""
        if self.cfg.content_blocks:
            kinds = classify_by_name(self.network.names, self.cfg.content_blocks, self.cfg.style_blocks)
            if all(k == OTHER for k, _ in kinds.values()):
                raise TrainingInputError(f"content_blocks {self.cfg.content_blocks!r} and style_blocks "
                                         f"{self.cfg.style_blocks!r} match none of the {len(kinds)} merged layers "
                                         f"(e.g. {self.network.names[0]!r}): fix the patterns")
            return kinds
        x = self.data.content[:1]
        sigma = self.model.sigmas[len(self.model.sigmas) // 2].reshape(1).to(x.device)
        kinds = classify_layers(self.model.denoiser, self.network.names,
                                lambda: self.model.net_forward(x, sigma, self.data.cond_c), tuple(x.shape[-2:]))
        unsized = [n for n, (k, _) in kinds.items() if k == OTHER]
        if unsized:  # a DiT's layers (all of them), a U-Net's time embedding: by the two LoRAs' weight shares
            kinds.update(classify_by_weights(unsized, self.content_w, self.style_w))
            if len(unsized) == len(kinds):
                log.info("DuoLoRA: %s has no feature-map sizes (not a U-Net); the %d merged layers are classified by "
                         "the two LoRAs' weight shares (content_blocks / style_blocks override)", self.model.name,
                         len(kinds))
        return kinds

    def target_modules(self) -> dict[str, nn.Module]:
        """The layers of the two LoRAs (``cfg.targets`` does not apply: a merge adapts what its LoRAs adapt)."""
        modules = dict(self.model.denoiser.named_modules())
        return {n: modules[n] for n in {**self.content_w, **self.style_w} if n in modules}

    def build_network(self, targets) -> MergeNetwork:
        modules = dict(self.model.denoiser.named_modules())
        missing = [n for n in {**self.content_w, **self.style_w} if n not in modules]
        if missing:
            raise TrainingInputError(f"{len(missing)} LoRA layers are not in this model (e.g. {missing[0]})")
        kind = "ziprank" if self.cfg.method in ("duolora", "ziprank") else self.cfg.method
        return MergeNetwork(modules, self.content_w, self.style_w, kind)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.network.mask_parameters()  # the naive blend's weights are never stepped (train_step)

    def alphas(self) -> dict[str, float]:
        return {}

    # -- draws and their single-LoRA targets ----------------------------------------------------------
    @torch.no_grad()
    def _single(self, which: str, x_t, sigma, cond) -> torch.Tensor:
        saved = {n: (l.m_c.detach().clone(), l.m_s.detach().clone()) for n, l in self.network.items()}
        one = lambda l, on: torch.full_like(l.m_c if on else l.m_s, 1.0)  # noqa: E731
        self.network.set_masks({n: (one(l, True) * (which == "c"), one(l, False) * (which == "s"))
                                for n, l in self.network.items()})
        try:
            return self.model.net_forward(x_t, sigma, cond).float()
        finally:
            self.network.set_masks(saved)

    def make_draw(self, g: torch.Generator, cycle_refs: bool) -> dict:
        """One draw from ``g``: a content image and the style image, a timestep and a noise for each, the noisy
        latents, the single LoRAs' predictions (the reconstruction targets) and, with ``cycle_refs``, the cycle's
        references I_cc and I_ss. No gradients."""
        i = int(torch.randint(0, len(self.data.content), (1,), generator=g))
        xc, xs = self.data.content[i:i + 1], self.data.style[:1]
        try:
            sigmas = sample_sigmas(self.model, self.cfg.timestep_sampling, 2, g, tuple(xc.shape[-2:]),
                                   self.cfg.timestep_range)
        except ValueError as e:
            raise TrainingInputError(str(e)) from None
        sc, ss = (sigmas[k].reshape(1).to(xc.device) for k in range(2))
        nc, ns = (torch.randn(x.shape, generator=g).to(x.device) for x in (xc, xs))
        pt = self.model.prediction_type
        xc_t, xs_t = add_noise(pt, xc, nc, sc), add_noise(pt, xs, ns, ss)
        out_c = self._single("c", xc_t, sc, self.data.cond_c)
        out_s = self._single("s", xs_t, ss, self.data.cond_s)
        draw = dict(xc=xc, xs=xs, nc=nc, ns=ns, sc=sc, ss=ss, xc_t=xc_t, xs_t=xs_t, out_c=out_c, out_s=out_s)
        if cycle_refs:  # the cycle's references: the single LoRA through the cycle's passes
            draw.update(i_cc=self._two_pass("c", out_c, xc_t, nc, sc, self.data.cond_c),
                        i_ss=self._two_pass("s", out_s, xs_t, ns, ss, self.data.cond_s))
        return draw

    def build_draws(self) -> None:
        """draws="cached": ``cached_draws`` draws from a generator of their own, built once (the first step)."""
        g = torch.Generator().manual_seed(self.cfg.seed + 101)
        self.draws = [self.make_draw(g, self.uses_cycle()) for _ in range(self.cfg.cached_draws)]

    def uses_cycle(self) -> bool:
        return self.cfg.method == "duolora" and self.cfg.lambda_cycle > 0

    def cycle_due(self) -> bool:
        return self.uses_cycle() and self.step % self.cfg.cycle_every == 0

    def _two_pass(self, which: str, out, x_t, noise, sigma, cond) -> torch.Tensor:
        """The single LoRA's x0 after the same passes as the cycle (so that only what the cycle adds and removes
        differs): the translating pass (``out`` is its first output), re-noised with the same noise, denoised."""
        pt = self.model.prediction_type
        fwd = lambda x, s, c: self._single(which, x, s, c)  # noqa: E731
        first = self.translate(fwd, x_t, sigma, cond, out)
        again = add_noise(pt, first, noise, sigma)
        return to_x0(pt, self._single(which, again, sigma, cond), again, sigma)

    def sigma_path(self, sigma: torch.Tensor) -> list[torch.Tensor]:
        """The sigmas after each of the translating pass's steps but the last (which goes to x0): translate_steps
        evenly spaced points of the model's schedule from ``sigma`` down."""
        k = self.cfg.translate_steps
        if k == 1:
            return []
        sched = torch.sort(self.model.sigmas.detach().float().cpu()).values
        idx = torch.searchsorted(sched, sigma.detach().float().cpu().reshape(-1)).clamp(max=len(sched) - 1)
        return [sched[torch.round(idx.float() * (k - j) / k).long()].reshape(sigma.shape).to(sigma)
                for j in range(1, k)]

    def translate(self, forward, x_t, sigma, cond, first_out=None) -> torch.Tensor:
        """x0 after translate_steps deterministic (DDIM) steps of ``forward`` from ``x_t`` at ``sigma``; one step
        is the one-step x0 estimate. ``first_out``: the first step's output, when already computed."""
        pt, x, s = self.model.prediction_type, x_t, sigma
        for nxt in self.sigma_path(sigma) + [None]:
            out = forward(x, s, cond).float() if first_out is None else first_out
            first_out = None
            x0 = to_x0(pt, out, x, s)
            if nxt is None:
                return x0
            x, s = add_noise(pt, x0, to_eps(pt, out, x, s), nxt), nxt
        raise AssertionError("unreachable")

    # -- the objective -----------------------------------------------------------------------------------
    def sample_batch(self):
        if self.cfg.draws == "fresh":  # the trainer's generator (saved in checkpoints): a resumed run continues it
            self.draw = self.make_draw(self.generator, self.cycle_due())
            self.cycle_draw = self.draw
        else:
            if self.draws is None:
                self.build_draws()
            self.draw = self.draws[self.step % len(self.draws)]
            # its own walk through the draws, so that cycle_every > 1 still visits every draw
            self.cycle_draw = self.draws[(self.step // self.cfg.cycle_every) % len(self.draws)]
        d = self.draw
        return d["xc"], self.data.cond_c, d["nc"], d["sc"]

    def recon(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One reconstruction term: MSE, or for DuoLoRA with recon_loss="norm" the L2 norm per sample (mean)."""
        if self.cfg.method == "duolora" and self.cfg.recon_loss == "norm":
            return torch.linalg.vector_norm((pred - target).flatten(1), dim=1).mean()
        return F.mse_loss(pred, target)

    def loss(self, x0, cond, noise, sigma) -> torch.Tensor:
        d, pt = self.draw, self.model.prediction_type
        self.parts = {}
        pred_c = self.model.net_forward(d["xc_t"], d["sc"], self.data.cond_c).float()
        pred_s = self.model.net_forward(d["xs_t"], d["ss"], self.data.cond_s).float()
        recon = self.recon(pred_c, d["out_c"]) + self.recon(pred_s, d["out_s"])
        self.parts["recon"] = float(recon.detach())
        if self.cfg.method == "ziplora":
            ortho = ziplora_orthogonality(self.network)
            self.parts["ortho"] = float(ortho.detach())
            return recon + self.cfg.lambda_ziplora * ortho
        if self.cfg.method != "duolora":
            return recon
        cycle = torch.zeros((), device=recon.device)
        if self.cycle_due():
            cycle = self.cycle_loss(self.cycle_draw, pt)
            self.parts["cycle"] = float(cycle.detach())
        prior = torch.zeros((), device=recon.device)
        if self.cfg.lambda_layer_prior:
            prior = layer_prior_loss(self.network, self.layer_kinds, self.cfg.prior_hinge,
                                     self.cfg.prior_normalization).to(recon.device)
            self.parts["prior"] = float(prior.detach())
        lc, lp = self.cfg.lambda_cycle, self.cfg.lambda_layer_prior
        if self.cfg.loss_weighting == "equation":  # L = l_prior L_prior + l_cycle L_constyle (recon + cycles)
            return lp * prior + lc * (recon + cycle)
        return recon + lc * cycle + lp * prior

    def cycle_loss(self, d: dict, pt: str) -> torch.Tensor:
        fwd = self.model.net_forward
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.cycle_translate_grad):
            # translate: add the other concept with the mixed prompt
            i_cs = self.translate(fwd, d["xc_t"], d["sc"], self.data.cond_cs)
            i_sc = self.translate(fwd, d["xs_t"], d["ss"], self.data.cond_cs)
        cs_t, sc_t = add_noise(pt, i_cs, d["nc"], d["sc"]), add_noise(pt, i_sc, d["ns"], d["ss"])
        i_csc = to_x0(pt, fwd(cs_t, d["sc"], self.data.cond_c).float(), cs_t, d["sc"])
        i_scs = to_x0(pt, fwd(sc_t, d["ss"], self.data.cond_s).float(), sc_t, d["ss"])
        return F.mse_loss(i_csc, d["i_cc"]) + F.mse_loss(i_scs, d["i_ss"])

    def train_step(self) -> float:
        if self.cfg.method == "naive":  # nothing to learn: a scalar blend
            self.step += 1
            self.losses.append(0.0)
            return 0.0
        return super().train_step()

    # -- output ----------------------------------------------------------------------------------------
    def masks(self) -> dict[str, dict[str, list[float]]]:
        return {n: {"c": l.m_c.detach().cpu().tolist(), "s": l.m_s.detach().cpu().tolist()}
                for n, l in self.network.items()}

    def metadata(self) -> dict[str, str]:
        meta = super().metadata()
        kinds = {n: k for n, (k, _) in self.layer_kinds.items()}
        masks = self.masks() if self.cfg.method != "ziplora" else {
            n: {"c_mean": sum(m["c"]) / len(m["c"]), "s_mean": sum(m["s"]) / len(m["s"])}
            for n, m in self.masks().items()}  # output-dimension masks are too long for metadata
        meta.update(idlora_method=f"merge_{self.cfg.method}", idlora_masks=json.dumps(masks),
                    idlora_layer_kinds=json.dumps(kinds), idlora_config=json.dumps(asdict(self.cfg)),
                    idlora_ranks=json.dumps({"content": _rank(self.content_w), "style": _rank(self.style_w)}))
        return meta

    def bundle(self) -> LoraBundle:
        saved = {n: (l.m_c.detach().clone(), l.m_s.detach().clone()) for n, l in self.network.items()}
        if self.cfg.prune_below > 0:  # on the export only: the live masks stay as trained
            self.network.set_masks({n: tuple(torch.where(m.abs() <= self.cfg.prune_below, 0.0, m) for m in ms)
                                    for n, ms in saved.items()})
        try:
            weights = {n: LoraWeight(d, u, a) for n, (d, u, a) in self.network.export().items()}
            return LoraBundle(weights=weights, metadata=self.metadata(), key_style="module",
                              stems=lora_stems(self.model))
        finally:
            self.network.set_masks(saved)


def base_model_of(bundle: LoraBundle) -> str | None:
    return bundle.metadata.get("idlora_base_model") or bundle.metadata.get("ss_base_model_version") or None


def resolve_pair(content: LoraBundle, style: LoraBundle, shapes: dict[str, tuple], key_map: dict | None = None
                 ) -> tuple[dict, dict]:
    """Both LoRAs as {module name: (down, up, alpha)} on this model; TrainingInputError naming what is wrong."""
    from .lora_format import resolve
    bc, bs = base_model_of(content), base_model_of(style)
    if bc and bs and bc != bs:
        raise TrainingInputError(f"the content LoRA is for base model {bc!r} and the style LoRA for {bs!r}: merge two "
                                 f"LoRAs of the same base model")
    out = []
    for tag, bundle in (("content", content), ("style", style)):
        weights, report = resolve(bundle, shapes, key_map)
        if report.matched == 0 or report.shape_mismatch:
            raise TrainingInputError(f"the {tag} LoRA does not fit this model ({report.summary()}): it was made for "
                                     f"another base model ({base_model_of(bundle) or 'unknown'}); use a LoRA of this "
                                     f"checkpoint")
        out.append({n: (w.down, w.up, w.alpha) for n, w in weights.items()})
    return out[0], out[1]


def check_prompts(**prompts: str) -> None:
    empty = [k for k, v in prompts.items() if not (v or "").strip()]
    if empty:
        raise TrainingInputError(f"{', '.join(empty)} is empty: DuoLoRA needs the content prompt ('a <V1> object in "
                                 f"<S1> style'), the style prompt ('a <V2> object in <S2> style') and the mixed prompt "
                                 f"('a <V1> object in <S2> style')")


def _rank(weights: dict) -> int:
    return max((w[0].shape[0] for w in weights.values()), default=0)


def combine(bundles: list[LoraBundle], weights: list[float] | None = None) -> LoraBundle:
    """Multi-concept (Sec. 3.5): sum_i alpha_i <C_i, S>, alpha_i = 1/n by default; exact (ranks concatenated)."""
    if not bundles:
        raise TrainingInputError("no merged LoRAs to combine: connect at least one")
    alphas = weights or [1.0 / len(bundles)] * len(bundles)
    out: dict[str, LoraWeight] = {}
    for b, a in zip(bundles, alphas):
        for name, w in b.weights.items():
            scale = (w.alpha if w.alpha is not None else w.rank) / w.rank
            down, up = w.down * scale, w.up * a
            if name in out:
                prev = out[name]
                down, up = torch.cat([prev.down, down]), torch.cat([prev.up, up], dim=1)
            out[name] = LoraWeight(down, up, float(down.shape[0]))
    meta = dict(bundles[0].metadata, idlora_method="merge_multi_concept",
                idlora_multi_concept=json.dumps({"n": len(bundles), "alphas": alphas}))
    return LoraBundle(weights=out, metadata=meta, key_style="module",
                      stems={p: s for b in bundles for p, s in b.stems.items()})


def param_counts(shapes: dict[str, tuple[int, int]], rank: int) -> dict[str, int]:
    """Learnable numbers of each merge method for layers {name: (d_out, d_in)} and two rank-``rank`` LoRAs."""
    n = len(shapes)
    return {"ziprank": 2 * rank * n, "ziplora": 2 * sum(o for o, _ in shapes.values()), "naive": 0}

