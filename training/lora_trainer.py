"""Plain LoRA training: the baseline every IDLoRA method is measured against.

The denoiser stays frozen; LoRA branches (models/lora.py) are attached with hooks
for the duration of training. Latents and prompt conditioning are encoded once and
cached. Timesteps come from the model's own discrete schedule, the loss is MSE
against the target of the model's prediction type, and all randomness flows from
one seeded generator, so a run is reproducible on the CPU.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..models.lora import LoraConfigError, LoraNetwork, check_rank_alpha, check_targets, select_targets
from .config import TrainingConfig, TrainingInputError
from .diffusion import (TIMESTEP_SAMPLINGS, Cond, DiffusionModel, add_noise, has_guidance, lora_stems,
                        sample_sigmas, target, to_x0)
from .lora_format import LoraBundle, LoraWeight

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BASE_MODEL_VERSIONS = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, value: float, lr: float):
        super().__init__(f"the loss became {value} at step {step}; training stopped. Lower the learning rate "
                         f"(now {lr:g}) or train in fp32")
        self.step, self.value = step, value


@dataclass
class LoraTrainConfig(TrainingConfig):
    steps: int = 300
    learning_rate: float = 1e-4
    rank: int = 16
    alpha: float | None = None           # None: alpha = rank (scale 1.0)
    targets: str = "attn"                # a preset of models.lora.PRESETS or a regex over module names
    exclude: str | None = None
    batch_size: int = 1
    seed: int = 0
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    max_grad_norm: float = 1.0           # 0 disables clipping
    gradient_checkpointing: bool = False
    precision: str = "auto"              # auto: bf16 autocast on CUDA when supported, fp32 elsewhere
    timestep_range: tuple[float, float] = (0.0, 1.0)  # fraction of the schedule that is sampled
    timestep_sampling: str = "auto"      # diffusion.TIMESTEP_SAMPLINGS; auto: uniform (U-Nets), shift (Flux)
    guidance: float | None = None        # Flux-dev's guidance input while training; None: 1.0 (kohya, ai-toolkit)
    compile: bool = False                # torch.compile the denoiser: faster steps; the first step compiles
    stream_blocks: bool = False          # the blocks' weights stay in CPU memory, copied to the device as they run

    def validate(self) -> "LoraTrainConfig":
        need = self.need
        need(isinstance(self.steps, int) and self.steps >= 1, "steps", "use a whole number >= 1")
        need(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate", "use e.g. 1e-4")
        try:
            check_rank_alpha(self.rank, self.alpha)
            check_targets(self.targets, self.exclude)
        except LoraConfigError as e:
            raise TrainingInputError(str(e)) from None
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "use a whole number >= 1")
        need(self.weight_decay >= 0, "weight_decay", "use a number >= 0")
        need(0 <= self.warmup_steps, "warmup_steps", "use a whole number >= 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "use a number >= 0 (0 disables clipping)")
        need(self.precision in PRECISIONS, "precision", f"use one of {PRECISIONS}")
        lo, hi = self.timestep_range
        need(0 <= lo < hi <= 1, "timestep_range", "use two fractions 0 <= low < high <= 1")
        need(self.timestep_sampling in TIMESTEP_SAMPLINGS, "timestep_sampling", f"use one of {TIMESTEP_SAMPLINGS}")
        need(self.guidance is None or (math.isfinite(self.guidance) and self.guidance >= 0), "guidance",
             "use a number >= 0 (Flux-dev trains at 1.0), or leave it empty")
        need(isinstance(self.compile, bool), "compile", "use true or false")
        need(isinstance(self.stream_blocks, bool), "stream_blocks", "use true or false")
        need(not self.stream_blocks or self.gradient_checkpointing, "stream_blocks",
             "turn gradient_checkpointing on too: a block's weights can leave the device after its forward only "
             "when backward recomputes it")
        need(not (self.stream_blocks and self.compile), "stream_blocks", "turn compile off: the two do not combine")
        return self


@dataclass
class TrainData:
    """Cached training inputs: latents (N, C, h, w) and one conditioning row per image."""
    latents: torch.Tensor
    cond: Cond
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def device(self) -> torch.device:
        return self.latents.device

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, Cond]:
        return self.latents[idx], {k: v[idx] for k, v in self.cond.items()}


def split_prompts(prompt: str | list[str], n_images: int) -> list[str]:
    """One prompt for all images, or one per image (a list, or one line per image)."""
    if n_images < 1:
        raise TrainingInputError("images is an empty batch (0 images): connect at least one image, "
                                 "e.g. from Load Image")
    prompts = prompt if isinstance(prompt, list) else [p.strip() for p in prompt.splitlines() if p.strip()]
    if not prompts:
        prompts = [""]
    if len(prompts) == 1:
        return prompts * n_images
    if len(prompts) != n_images:
        raise TrainingInputError(f"prompt has {len(prompts)} lines but images has {n_images} images: give one "
                                 f"prompt for all images, or exactly one line per image")
    return prompts


def check_images(images: torch.Tensor | None) -> torch.Tensor:
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        shape = None if images is None else tuple(images.shape)
        raise TrainingInputError(f"images must be a non-empty IMAGE batch (B, H, W, C), got shape {shape}: "
                                 f"connect at least one image")
    return images


def prepare_data(model: DiffusionModel, images: torch.Tensor, prompt: str | list[str],
                 conditioning=None) -> TrainData:
    """Encode images and prompts once, on the model's device. ``conditioning`` (a ComfyUI CONDITIONING, for models
    whose text encoder is not a CLIP input, e.g. Flux's T5) replaces the prompts: ``model.encode_conditioning``."""
    n = check_images(images).shape[0]
    prompts = split_prompts(prompt, n)
    h, w = images.shape[1], images.shape[2]
    with torch.no_grad():
        latents = model.encode_images(images).to(model.device, torch.float32)
        cond = model.encode_prompts(prompts, w, h) if conditioning is None else \
            model.encode_conditioning(conditioning, n, w, h)
    return TrainData(latents, {k: v.to(model.device) for k, v in cond.items()}, prompts)


def _keep_a_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a saved activation (dense; a view of a larger tensor gets only its own elements); a weight, or a
    view of one (F.linear saves weight.t()), is kept as it is."""
    return t if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter) else t.clone()


def _keep_a_strided_copy(t: torch.Tensor) -> torch.Tensor:
    """``_keep_a_copy`` with the saved tensor's exact strides, which a compiled backward expects; a view of a larger
    tensor (q of a fused qkv) then takes a buffer as large as the span its strides cover."""
    if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def saved_copies(strides: bool = False) -> contextlib.AbstractContextManager:
    """Autograd keeps a copy of each activation it saves (weights excepted), so that a model that then adds to that
    activation in place still gets exact gradients. ComfyUI's DiTs (Flux, SD3) do that to every block's residual
    stream (``img += ...`` after ``img_norm1(img)`` saved it), which plain autograd refuses. ``strides``: copies
    with the exact strides (for torch.compile's backward; more memory for saved views)."""
    return torch.autograd.graph.saved_tensors_hooks(_keep_a_strided_copy if strides else _keep_a_copy, _as_is)


def denoiser_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The denoiser's blocks, those with parameters: the items of top-level ModuleLists and the top-level children
    named '*block*'. A block that is an nn.Sequential is not called as a whole by every model (ComfyUI's U-Net walks
    the layers of its TimestepEmbedSequential blocks itself), so its layers stand in for it."""
    blocks: list[nn.Module] = []
    for name, child in denoiser.named_children():
        if isinstance(child, nn.ModuleList):
            blocks.extend(child)
        elif "block" in name:
            blocks.append(child)
    blocks = [m for b in blocks for m in (b.children() if isinstance(b, nn.Sequential) else [b])]
    return [b for b in blocks if any(p.numel() for p in b.parameters())]


@contextlib.contextmanager
def compiled_blocks(denoiser: nn.Module, inplace: bool = False) -> Iterator[int]:
    """torch.compile on each of the denoiser's blocks (``denoiser_blocks``), restored on exit; yields their number.
    Compile inside the LoRA session, so that each block's graph holds its layers' LoRA branches; the first call of a
    block compiles it (forward and backward). Compiled block by block, not as a whole: dynamo cannot trace the
    denoisers' own code between the blocks (ComfyUI's U-Net walks its blocks with Python-side options), and a
    checkpoint wrapper stays outside the compiled forward. The embeddings and the in/out layers stay eager.

    ``inplace`` (blocks that add to their residual stream in place after a LayerNorm saved it; Flux: ``img += ...``):
    the compiled graph is functional (it keeps the value the norm saw), but capturing it runs autograd, which refuses
    a saved tensor changed in place. So each norm of such a block reads a copy, which the compiler removes again;
    what the compiled pieces save for backward is copied by ``saved_copies(strides=True)`` (the session's)."""
    blocks = denoiser_blocks(denoiser)
    norms = [m for b in blocks for m in b.modules() if isinstance(m, nn.LayerNorm)] if inplace else []

    def on_a_copy(forward: Callable) -> Callable:
        return lambda x, *args, **kwargs: forward(x.clone(), *args, **kwargs)

    try:
        for m in norms:
            m.forward = on_a_copy(m.forward)
        for b in blocks:
            b.forward = torch.compile(b.forward)
        # ComfyUI's transformer blocks specialise on their block index (transformer_options): one graph per block,
        # more than dynamo's default of 8 per function
        with torch._dynamo.config.patch(recompile_limit=256):
            yield len(blocks)
    finally:
        for m in blocks + norms:
            m.__dict__.pop("forward", None)  # the class's forward is back


def checkpointed_block_list(denoiser: nn.Module) -> list[nn.Module]:
    """The blocks ``checkpointed_blocks`` wraps: ``denoiser_blocks`` with at least two layers (modules that hold
    parameters themselves); a block of one layer keeps its input for backward anyway, so its checkpoint frees
    nothing."""
    return [b for b in denoiser_blocks(denoiser)
            if sum(any(p.numel() for p in m.parameters(recurse=False)) for m in b.modules()) > 1]


class BlockStream:
    """Block weight streaming: the weights of ``blocks`` live in CPU memory (pinned, for a CUDA device) and are copied
    to ``device`` when a block runs; at most ``resident`` blocks have a copy there at once (the least recently run
    one is dropped), so the device holds the rest of the model, ``resident`` blocks and the activations, not the
    whole model. Frozen weights are never copied back. A context manager: on exit every weight is back where it was.

    Safe only with the reentrant checkpoint (``checkpointed_blocks(stream=...)``): nothing else may keep a block's
    device weights for backward. ``fetches`` counts the copies to the device, ``most_resident`` the most blocks
    that had a copy there at once."""

    def __init__(self, blocks: list[nn.Module], device: torch.device | str, resident: int = 2):
        if resident < 1:
            raise ValueError(f"resident must be >= 1, got {resident}")
        self.device, self.resident = torch.device(device), resident
        self.tensors = {b: [*b.parameters(), *b.buffers()] for b in blocks}
        self.home: dict[int, torch.device] = {}
        self.master: dict[int, torch.Tensor] = {}
        self.on_device: list[nn.Module] = []
        self.fetches = self.most_resident = 0

    def __enter__(self) -> "BlockStream":
        pin = self.device.type == "cuda"
        for ts in self.tensors.values():
            for t in ts:
                self.home[id(t)] = t.device
                master = t.data.to("cpu")
                self.master[id(t)] = master.pin_memory() if pin else master
                t.data = self.master[id(t)]
        return self

    def __exit__(self, *exc) -> None:
        self.on_device.clear()
        for ts in self.tensors.values():
            for t in ts:
                t.data = self.master[id(t)].to(self.home[id(t)])
        self.master.clear()

    def fetch(self, block: nn.Module) -> None:
        if block in self.on_device:
            self.on_device.remove(block)
            self.on_device.append(block)
            return
        while len(self.on_device) >= self.resident:
            for t in self.tensors[self.on_device.pop(0)]:
                t.data = self.master[id(t)]
        for t in self.tensors[block]:
            # copy=True: a copy even when the device is the CPU, so that what is resident can be told apart
            t.data = self.master[id(t)].to(self.device, non_blocking=True, copy=True)
        self.on_device.append(block)
        self.fetches += 1
        self.most_resident = max(self.most_resident, len(self.on_device))

    def fetching(self, block: nn.Module, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            self.fetch(block)
            return fn(*args, **kwargs)
        return run


@contextlib.contextmanager
def checkpointed_blocks(denoiser: nn.Module, inplace: bool = False,
                        stream: "BlockStream | None" = None) -> Iterator[int]:
    """Gradient checkpointing on the denoiser's blocks, restored on exit. Yields the number of wrapped blocks.

    The blocks are ``denoiser_blocks``. Each is wrapped once, and none inside another: every layer runs twice per
    step (forward, then again in backward), never more.

    Not wrapped: a block that is a single layer (a U-Net's Downsample and Upsample convolutions, its input
    convolution). Its checkpoint keeps its input anyway, so recomputing the layer frees at most a resampled copy
    of that input: on SD1.5 at 256 px the six resamplers were 10% of the recomputed FLOPs (19 of 186 GFLOP per
    step) and freed nothing measurable.

    In a block with k x k convolutions (k > 1: a U-Net's residual blocks), the convolutions' outputs are kept
    from the forward and only the rest is recomputed (``_checkpointed``). ``inplace`` blocks recompute everything.

    ``inplace``: the blocks add to their inputs in place (ComfyUI's Flux and SD3). torch's non-reentrant
    checkpoint then recomputes from tensors the block has changed since, and its gradients are silently wrong
    (measured on a two-block toy over 10 seeds: off by 2-9% of the gradient's norm). Such blocks get the reentrant
    checkpoint instead: the forward keeps nothing, and the recompute runs on copies of the inputs under
    ``saved_copies``.

    ``stream`` (a ``BlockStream`` over the same blocks): each block fetches its weights to the device when it runs,
    in the forward and in the recompute. Streamed blocks get the reentrant checkpoint: its forward keeps nothing and
    its backward recomputes and runs the block's whole backward at once, so a block's weights are free to leave the
    device as soon as another block needs the room.
    """
    blocks = checkpointed_block_list(denoiser)
    own = [b.__dict__.get("forward") for b in blocks]  # a forward set on the instance before (torch.compile's)
    for b in blocks:
        convs = any(isinstance(m, nn.modules.conv._ConvNd) and math.prod(m.kernel_size) > 1 for m in b.modules())
        if stream is not None:
            b.forward = _checkpointed_inplace(stream.fetching(b, b.forward))
        else:
            b.forward = _checkpointed_inplace(b.forward) if inplace else _checkpointed(b.forward, keep_convs=convs)
    try:
        yield len(blocks)
    finally:
        for b, fwd in zip(blocks, own):
            if fwd is None:
                del b.forward  # drop the instance attribute; the class method is back
            else:
                b.forward = fwd


def _keep_conv_outputs(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep the outputs of k x k convolutions (k > 1), recompute everything else."""
    policy = torch.utils.checkpoint.CheckpointPolicy
    if op is torch.ops.aten.convolution.default and math.prod(args[1].shape[2:]) > 1:
        return policy.MUST_SAVE
    return policy.PREFER_RECOMPUTE


def _checkpointed(fn: Callable, keep_convs: bool = False) -> Callable:
    """``fn`` under torch's non-reentrant checkpoint. ``keep_convs``: the outputs of its k x k convolutions are kept
    from the forward (selective checkpointing) and only the rest is recomputed in backward. A k x k convolution
    costs k^2 times the multiply-adds per output element of a 1 x 1 one (9x for a 3x3), and is what a U-Net's
    residual block spends its FLOPs on, while most of what the block keeps for backward are its norms' and
    activations' outputs, cheap to recompute from the convolutions' outputs. On SD1.5 at 256 px this halved the
    recomputed FLOPs (186 -> ~85 GFLOP per step) for 2 MB more activation peak (194 vs 192 MB; 674 MB without
    checkpointing)."""
    selective = getattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts", None)  # torch >= 2.4
    context_fn = (lambda: selective(_keep_conv_outputs)) if keep_convs and selective else None

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        if context_fn is None:
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
    return run


def _checkpointed_inplace(fn: Callable) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        names = list(kwargs)  # the reentrant checkpoint takes positional inputs only

        def on_copies(*values):
            values = [v.clone() if torch.is_tensor(v) else v for v in values]
            with saved_copies():
                return fn(*values[:len(args)], **dict(zip(names, values[len(args):])))

        # it passes gradients only through inputs that require them: a block before the first LoRA layer gets
        # inputs that do not, so they are made to (each a leaf of its own, with nothing upstream to reach)
        values = [v.detach().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() and not v.requires_grad
                  else v for v in (*args, *kwargs.values())]
        return torch.utils.checkpoint.checkpoint(on_copies, *values, use_reentrant=True)
    return run


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


StepCallback = Callable[[int, int, float], None]  # (step done, total steps, loss); may raise to stop


class LoraTrainer:
    """Trains one LoRA on cached data. Methods subclass it and override ``loss`` and the other pieces of
    ``train_step``."""

    method = "lora"

    def __init__(self, model: DiffusionModel, data: TrainData, config: LoraTrainConfig):
        self.cfg = config.validate()
        self.model, self.data = model, data
        targets = self.target_modules()
        for p in model.denoiser.parameters():
            p.requires_grad_(False)
        self.network = self.build_network(targets).to(model.device)
        self.optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.cfg.learning_rate,
                                           weight_decay=self.cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.amp_dtype = autocast_dtype(self.cfg.precision, model.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.step = 0
        self.losses: list[float] = []
        self.batch_idx = torch.zeros(0, dtype=torch.long)  # training-image indices of the last batch
        self.stream: BlockStream | None = None  # with stream_blocks: the last session's (its counters)
        self.set_guidance()

    def set_guidance(self) -> None:
        """Give the model the guidance value it trains at (Flux-dev); refuse one for a model without guidance."""
        g = self.cfg.guidance
        if g is None:
            return
        if not has_guidance(self.model):
            raise TrainingInputError(
                f"guidance = {g:g} is set, but this model ({self.model.name}) has no guidance embedding (Flux-dev "
                f"has one; SD1.x, SDXL, SD3 and Flux-schnell do not): leave guidance empty (0 in the node)")
        self.model.guidance = float(g)

    def target_modules(self) -> dict[str, nn.Module]:
        """The layers that get LoRA: ``cfg.targets`` (minus ``cfg.exclude``) on this model."""
        try:
            return select_targets(self.model.denoiser, self.cfg.targets, self.cfg.exclude)
        except LoraConfigError as e:
            raise TrainingInputError(str(e)) from None

    def build_network(self, targets: dict[str, nn.Module]) -> nn.Module:
        """The adapter on the chosen layers (methods with other adapters override it)."""
        return LoraNetwork(targets, self.cfg.rank, self.cfg.alpha, seed=self.cfg.seed)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at an optimizer step (linear warm-up). Methods override it."""
        warm = self.cfg.warmup_steps
        return min(1.0, (step + 1) / warm) if warm else 1.0

    # -- sampling ----------------------------------------------------------
    def sample_batch(self) -> tuple[torch.Tensor, Cond, torch.Tensor, torch.Tensor]:
        """(x0, cond, noise, sigma) for one step; all randomness from self.generator (on CPU)."""
        n, b, g = len(self.data), self.cfg.batch_size, self.generator
        idx = torch.randperm(n, generator=g)[:b] if b <= n else torch.randint(0, n, (b,), generator=g)
        self.batch_idx = idx
        x0, cond = self.data.batch(idx.to(self.data.device))
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        sigma = self.sample_sigmas(x0.shape[0], tuple(x0.shape[-2:]))
        return x0, cond, noise, sigma.to(x0.device)

    def sample_sigmas(self, n: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """``n`` training sigmas from self.generator, by the config's timestep sampling and range."""
        try:
            return sample_sigmas(self.model, self.cfg.timestep_sampling, n, self.generator, latent_hw,
                                 self.cfg.timestep_range)
        except ValueError as e:
            raise TrainingInputError(str(e)) from None

    def loss(self, x0: torch.Tensor, cond: Cond, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """MSE between the network output and the target of the model's prediction type."""
        pt = self.model.prediction_type
        out = self.model.net_forward(add_noise(pt, x0, noise, sigma), sigma, cond)
        return F.mse_loss(out.float(), target(pt, x0, noise, sigma).float())

    # -- one step ------------------------------------------------------------
    def train_step(self) -> float:
        """One step: the only step loop of the LoRA trainers. Methods change it through the pieces it calls
        (``before_step``, ``sample_batch``, ``loss``, ``zero_grad``, ``update_groups``, ``backward``,
        ``reduce_gradients``, ``update``, ``after_step``), never by copying it."""
        self.before_step()
        x0, cond, noise, sigma = self.sample_batch()
        amp = (torch.autocast(self.model.device.type, dtype=self.amp_dtype) if self.amp_dtype
               else contextlib.nullcontext())
        with amp:
            loss = self.loss(x0, cond, noise, sigma)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(self.step + 1, value, self.scheduler.get_last_lr()[0])
        self.zero_grad()
        groups = self.update_groups()
        self.backward(loss, [opt for opt, _ in groups])
        self.reduce_gradients()
        self.update(groups)
        self.step += 1
        self.losses.append(value)
        self.after_step()
        return value

    def before_step(self) -> None:
        """Set-up before the batch is drawn (Meta-LoRA stage 1: its bucket)."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def update_groups(self) -> list[tuple[torch.optim.Optimizer, list[nn.Parameter]]]:
        """(optimizer, its parameters) for each optimizer this step steps; each group is clipped on its own."""
        return [(self.optimizer, self.trainable_parameters())]

    def backward(self, loss: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
        if self.scaler:
            self.scaler.scale(loss).backward()
            for opt in optimizers:
                self.scaler.unscale_(opt)
        else:
            loss.backward()

    def reduce_gradients(self) -> None:
        """Combine the gradients across processes before clipping (data parallelism); one process: nothing."""

    def update(self, groups: list[tuple[torch.optim.Optimizer, list[nn.Parameter]]]) -> None:
        """Clip and step each group; the scheduler follows ``self.optimizer`` (it advances when that one steps)."""
        for opt, params in groups:
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            if self.scaler:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler:
            self.scaler.update()
        if any(opt is self.optimizer for opt, _ in groups):
            self.scheduler.step()

    def after_step(self) -> None:
        """Book-keeping once ``self.step`` counts the finished step."""

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """LoRA attached, grads on (also inside ComfyUI's inference mode), checkpointing and torch.compile if asked
        (``checkpointed_blocks``, ``compiled_blocks``; the first step compiles)."""
        inplace = bool(getattr(self.model, "inplace_blocks", False))
        if self.cfg.compile and inplace and self.cfg.gradient_checkpointing:
            raise TrainingInputError(
                f"compile and gradient_checkpointing cannot be combined on {self.model.name}: its blocks add to "
                f"their inputs in place, so checkpointing recomputes them on copies (a reentrant checkpoint), which "
                f"torch.compile's kernels do not accept: turn one of them off")
        # compiled before the checkpoint wraps the blocks: the compiled forward runs inside the checkpoint
        stream = BlockStream(checkpointed_block_list(self.model.denoiser), self.model.device) \
            if self.cfg.stream_blocks else None
        self.stream = stream  # its counters stay readable after the session
        ckpt = checkpointed_blocks(self.model.denoiser, inplace, stream) if self.cfg.gradient_checkpointing \
            else contextlib.nullcontext()
        compiled = compiled_blocks(self.model.denoiser, inplace) if self.cfg.compile else contextlib.nullcontext()
        copies = saved_copies(strides=self.cfg.compile) if inplace else contextlib.nullcontext()
        with torch.inference_mode(False), torch.enable_grad(), self.network.attached(), compiled, ckpt, copies, \
                stream or contextlib.nullcontext():
            self.network.train()
            yield

    def run(self, on_step: StepCallback | None = None) -> LoraBundle:
        t0 = time.perf_counter()
        with self.session():
            while self.step < self.cfg.steps:
                loss = self.train_step()
                if on_step:
                    on_step(self.step, self.cfg.steps, loss)
        log.info("trained %s for %d steps in %.1f s (final loss %.4f)", self.method, self.step,
                 time.perf_counter() - t0, self.losses[-1])
        return self.output()

    def output(self):
        """What ``run`` returns: the trained LoRA (a method whose product is something else overrides it)."""
        return self.bundle()

    # -- checkpoints and jobs ------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: adapter, optimizer, scheduler, RNG, step."""
        return {
            "network": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
            "alphas": self.alphas(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # a snapshot, not live moments
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "losses": list(self.losses),
        }

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        for n, layer in getattr(self.network, "items", dict)():
            layer.alpha = float(state["alphas"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.losses = [float(v) for v in state["losses"]]

    def alphas(self) -> dict[str, float]:
        return {n: layer.alpha for n, layer in self.network.items()}

    @torch.no_grad()
    def preview(self) -> torch.Tensor:
        """The model's x0 estimate of the first training latent at mid noise, with the LoRA, as an image.
        Uses a generator of its own, so previews never change the training run."""
        g = torch.Generator().manual_seed(self.cfg.seed + 1)
        x0, cond = self.data.batch(torch.tensor([0], device=self.data.device))
        sigma = self.model.sigmas[len(self.model.sigmas) // 2].reshape(1).to(x0.device)
        pt = self.model.prediction_type
        x_t = add_noise(pt, x0, torch.randn(x0.shape, generator=g).to(x0.device), sigma)
        out = self.model.net_forward(x_t, sigma, cond)
        return self.model.preview(to_x0(pt, out.float(), x_t, sigma))

    def run_in_job(self, ctx, phase: str = "train", sample_every: int = 0, step_offset: int = 0,
                   total: int | None = None) -> None:
        """Train inside a job: resume from its checkpoint (same phase), report progress, checkpoint every
        N steps, a preview sample every ``sample_every`` steps, and on cancel or failure leave a checkpoint
        of the last completed step. A job of several phases numbers its steps across them: this phase's
        step s is reported as ``step_offset + s`` of ``total``."""
        state = ctx.load_checkpoint()
        if state is not None and state.get("phase", phase) == phase:
            self.load_state_dict(state)
            ctx.rewind(step_offset + self.step)
        total = total or step_offset + self.cfg.steps
        with self.session():
            try:
                while self.step < self.cfg.steps:
                    ctx.token.raise_if_cancelled()
                    loss = self.train_step()
                    ctx.progress(step_offset + self.step, total, loss, phase)
                    if ctx.checkpoint_due(self.step):
                        ctx.save_checkpoint(self.state_dict(), phase)
                    if sample_every and (self.step % sample_every == 0 or self.step == self.cfg.steps):
                        ctx.add_sample(self.preview().cpu().numpy(), step_offset + self.step)
            except BaseException:
                ctx.save_checkpoint(self.state_dict(), phase)
                raise

    # -- output ------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        cfg = asdict(self.cfg)
        return {
            "ss_base_model_version": BASE_MODEL_VERSIONS.get(self.model.name, self.model.name),
            "ss_network_dim": str(self.cfg.rank),
            "ss_network_alpha": str(next(iter(self.alphas().values()), self.cfg.rank)),
            "ss_steps": str(self.step),
            "idlora_method": self.method,
            "idlora_phase": "",
            "idlora_ranks": json.dumps({"rank": self.cfg.rank}),
            "idlora_targets": self.cfg.targets,
            "idlora_base_model": self.model.name,
            "idlora_prediction_type": self.model.prediction_type,
            "idlora_config": json.dumps(cfg),
        }

    def bundle(self) -> LoraBundle:
        weights = {n: LoraWeight(layer.down.detach().float().cpu().clone(), layer.up.detach().float().cpu().clone(),
                                 layer.alpha) for n, layer in self.network.items()}
        return LoraBundle(weights=weights, metadata=self.metadata(), key_style="module", stems=lora_stems(self.model))
