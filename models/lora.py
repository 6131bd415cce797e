"""LoRA side branches for a frozen denoiser.

A LoRA layer never touches the base weight while training: the base module's
output gets a low-rank side branch added by a forward hook,

    y = W0 x (+ b) + scale * up(down(x)),   scale = alpha / rank,

so the frozen base needs no weight gradient and the hook is removed without a
trace. ``merge``/``unmerge`` fold the branch into the weight for inference, and
``delta`` gives the dense update in the weight's own shape.

Shapes follow the kohya / ComfyUI file contract:
    Linear(in, out):          down (r, in),          up (out, r)
    Conv2d(in, out, k):       down (r, in, kh, kw),  up (out, r, 1, 1)
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import re2
import torch
import torch.nn.functional as F
from torch import nn

from .storage import autocast_on

# Target presets, as regular expressions over dotted module names. They work on
# ComfyUI's ldm names and on diffusers' names alike (both call attention
# projections attn1/attn2.to_q|to_k|to_v|to_out.0, and the GEGLU MLP ff.net.*).
_ATTN = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_FF = r"ff\.net\.(0\.proj|2)$"
PRESETS: dict[str, str] = {
    "attn": _ATTN,
    "attn_ff": f"({_ATTN})|({_FF})",
    "all_linear": r".*",
    "all_linear_conv": r".*",
}
# Flux (ComfyUI's and BFL's module names, from which kohya names Flux LoRA keys: double_blocks.0.img_attn.qkv ->
# lora_unet_double_blocks_0_img_attn_qkv). A single block fuses attention and MLP in two layers (linear1: q, k, v and
# the MLP's input; linear2: the attention output and the MLP's output), so its attention cannot be trained alone
# without splitting them; kohya does not split them by default either (split_qkv off), and neither do these presets.
_FLUX_DOUBLE_ATTN = r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$"
_FLUX_SINGLE = r"single_blocks\.\d+\.linear[12]$"
_FLUX_DOUBLE_MLP = r"double_blocks\.\d+\.(img|txt)_mlp\.[02]$"
# SD3.x (MMDiT): joint blocks of an image (x) and a text (context) stream
_SD3_ATTN = r"joint_blocks\.\d+\.(x|context)_block\.attn\.(qkv|proj)$"
_SD3_MLP = r"joint_blocks\.\d+\.(x|context)_block\.mlp\.fc[12]$"
PRESETS.update({
    "flux_attn": f"({_FLUX_DOUBLE_ATTN})|({_FLUX_SINGLE})",
    "flux_all_linear": f"({_FLUX_DOUBLE_ATTN})|({_FLUX_DOUBLE_MLP})|({_FLUX_SINGLE})",
    "sd3_attn": _SD3_ATTN,
    "sd3_all_linear": f"({_SD3_ATTN})|({_SD3_MLP})",
})
PRESET_DOCS: dict[str, str] = {
    "attn": "U-Nets: attention q/k/v/out projections of every transformer block (self and cross attention)",
    "attn_ff": "U-Nets: attention projections plus the feed-forward (GEGLU) layers of every transformer block",
    "all_linear": "every Linear layer of the denoiser (attention, feed-forward, proj_in/out, time embeddings)",
    "all_linear_conv": "every Linear and Conv2d layer of the denoiser (kohya 'LoCon'-style coverage)",
    "flux_attn": "Flux: the double blocks' image and text attention (qkv, proj) and the single blocks' linear1 and "
                 "linear2 (each fuses attention with the MLP)",
    "flux_all_linear": "Flux: flux_attn plus the double blocks' MLPs: every Linear of the double and single blocks "
                       "but the modulation layers (kohya's default set for Flux)",
    "sd3_attn": "SD3.x: attention qkv and proj of both streams of every joint block",
    "sd3_all_linear": "SD3.x: sd3_attn plus the MLPs (fc1, fc2) of every joint block",
}
# The architecture each preset is written for (None: any model); see architecture().
PRESET_ARCH: dict[str, str | None] = {"attn": "unet", "attn_ff": "unet", "all_linear": None, "all_linear_conv": None,
                                      "flux_attn": "flux", "flux_all_linear": "flux", "sd3_attn": "sd3",
                                      "sd3_all_linear": "sd3"}
_ARCH_NAMES = {"unet": "U-Net models (SD1.x, SD2.x, SDXL)", "flux": "Flux", "sd3": "SD3.x"}


def architecture(model: nn.Module) -> str:
    """'flux', 'sd3' or 'unet', from the denoiser's top-level module names (BFL's double/single blocks, MMDiT's
    joint blocks, anything else)."""
    names = {n for n, _ in model.named_children()}
    if "double_blocks" in names:
        return "flux"
    if "joint_blocks" in names:
        return "sd3"
    return "unet"


def check_preset_fits(targets: str, model: nn.Module) -> None:
    """Raise LoraConfigError when ``targets`` is a preset written for another architecture than the model's."""
    want, have = PRESET_ARCH.get(targets), architecture(model)
    if want is None or want == have:
        return
    fits = [k for k, a in PRESET_ARCH.items() if a in (have, None)]
    raise LoraConfigError(f"targets = {targets!r} is a preset for {_ARCH_NAMES[want]}, but this model is a "
                          f"{'U-Net' if have == 'unet' else _ARCH_NAMES[have] + ' DiT'}: use one of "
                          f"{', '.join(fits)}")


class LoraConfigError(ValueError):
    """A LoRA setting is invalid; the message names the setting, the value and the fix."""


MAX_PATTERN_LEN = 2000
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def compile_pattern(pattern: str, name: str = "targets"):
    """A user's regular expression over module names, compiled with RE2.

    RE2 matches in time linear in the name, whatever the pattern: a pattern such as '(.+)+!' that makes Python's
    backtracking engine run for hours (holding the interpreter lock, so the whole server freezes) is harmless here.
    The price is RE2's syntax: no lookaround and no backreferences."""
    if not isinstance(pattern, str):
        raise LoraConfigError(f"{name} must be text, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_LEN:
        raise LoraConfigError(f"{name} is {len(pattern)} characters long; the limit is {MAX_PATTERN_LEN}: use a "
                              f"preset ({', '.join(PRESETS)}) or a shorter pattern")
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise LoraConfigError(f"{name} {pattern!r} is neither a preset ({', '.join(PRESETS)}) nor a regular "
                              f"expression IDLoRA accepts ({why}); patterns use RE2 syntax (no lookaround, no "
                              f"backreferences), e.g. 'attn2\\.to_(k|v)$'") from None


def check_targets(targets: str, exclude: str | None = None) -> None:
    """Raise LoraConfigError now (before any model loads or job starts) for a target pattern that cannot be used."""
    if targets not in PRESETS:
        compile_pattern(targets, "targets")
    if exclude:
        compile_pattern(exclude, "exclude")


def check_rank_alpha(rank: int, alpha: float | None) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoraConfigError(f"rank must be a whole number >= 1, got {rank!r}: set rank to e.g. 4, 8 or 16")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise LoraConfigError(f"alpha must be a finite number > 0, got {alpha!r}: use alpha = rank for scale 1.0")


class LoraLayer(nn.Module):
    """The low-rank branch of one Linear or Conv2d layer."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_rank_alpha(rank, alpha)
        w = base.weight
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            out_f, in_f, kh, kw = w.shape
            if base.groups != 1:
                raise LoraConfigError(f"grouped convolutions are not supported (groups={base.groups})")
            down_shape, up_shape = (rank, in_f, kh, kw), (out_f, rank, 1, 1)
            self.conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        elif isinstance(base, nn.Linear):
            out_f, in_f = w.shape
            down_shape, up_shape = (rank, in_f), (out_f, rank)
        else:
            raise LoraConfigError(f"LoRA supports Linear and Conv2d layers, not {type(base).__name__}")
        self.rank = rank
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.down = nn.Parameter(torch.empty(down_shape, dtype=dtype, device=w.device))
        self.up = nn.Parameter(torch.zeros(up_shape, dtype=dtype, device=w.device))
        # A: kaiming-uniform (as nn.Linear's own init), B: zero, so training starts at the base model.
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def set_weights(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> None:
        if down.shape != self.down.shape or up.shape != self.up.shape:
            raise LoraConfigError(f"given LoRA weights have shapes down {tuple(down.shape)} / up {tuple(up.shape)}, "
                                  f"the layer needs {tuple(self.down.shape)} / {tuple(self.up.shape)}")
        with torch.no_grad():
            self.down.copy_(down)
            self.up.copy_(up)
        self.alpha = float(alpha) if alpha is not None else float(self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not autocast_on(x):
            x = x.to(self.down.dtype)
        x = self.dropout(x)
        if self.is_conv:
            return F.conv2d(F.conv2d(x, self.down, **self.conv_args), self.up) * self.scale
        return F.linear(F.linear(x, self.down), self.up) * self.scale

    def delta(self) -> torch.Tensor:
        """The dense weight update scale * up @ down, in the base weight's shape (float32)."""
        up, down = self.up.detach().float(), self.down.detach().float()
        d = up.flatten(1) @ down.flatten(1)
        return (d.reshape(up.shape[0], *down.shape[1:]) if self.is_conv else d) * self.scale


def select_targets(model: nn.Module, targets: str = "attn", exclude: str | None = None) -> dict[str, nn.Module]:
    """Linear (and, for presets that ask for it, Conv2d) modules chosen by a preset or a regex.

    ``targets`` is a preset name (see PRESETS) or a regular expression searched in each dotted
    module name (e.g. ``attn2\\.to_(k|v)$``). Raises LoraConfigError when nothing matches.
    """
    check_preset_fits(targets, model)
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d) if targets == "all_linear_conv" else (nn.Linear,)
    pattern = PRESETS.get(targets)
    if pattern is None:
        kinds = (nn.Linear, nn.Conv2d)
    rx = compile_pattern(targets if pattern is None else pattern, "targets")
    ex = compile_pattern(exclude, "exclude") if exclude else None
    found = {n: m for n, m in model.named_modules()
             if n and isinstance(m, kinds) and rx.search(n) and not (ex and ex.search(n))}
    if not found:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        raise LoraConfigError(
            f"targets {targets!r} matched none of the {len(names)} Linear/Conv2d layers of this model "
            f"(examples: {names[:3]}); use a preset ({', '.join(PRESETS)}) or a pattern that matches those names")
    return found


class HookedAdapter:
    """``attach`` / ``detach`` / ``attached`` for adapters whose branch output is added to each target module's output
    by a forward hook. A subclass sets ``names``, ``_targets`` ({name: module}) and ``_handles`` ([]), and gives the
    branch of each target with ``branch_of``."""

    def branch_of(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def attach(self):
        if not self._handles:
            for name in self.names:
                self._handles.append(self._targets[name].register_forward_hook(_added(self.branch_of(name))))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def attached(self):
        self.attach()
        try:
            yield self
        finally:
            self.detach()


def _added(branch: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + branch(args[0]).to(output.dtype)
    return hook


class LoraNetwork(HookedAdapter, nn.Module):
    """A set of LoRA layers for named modules of one model, attached through forward hooks."""

    def __init__(self, modules: dict[str, nn.Module], rank: int, alpha: float | None = None,
                 dropout: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_rank_alpha(rank, alpha)
        gen = torch.Generator().manual_seed(seed)
        self.names = sorted(modules)
        self.layers = nn.ModuleDict()
        for name in self.names:  # sorted, so the init does not depend on module order
            layer = LoraLayer(modules[name], rank, alpha, dropout, generator=gen, dtype=dtype)
            self.layers[_key(name)] = layer
        self._targets = modules
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._merged = False

    def layer(self, name: str) -> LoraLayer:
        return self.layers[_key(name)]

    def items(self) -> Iterator[tuple[str, LoraLayer]]:
        return ((n, self.layers[_key(n)]) for n in self.names)

    # -- attaching -------------------------------------------------------
    def branch_of(self, name: str) -> LoraLayer:
        return self.layer(name)

    def attach(self) -> "LoraNetwork":
        if self._merged:
            raise RuntimeError("this LoRA is merged into the weights; unmerge it before attaching it")
        return super().attach()

    # -- dense views -----------------------------------------------------
    def deltas(self) -> dict[str, torch.Tensor]:
        return {n: layer.delta() for n, layer in self.items()}

    @torch.no_grad()
    def merge(self, strength: float = 1.0) -> None:
        """Add strength * delta into each base weight (for inference). NaN-safe: checks before writing."""
        if self._merged:
            raise RuntimeError("LoRA already merged")
        deltas = self.deltas()
        bad = [n for n, d in deltas.items() if not torch.isfinite(d).all()]
        if bad:
            raise ValueError(f"LoRA has non-finite weights in {len(bad)} layers (e.g. {bad[0]}); not merged")
        self.detach()
        for n, d in deltas.items():
            w = self._targets[n].weight
            w.add_((strength * d).to(w.dtype))
        self._merged_strength, self._merged = strength, True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self._merged:
            return
        for n, d in self.deltas().items():
            w = self._targets[n].weight
            w.sub_((self._merged_strength * d).to(w.dtype))
        self._merged = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _key(name: str) -> str:
    return name.replace(".", "__")


def freeze(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(False)
