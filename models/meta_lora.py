"""Meta-LoRA's three-factor adapter: h = W0 x + L_up^i L_mid^i L_meta-down x  (Meta-LoRA, Sec. 3, Eq. 1).

L_meta-down (r1 x d_in, shared by every identity) is followed by L_mid^i (r2 x r1) and L_up^i (d_out x r2), one
pair per identity. The pairs live in *slots*: a batch may mix identities, and each sample uses the slot given by
``set_slots``. Stage 1 keeps the identities of the current bucket in the slots and the others off the device;
stage 2 has one slot. The product collapses exactly to a standard rank-r2 LoRA:
lora_down = mid @ meta_down, lora_up = up, alpha = r2 (scale 1).

Conv2d targets: meta-down is a conv with the base layer's kernel, stride and padding; mid and up are 1x1.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from .lora import HookedAdapter, LoraConfigError, _key
from .storage import autocast_on


def check_ranks(r1: int, r2: int) -> None:
    for name, r in (("r1", r1), ("r2", r2)):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise LoraConfigError(f"{name} must be a whole number >= 1, got {r!r} (Meta-LoRA's defaults: r1 = 128, "
                                  f"r2 = 1)")
    if r2 > r1:
        raise LoraConfigError(f"r2 = {r2} is larger than r1 = {r1}: Mid maps r1 -> r2, so use r2 <= r1")


class MetaLoraNetwork(HookedAdapter, nn.Module):
    """Meta-Down, and ``slots`` (Mid, Up) pairs, on named Linear / Conv2d modules, attached with forward hooks."""

    def __init__(self, modules: dict[str, nn.Module], r1: int = 128, r2: int = 1, slots: int = 1, seed: int = 0):
        super().__init__()
        check_ranks(r1, r2)
        self.r1, self.r2, self.n_slots = r1, r2, int(slots)
        self.names = sorted(modules)
        self._targets = modules
        self.meta_down, self.mid, self.up = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.conv_args: dict[str, dict] = {}
        gen = torch.Generator().manual_seed(seed)
        for name in self.names:
            w = modules[name].weight
            k = _key(name)
            if isinstance(modules[name], nn.Conv2d):
                if modules[name].groups != 1:
                    raise LoraConfigError(f"grouped convolutions are not supported ({name}: groups={modules[name].groups})")
                m = modules[name]
                self.conv_args[k] = dict(stride=m.stride, padding=m.padding, dilation=m.dilation)
                down_shape = (r1, w.shape[1], *w.shape[2:])
            elif isinstance(modules[name], nn.Linear):
                down_shape = (r1, w.shape[1])
            else:
                raise LoraConfigError(f"Meta-LoRA supports Linear and Conv2d layers, not {type(modules[name]).__name__}")
            down = torch.empty(down_shape, device=w.device)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=gen)
            self.meta_down[k] = nn.Parameter(down)
            self.mid[k] = nn.Parameter(torch.zeros(slots, r2, r1, device=w.device))
            self.up[k] = nn.Parameter(torch.zeros(slots, w.shape[0], r2, device=w.device))
        for s in range(slots):
            self.init_slot(s, gen)
        self._slots = torch.zeros(1, dtype=torch.long)
        self._handles: list = []

    # -- slots -----------------------------------------------------------------
    @torch.no_grad()
    def init_slot(self, slot: int, generator: torch.Generator | None = None) -> None:
        """A fresh identity: Mid kaiming-uniform, Up zero (so the adapter starts at the base model)."""
        for k in self.mid:
            mid = torch.empty(self.mid[k].shape[1:])
            nn.init.kaiming_uniform_(mid, a=math.sqrt(5), generator=generator)
            self.mid[k][slot] = mid.to(self.mid[k].device)
            self.up[k][slot].zero_()

    def slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        """One identity's Mid and Up, as CPU tensors (to keep off the device)."""
        out = {}
        for k in self.mid:
            out[f"{k}.mid"] = self.mid[k][slot].detach().cpu().clone()
            out[f"{k}.up"] = self.up[k][slot].detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_slot_state(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        for k in self.mid:
            self.mid[k][slot] = state[f"{k}.mid"].to(self.mid[k].device)
            self.up[k][slot] = state[f"{k}.up"].to(self.up[k].device)

    def set_slots(self, slots: torch.Tensor) -> None:
        """The slot of each sample of the next forward passes (B,)."""
        self._slots = slots.long()

    def identity_parameters(self) -> list[nn.Parameter]:
        return [*self.mid.values(), *self.up.values()]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.meta_down.values())

    # -- forward ---------------------------------------------------------------
    def branch(self, k: str, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.meta_down[k].dtype) if not autocast_on(x) else x
        slots = self._slots.to(x.device)
        if slots.numel() != x.shape[0]:
            slots = slots.expand(x.shape[0]) if slots.numel() == 1 else slots
            if slots.numel() != x.shape[0]:
                raise RuntimeError(f"Meta-LoRA has slots for {slots.numel()} samples, the batch has {x.shape[0]}")
        if self.n_slots == 1:  # one identity (stage 2): fold Mid into Meta-Down, a rank-r2 branch like LoRA's
            return self._folded(k, x)
        mid, up = self.mid[k][slots], self.up[k][slots]  # (B, r2, r1), (B, out, r2)
        if k in self.conv_args:
            h = F.conv2d(x, self.meta_down[k], **self.conv_args[k])           # (B, r1, H, W)
            h = torch.einsum("brhw,bsr->bshw", h, mid)
            return torch.einsum("bshw,bos->bohw", h, up)
        h = F.linear(x, self.meta_down[k])                                     # (B, ..., r1)
        flat = h.reshape(h.shape[0], -1, h.shape[-1])
        out = torch.bmm(torch.bmm(flat, mid.transpose(1, 2)), up.transpose(1, 2))
        return out.reshape(*h.shape[:-1], out.shape[-1])

    def _folded(self, k: str, x: torch.Tensor) -> torch.Tensor:
        """mid @ meta_down first (r2 x r1 x d_in numbers, negligible), then x through that rank-r2 down: a stage-2
        step then costs what a LoRA step costs instead of sending every token through r1 dimensions."""
        down = self.meta_down[k]
        eff = (self.mid[k][0] @ down.flatten(1)).reshape(self.r2, *down.shape[1:])
        up = self.up[k][0]
        if k in self.conv_args:
            return F.conv2d(F.conv2d(x, eff, **self.conv_args[k]), up[:, :, None, None])
        return F.linear(F.linear(x, eff), up)

    def branch_of(self, name: str):
        k = _key(name)
        return lambda x: self.branch(k, x)

    # -- collapse ----------------------------------------------------------------
    @torch.no_grad()
    def collapse(self, slot: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{module name: (lora_down, lora_up, alpha)}: the exact standard rank-r2 LoRA of one slot."""
        out = {}
        for name in self.names:
            k = _key(name)
            down = self.meta_down[k].detach().float()
            d = self.mid[k][slot].detach().float() @ down.flatten(1)
            up = self.up[k][slot].detach().float()
            if k in self.conv_args:
                d, up = d.reshape(self.r2, *down.shape[1:]), up.reshape(*up.shape, 1, 1)
            out[name] = (d.cpu().clone(), up.cpu().clone(), float(self.r2))
        return out
