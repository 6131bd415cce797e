"""Identity-preserving portrait stylization (Hitit & Görgülü 2025, building on ConsisLoRA, Chen et al. 2025).

Three trainings, run one after the other as the phases of one job:

1. ``content``: a content LoRA on the person's photo. ConsisLoRA's schedule: the usual noise-prediction loss for
   the first ``x0_start_step`` steps, then the x0-prediction loss ||x0_hat - x0||^2, where x0_hat is the
   denoiser's estimate of the clean latent, with a second learning rate. Added to it in the x0 steps only (the
   paper adds it to L_x0, never to the noise loss), every ``every`` steps and only for samples at low noise:
   lambda * (1 - cos) between the face embeddings of a decoded x0 estimate and of the photo
   (training/identity_loss.py). L_total = L_x0 + lambda * L_identity.
2. ``style_content``: ConsisLoRA's decoupling step. A content LoRA fitted on the style image (same schedule, no
   identity term) absorbs what the style image depicts; it is then frozen. 0 steps skips it.
3. ``style``: the style LoRA, trained on the style image with a style prompt and the x0 loss from the first
   step, with the frozen decoupling LoRA attached, so that it learns the style and not the style image's content.

Whose x0 the identity term scores (``IdentityConfig.target``):

- ``stylized`` (the default, the paper's reading: "the identity embeddings of both the original (input) and
  stylized (generated) images"): the x0 estimate of the photo's noisy latent with the content LoRA *and* the style
  LoRA attached, under the stylized prompt (``a photo of [c] person in the style of [v]``). A style LoRA must exist
  for that, so the phases run ``style_content -> style -> content``: ConsisLoRA's style LoRA never depends on the
  photo's content LoRA (it is fitted on the style image beside the decoupling LoRA), so training it first changes
  nothing in it. In the content phase the style LoRA is attached only for the stylized forward pass, and the
  identity term's gradient updates it too (the content phase's optimizer and learning rate); the x0 loss still
  reconstructs the photo with the content LoRA alone. The style LoRA is written when its phase ends and again,
  identity-tuned, when the content phase ends.
- ``reconstruction``: the photo's own reconstruction through the content LoRA alone (content LoRA first, as before).

At inference the content LoRA (of the photo) and the style LoRA are applied together, at separate strengths,
through two stock LoraLoaders or through IDLoRA Content/Style Guidance.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from ..models.lora import LoraConfigError, LoraNetwork, select_targets
from .config import TrainingConfig
from .diffusion import Cond, DiffusionModel, add_noise, lora_key_map, lora_stems, target, to_x0
from .jobs import load_job_data, save_job_data
from .config import TrainingInputError
from .identity_loss import EmbedFn, IdentityConfig, IdentityLoss
from .lora_format import LoraBundle, LoraFormatError, LoraWeight, load_lora, resolve, save_bundle
from .lora_trainer import LoraTrainConfig, LoraTrainer, TrainData

METHOD = "idlora_identity_style"


def _attn_in(block: str) -> str:
    """Attention projections inside one ComfyUI U-Net block (e.g. 'output_blocks.3.1')."""
    return rf"^{re.escape(block)}\..*attn[12]\.(to_q|to_k|to_v|to_out\.0)$"

# Where the content and the style LoRA go: (content targets, style targets, what it is). The targets are presets
# of models/lora.py or regular expressions over ComfyUI U-Net module names.
BLOCK_PRESETS: dict[str, tuple[str, str, str]] = {
    "attn": ("attn", "attn",
             "both LoRAs on every attention projection (any model; ConsisLoRA's SD1.5-free default split is "
             "unproven, so this is the safe choice)"),
    "sd15_down_up": (r"^(input_blocks|middle_block)\..*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
                     r"^output_blocks\..*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
                     "SD1.5: content on the encoder and middle attention, style on the decoder attention "
                     "(a heuristic split, not from a paper)"),
    "sd15_blora": (_attn_in("output_blocks.3.1"), _attn_in("output_blocks.4.1"),
                   "SD1.5: B-LoRA's idea moved to SD1.5's first decoder stage with attention: content on "
                   "up_blocks.1.attentions.0, style on up_blocks.1.attentions.1 (unproven for SD1.5)"),
    "sdxl_blora": (_attn_in("output_blocks.0.1"), _attn_in("output_blocks.1.1"),
                   "SDXL: the B-LoRA / ConsisLoRA blocks, content on up_blocks.0.attentions.0, style on "
                   "up_blocks.0.attentions.1"),
    "flux_attn": ("flux_attn", "flux_attn",
                  "Flux: both LoRAs on the double blocks' attention and the single blocks' linear1/linear2 (our "
                  "papers have no B-LoRA-like block finding for Flux, so no split: a default, not a result)"),
}


def fitting_block_presets(denoiser: torch.nn.Module) -> list[str]:
    """The BLOCK_PRESETS whose content and style targets both select layers of this denoiser (a U-Net preset on
    Flux, or SDXL's blocks on SD1.5, do not)."""
    fits = []
    for name, (content, style, _) in BLOCK_PRESETS.items():
        try:
            select_targets(denoiser, content)
            select_targets(denoiser, style)
        except LoraConfigError:
            continue
        fits.append(name)
    return fits


@dataclass
class X0TrainConfig(LoraTrainConfig):
    x0_start_step: int = 0                  # noise-prediction loss before this step, x0-prediction loss from it
    x0_learning_rate: float | None = None   # learning rate once the x0 loss is on (None: unchanged)
    noise_offset: float = 0.0               # per-channel offset noise (ConsisLoRA's style training uses 0.03)

    def validate(self) -> "X0TrainConfig":
        super().validate()
        self.need(isinstance(self.x0_start_step, int) and 0 <= self.x0_start_step <= self.steps, "x0_start_step",
                  f"use a whole number from 0 (x0 loss from the start) to steps = {self.steps} (noise loss only)")
        lr2 = self.x0_learning_rate
        self.need(lr2 is None or (math.isfinite(lr2) and lr2 > 0), "x0_learning_rate", "use a number > 0, e.g. 1e-4")
        self.need(math.isfinite(self.noise_offset) and self.noise_offset >= 0, "noise_offset",
                  "use a number >= 0, e.g. 0.03")
        return self


class X0LoraTrainer(LoraTrainer):
    """ConsisLoRA's trainer: noise loss, then x0 loss with a second learning rate; optional frozen LoRAs attached."""

    method = METHOD

    def __init__(self, model: DiffusionModel, data: TrainData, config: X0TrainConfig,
                 frozen: list[LoraNetwork] | None = None):
        super().__init__(model, data, config)
        self.frozen = list(frozen or [])

    def lr_factor(self, step: int) -> float:
        f = super().lr_factor(step)
        if step >= self.cfg.x0_start_step and self.cfg.x0_learning_rate:
            f *= self.cfg.x0_learning_rate / self.cfg.learning_rate
        return f

    def uses_x0(self) -> bool:
        return self.step >= self.cfg.x0_start_step

    def sample_batch(self):
        x0, cond, noise, sigma = super().sample_batch()
        if self.cfg.noise_offset:
            offset = torch.randn(noise.shape[:2] + (1, 1), generator=self.generator).to(noise.device)
            noise = noise + self.cfg.noise_offset * offset
        return x0, cond, noise, sigma

    def predict(self, x0: torch.Tensor, cond: Cond, noise: torch.Tensor, sigma: torch.Tensor):
        """(raw network output, its x0 estimate)."""
        pt = self.model.prediction_type
        x_t = add_noise(pt, x0, noise, sigma)
        out = self.model.net_forward(x_t, sigma, cond).float()
        return out, to_x0(pt, out, x_t.float(), sigma)

    def base_loss(self, out, x0_hat, x0, noise, sigma) -> torch.Tensor:
        if self.uses_x0():
            return F.mse_loss(x0_hat, x0.float())
        return F.mse_loss(out, target(self.model.prediction_type, x0, noise, sigma).float())

    def loss(self, x0, cond, noise, sigma) -> torch.Tensor:
        out, x0_hat = self.predict(x0, cond, noise, sigma)
        return self.base_loss(out, x0_hat, x0, noise, sigma)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for net in self.frozen:
                stack.enter_context(net.attached())
            stack.enter_context(super().session())
            yield


class IdentityContentTrainer(X0LoraTrainer):
    """The content LoRA with the identity term: L = L_x0 + lambda * (1 - cos(E(face(D(x0_hat))), E(photo))).

    The term runs only in the x0-loss steps (``uses_x0``: from ``x0_start_step`` on), never in the noise-loss
    warm-up. Without ``style``, x0_hat is the photo's reconstruction through the content LoRA (target
    'reconstruction'). With ``style`` (a trainable LoraNetwork: target 'stylized'), x0_hat is the stylized x0: the
    same noisy photo latent denoised with the content and the style LoRA attached, under ``stylized_cond`` (one row
    per training image; None: the photo's own prompt). The term's gradient then reaches both LoRAs; the x0 loss
    reaches the content LoRA alone. The style LoRA is trained by the same optimizer (its parameters only get a
    gradient, and only move, in the steps where the term applies)."""

    def __init__(self, model: DiffusionModel, data: TrainData, config: X0TrainConfig,
                 identity: IdentityLoss | None = None, style: LoraNetwork | None = None,
                 stylized_cond: Cond | None = None):
        self.style = style  # before LoraTrainer.__init__: trainable_parameters() builds the optimizer there
        if style is not None:
            if identity is None:
                raise TrainingInputError("a style LoRA was given for the stylized identity term, but no identity "
                                         "term: give an IdentityLoss too, or no style LoRA")
            if config.compile:
                raise TrainingInputError(
                    "compile cannot be combined with identity target 'stylized': the style LoRA's branches are "
                    "attached for the stylized forward pass only, which compiled blocks are not checked to follow; "
                    "turn compile off, or set the identity target to 'reconstruction'")
            if not any(p.requires_grad for p in style.parameters()):
                raise TrainingInputError("the style LoRA of the stylized identity term is frozen: build it with "
                                         "trainable=True (lora_network), so that the identity term can update it")
        super().__init__(model, data, config)
        self.identity = identity
        self.stylized_cond = stylized_cond
        if style is not None and stylized_cond is not None:
            rows = {k: int(v.shape[0]) for k, v in stylized_cond.items()}
            if any(r != len(data) for r in rows.values()):
                raise TrainingInputError(f"stylized_cond has {rows} rows for {len(data)} training image(s): give "
                                         f"one row per image")
        self.identity_values: list[tuple[int, float]] = []  # (step, mean 1 - cos) where the term was applied
        self._deferred: list[tuple[torch.Tensor, bool]] = []  # (loss part, with the style LoRA attached)
        if identity is not None:
            n = len(model.sigmas)
            lo, hi = identity.cfg.timestep_range
            self.id_sigma = (float(model.sigmas[int(lo * (n - 1))]), float(model.sigmas[int(round(hi * (n - 1)))]))

    @property
    def stylized(self) -> bool:
        return self.style is not None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        own = super().trainable_parameters()
        return own + ([p for p in self.style.parameters() if p.requires_grad] if self.style is not None else [])

    def identity_due(self, sigma: torch.Tensor) -> torch.Tensor | None:
        """Mask of the batch samples the identity term applies to at this step, or None. Never in the noise-loss
        steps: the paper adds the term to the x0 loss (L_total = L_x0 + lambda * L_identity)."""
        if self.identity is None or self.identity.cfg.weight == 0 or not self.uses_x0() \
                or self.step % self.identity.cfg.every:
            return None
        lo, hi = self.id_sigma
        mask = (sigma >= lo * (1 - 1e-6)) & (sigma <= hi * (1 + 1e-6))
        return mask if bool(mask.any()) else None

    def stylized_x0(self, x0: torch.Tensor, cond: Cond, noise: torch.Tensor, sigma: torch.Tensor,
                    idx: torch.Tensor) -> torch.Tensor:
        """The x0 estimate with the content and the style LoRA attached (the style LoRA only for this pass), under
        the stylized prompt of training images ``idx`` (the photo's own prompt without one)."""
        if self.stylized_cond is not None:
            rows = idx.to(next(iter(self.stylized_cond.values())).device)
            cond = {k: v[rows] for k, v in self.stylized_cond.items()}
        with self.style.attached():
            return self.predict(x0, cond, noise, sigma)[1]

    def loss(self, x0, cond, noise, sigma) -> torch.Tensor:
        self._deferred = []
        out, x0_hat = self.predict(x0, cond, noise, sigma)
        loss = self.base_loss(out, x0_hat, x0, noise, sigma)
        mask = self.identity_due(sigma)
        if mask is None:
            return loss
        idx = self.batch_idx[mask.cpu()]
        if self.stylized:
            m = mask.to(x0.device)
            scored = self.stylized_x0(x0[m], {k: v[m] for k, v in cond.items()}, noise[m], sigma[m], idx)
        else:
            scored = x0_hat[mask]
        term = self.identity(scored, idx).mean()
        self.identity_values.append((self.step + 1, float(term.detach())))
        weighted = self.identity.cfg.weight * term
        if self.stylized:
            # backward() runs the two parts apart, each with the LoRAs its forward had: a checkpointed block
            # recomputes its forward in backward, with the hooks attached at that moment
            self._deferred = [(loss, False), (weighted, True)]
        return loss + weighted

    def backward(self, loss: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
        parts, self._deferred = self._deferred, []
        if not parts:
            return super().backward(loss, optimizers)
        for part, with_style in parts:
            scaled = self.scaler.scale(part) if self.scaler else part
            with self.style.attached() if with_style else contextlib.nullcontext():
                scaled.backward()
        if self.scaler:
            for opt in optimizers:
                self.scaler.unscale_(opt)

    def style_bundle(self, metadata: dict[str, str]) -> LoraBundle:
        """The (identity-tuned) style LoRA as a file bundle, with ``metadata``."""
        weights = {n: LoraWeight(layer.down.detach().float().cpu().clone(), layer.up.detach().float().cpu().clone(),
                                 layer.alpha) for n, layer in self.style.items()}
        return LoraBundle(weights=weights, metadata=dict(metadata), key_style="module", stems=lora_stems(self.model))

    def state_dict(self) -> dict:
        state = dict(super().state_dict(), identity_values=[list(v) for v in self.identity_values])
        if self.style is not None:
            state["style_network"] = {k: v.detach().cpu().clone() for k, v in self.style.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.identity_values = [(int(s), float(v)) for s, v in state.get("identity_values", [])]
        if self.style is not None:
            if "style_network" not in state:
                raise TrainingInputError("this checkpoint has no style LoRA state, but the content phase scores the "
                                         "stylized x0: it was saved by a run with identity target 'reconstruction'")
            self.style.load_state_dict(state["style_network"])


def lora_network(model: DiffusionModel, bundle: LoraBundle, trainable: bool = False) -> LoraNetwork:
    """A LoRA (any key style IDLoRA reads) as a LoraNetwork on ``model``'s denoiser: frozen, or ``trainable``."""
    shapes = {n: tuple(m.weight.shape) for n, m in model.denoiser.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    weights, report = resolve(bundle, shapes, lora_key_map(model))
    if report.missing or report.shape_mismatch or not weights:
        raise LoraFormatError(f"the LoRA does not fit this model: {report.summary()}")
    rank = next(iter(weights.values())).down.shape[0]
    net = LoraNetwork({n: model.denoiser.get_submodule(n) for n in weights}, rank).to(model.device)
    for n, layer in net.items():
        w = weights[n]
        layer.set_weights(w.down.to(model.device), w.up.to(model.device), w.alpha)
    net.requires_grad_(trainable)
    return net


def frozen_network(model: DiffusionModel, bundle: LoraBundle) -> LoraNetwork:
    """A LoRA (any key style IDLoRA reads) as a frozen LoraNetwork on ``model``'s denoiser."""
    return lora_network(model, bundle, trainable=False)


# -- the job ------------------------------------------------------------------------

# ConsisLoRA's step counts (Chen et al. 2025), as the identity paper's authors run them in their public
# reimplementation: the content LoRA 1500 steps with the x0 loss from step 500 (the decoupling LoRA on the style
# image is such a content LoRA too), the style LoRA 1000 steps with the x0 loss throughout.
PAPER_STEPS = {"content": 1500, "x0_start_step": 500, "style_content": 1500, "style": 1000}


@dataclass
class IdentityStyleConfig(TrainingConfig):
    content: X0TrainConfig = field(default_factory=lambda: X0TrainConfig(
        steps=PAPER_STEPS["content"], learning_rate=2e-4, rank=32, x0_start_step=PAPER_STEPS["x0_start_step"],
        x0_learning_rate=1e-4))
    style_content_steps: int = PAPER_STEPS["style_content"]  # the decoupling LoRA on the style image; 0 skips it
    style: X0TrainConfig = field(default_factory=lambda: X0TrainConfig(
        steps=PAPER_STEPS["style"], learning_rate=1e-4, rank=32, x0_start_step=0, noise_offset=0.03))
    identity: IdentityConfig = field(default_factory=IdentityConfig)

    def validate(self) -> "IdentityStyleConfig":
        self.content.validate()
        self.style.validate()
        self.identity.validate()
        self.need(isinstance(self.style_content_steps, int) and self.style_content_steps >= 0, "style_content_steps",
                  "use a whole number >= 0 (0 skips ConsisLoRA's decoupling LoRA)")
        if self.stylized_identity() and self.content.compile:
            raise TrainingInputError(
                "content.compile = True is invalid with identity target 'stylized': the style LoRA is attached for "
                "one forward pass per step, which compiled blocks are not checked to follow; turn compile off, or "
                "set the identity target to 'reconstruction'")
        return self

    def stylized_identity(self) -> bool:
        """The identity term is on and scores the stylized x0: the style LoRA is trained before the content LoRA."""
        return self.identity.weight > 0 and self.identity.target == "stylized"

    def decouple(self) -> X0TrainConfig:
        """The decoupling LoRA's settings: the content schedule and targets, its own step count."""
        c = self.content
        x0_start = min(c.x0_start_step, self.style_content_steps)
        return X0TrainConfig(**dict(asdict(c), steps=self.style_content_steps, x0_start_step=x0_start))

    def phases(self) -> list[str]:
        """content -> style_content -> style; with the stylized identity term style_content -> style -> content
        (the content phase needs the style LoRA, which never needs the content LoRA)."""
        decouple = ["style_content"] if self.style_content_steps else []
        if self.stylized_identity():
            return decouple + ["style", "content"]
        return ["content"] + decouple + ["style"]

    def steps(self, phase: str) -> int:
        return {"content": self.content.steps, "style_content": self.style_content_steps,
                "style": self.style.steps}[phase]


@dataclass
class IdentityStyleData:
    """Everything encoded once: the photo (content prompt), the style image (decoupling and style prompts),
    the identity references (landmarks in training-image pixels, embeddings) and the stylized prompt, one row per
    photo (the prompt of the stylized x0 the identity term scores; None: the photo's own prompt)."""
    photo: TrainData
    style: TrainData
    style_content_cond: Cond
    landmarks: torch.Tensor      # (N, 5, 2)
    references: torch.Tensor     # (N, D)
    crop_size: int = 112
    stylized_cond: Cond | None = None

    def to(self, device: torch.device) -> "IdentityStyleData":
        def mv(d: TrainData) -> TrainData:
            return TrainData(d.latents.to(device), {k: v.to(device) for k, v in d.cond.items()}, d.prompts)
        stylized = None if self.stylized_cond is None else {k: v.to(device) for k, v in self.stylized_cond.items()}
        return IdentityStyleData(mv(self.photo), mv(self.style), {k: v.to(device) for k, v in
                                                                   self.style_content_cond.items()},
                                 self.landmarks, self.references.to(device), self.crop_size, stylized)

    def save(self, job_dir: Path) -> None:
        def pack(d: TrainData) -> dict:
            return {"latents": d.latents.cpu(), "cond": {k: v.cpu() for k, v in d.cond.items()},
                    "prompts": list(d.prompts)}
        payload = {"photo": pack(self.photo), "style": pack(self.style),
                   "style_content_cond": {k: v.cpu() for k, v in self.style_content_cond.items()},
                   "landmarks": self.landmarks.cpu(), "references": self.references.cpu(),
                   "crop_size": self.crop_size}
        if self.stylized_cond is not None:
            payload["stylized_cond"] = {k: v.cpu() for k, v in self.stylized_cond.items()}
        save_job_data(job_dir, payload)

    @classmethod
    def load(cls, job_dir: Path) -> "IdentityStyleData":
        d = load_job_data(job_dir, "its encoded photo and style image")

        def unpack(x: dict) -> TrainData:
            return TrainData(x["latents"], x["cond"], x["prompts"])
        return cls(unpack(d["photo"]), unpack(d["style"]), d["style_content_cond"], d["landmarks"],
                   d["references"], int(d["crop_size"]), d.get("stylized_cond"))


class Resources(NamedTuple):
    """What a job rebuilds from its recorded sources: the model and the identity backbone (None: no term)."""
    model: DiffusionModel
    embed: EmbedFn | None


ResourceLoader = Callable[[dict], Resources]


STYLE_PHASE_FILE = "style_phase.safetensors"  # the style LoRA as its phase left it (stylized target), in the job dir


class IdentityStyleTask:
    """The three trainings as one job (training/jobs.py Task). Each LoRA is written when its phase ends; with the
    stylized identity term (phases style_content -> style -> content) the style LoRA is written again,
    identity-tuned, when the content phase ends. A cancel keeps every LoRA a finished phase wrote."""

    kind = "idstyle"

    def __init__(self, cfg: IdentityStyleConfig, outputs: dict, sources: dict, loader: ResourceLoader,
                 data: IdentityStyleData | None = None, sample_every: int = 0):
        self.cfg = cfg.validate()
        self.data, self.loader = data, loader
        self.phases = cfg.phases()
        self.config = {"idstyle": cfg.to_dict(), "outputs": outputs, "sources": sources,
                       "sample_every": int(sample_every)}

    @classmethod
    def from_config(cls, config: dict, job_dir: Path, loader: ResourceLoader) -> "IdentityStyleTask":
        settings = dict(config["idstyle"])
        if "target" not in settings.get("identity", {"target": None}):
            # a job started before the identity target existed scored the reconstruction: it resumes as it began
            settings["identity"] = dict(settings["identity"], target="reconstruction")
        return cls(IdentityStyleConfig.from_dict(settings), config["outputs"], config["sources"], loader,
                   data=IdentityStyleData.load(job_dir), sample_every=config.get("sample_every", 0))

    def prepare(self, job_dir: Path) -> None:
        self.data.save(job_dir)

    def run(self, ctx) -> dict:
        res = self.loader(self.config["sources"])
        data = (self.data or IdentityStyleData.load(ctx.dir)).to(res.model.device)
        state = ctx.load_checkpoint()
        start = self.phases.index(state["phase"]) if state and state.get("phase") in self.phases else 0
        total = sum(self.cfg.steps(p) for p in self.phases)
        offset, result = 0, {}
        for i, phase in enumerate(self.phases):
            if i >= start:
                trainer = self.trainer(phase, res, data, ctx.dir)
                trainer.run_in_job(ctx, phase, self.config["sample_every"], step_offset=offset, total=total)
                result.update(self.finish(phase, trainer, ctx))
            offset += self.cfg.steps(phase)
        for phase in ("content", "style"):
            result.setdefault(f"{phase}_lora", self.config["outputs"][phase]["name"])
            result.setdefault(f"{phase}_path", self.config["outputs"][phase]["path"])
        return dict(result, lora=result["style_lora"], path=result["style_path"])  # the job's main LoRA

    def trainer(self, phase: str, res: Resources, data: IdentityStyleData, job_dir: Path) -> X0LoraTrainer:
        if phase == "content":
            identity = None
            if res.embed is not None and self.cfg.identity.weight > 0:
                decoder = res.model.decoder(self.cfg.identity.decoder)
                identity = IdentityLoss(decoder, res.embed, data.crop_size, data.landmarks, data.references,
                                        tuple(data.photo.latents.shape[-2:]), self.cfg.identity)
            style, stylized_cond = None, None
            if identity is not None and self.cfg.stylized_identity():
                style = lora_network(res.model, load_lora(job_dir / STYLE_PHASE_FILE), trainable=True)
                stylized_cond = data.stylized_cond
            return IdentityContentTrainer(res.model, data.photo, self.cfg.content, identity, style, stylized_cond)
        if phase == "style_content":
            decouple = TrainData(data.style.latents, data.style_content_cond, data.style.prompts)
            return X0LoraTrainer(res.model, decouple, self.cfg.decouple())
        frozen = [frozen_network(res.model, load_lora(job_dir / "style_content.safetensors"))] \
            if "style_content" in self.phases else []
        return X0LoraTrainer(res.model, data.style, self.cfg.style, frozen)

    def finish(self, phase: str, trainer: X0LoraTrainer, ctx) -> dict:
        bundle = trainer.bundle()
        bundle.metadata.update(idlora_phase=phase, idlora_job=ctx.job.id)
        if phase == "style_content":  # an intermediate of this job, kept in its folder for a resume
            save_bundle(ctx.dir / "style_content.safetensors", bundle)
            return {}
        out = self.config["outputs"][phase]
        if phase == "style" and self.cfg.stylized_identity():  # what the content phase starts from, on a resume too
            save_bundle(ctx.dir / STYLE_PHASE_FILE, bundle)
        save_bundle(out["path"], bundle)
        ctx.log.info("%s phase done: saved %s", phase, out["path"])
        extra = {}
        if phase == "content" and getattr(trainer, "identity_values", None):
            extra["identity_loss_last"] = trainer.identity_values[-1][1]
        if phase == "content" and getattr(trainer, "style", None) is not None:
            style_out = self.config["outputs"]["style"]
            meta = dict(load_lora(ctx.dir / STYLE_PHASE_FILE).metadata, idlora_phase="style", idlora_job=ctx.job.id,
                        idlora_identity_tuned=f"stylized x0, {len(trainer.identity_values)} identity steps of the "
                                              f"content phase")
            save_bundle(style_out["path"], trainer.style_bundle(meta))
            ctx.log.info("content phase done: saved the identity-tuned style LoRA %s", style_out["path"])
            extra.update(style_lora=style_out["name"], style_path=style_out["path"])
        return {f"{phase}_lora": out["name"], f"{phase}_path": out["path"], **extra}
