"""Masked merging of a content LoRA and a style LoRA on one model (DuoLoRA, ZipLoRA, naive).

For a layer with content LoRA (A_c: d_out x r_c, B_c: r_c x d_in, scale s_c) and style LoRA (A_s, B_s, s_s):

- ``ziprank`` (DuoLoRA Definition 2): masks in the rank dimension, dW = A_c M_c B_c s_c + A_s M_s B_s s_s with
  diagonal M (r_c and r_s learnable numbers per layer).
- ``ziplora`` (DuoLoRA Definition 1, the ZipLoRA paper): masks on the output dimension,
  dW = M_c A_c B_c s_c + M_s A_s B_s s_s with diagonal M (d_out numbers each). The widely used ZipLoRA code
  multiplies the input columns instead; IDLoRA follows the papers' definition.
- ``naive``: scalar blend, dW = w_c A_c B_c s_c + w_s A_s B_s s_s.

Each is a LoRA of rank r_c + r_s: the masks fold into the factors, so the merge exports exactly to one standard
LoRA (``MergeNetwork.export``), and rank components whose ZipRank mask is exactly zero are pruned.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .lora import HookedAdapter, _key

METHODS = ("ziprank", "ziplora", "naive")


def _apply(x: torch.Tensor, down: torch.Tensor, conv_args: dict | None) -> torch.Tensor:
    """x through a LoRA down factor: a Linear (r, d_in) or a Conv2d (r, c_in, kh, kw)."""
    return F.conv2d(x, down, **conv_args) if conv_args is not None else F.linear(x, down)


def _up(h: torch.Tensor, up: torch.Tensor, conv: bool) -> torch.Tensor:
    return F.conv2d(h, up.reshape(*up.shape[:2], 1, 1)) if conv else F.linear(h, up.reshape(up.shape[0], -1))


class MergedLayer(nn.Module):
    """The two frozen LoRAs of one layer and their learnable masks."""

    def __init__(self, base: nn.Module, content: tuple, style: tuple, method: str):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"merge method {method!r} is unknown; use one of {METHODS}")
        self.method = method
        self.conv_args = (dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
                          if isinstance(base, nn.Conv2d) else None)
        dev = base.weight.device
        for tag, (down, up, alpha) in (("c", content), ("s", style)):
            rank = down.shape[0]
            scale = (alpha if alpha is not None else rank) / rank
            # frozen factors (not in the state dict: a checkpoint holds only the masks); the scale folds into down
            self.register_buffer(f"down_{tag}", down.detach().float().to(dev) * scale, persistent=False)
            self.register_buffer(f"up_{tag}", up.detach().float().reshape(up.shape[0], rank).to(dev), persistent=False)
            size = {"ziprank": rank, "ziplora": up.shape[0], "naive": 1}[method]
            self.register_parameter(f"m_{tag}", nn.Parameter(torch.ones(size, device=dev)))

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.m_c, self.m_s

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv_args is not None
        x = x.to(self.down_c.dtype)
        out = 0
        for down, up, m in ((self.down_c, self.up_c, self.m_c), (self.down_s, self.up_s, self.m_s)):
            h = _apply(x, down, self.conv_args)
            if self.method == "ziprank":
                h = h * (m.view(1, -1, 1, 1) if conv else m)
                out = out + _up(h, up, conv)
            else:
                y = _up(h, up, conv)
                out = out + y * (m.view(1, -1, 1, 1) if conv and self.method == "ziplora" else m)
        return out

    @torch.no_grad()
    def export(self, prune: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of the exact merged LoRA at scale 1 (alpha = rank), zero-mask rank components pruned."""
        downs, ups = [], []
        for down, up, m in ((self.down_c, self.up_c, self.m_c), (self.down_s, self.up_s, self.m_s)):
            d, u = down.clone(), up.clone()
            if self.method == "ziprank":
                d = d * m.view(-1, *([1] * (d.ndim - 1)))
                keep = m != 0 if prune else torch.ones_like(m, dtype=torch.bool)
                d, u = d[keep], u[:, keep]
            elif self.method == "ziplora":
                u = u * m.view(-1, 1)
            else:
                u = u * m
            downs.append(d)
            ups.append(u)
        up = torch.cat(ups, dim=1)
        return torch.cat(downs), (up[..., None, None] if self.conv_args is not None else up)


class MergeNetwork(HookedAdapter, nn.Module):
    """Merged layers on named modules of one model, attached through forward hooks."""

    def __init__(self, modules: dict[str, nn.Module], content: dict[str, tuple], style: dict[str, tuple],
                 method: str = "ziprank"):
        super().__init__()
        self.names = sorted(set(content) | set(style))
        self.method = method
        self.layers = nn.ModuleDict()
        for name in self.names:
            base = modules[name]
            c = content.get(name) or _zero_like(style[name])
            s = style.get(name) or _zero_like(content[name])
            self.layers[_key(name)] = MergedLayer(base, c, s, method)
        self._targets = modules
        self._handles: list = []

    def items(self) -> Iterator[tuple[str, MergedLayer]]:
        return ((n, self.layers[_key(n)]) for n in self.names)

    def mask_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.m_c, layer.m_s)]

    def branch_of(self, name: str):
        return self.layers[_key(name)].branch

    @torch.no_grad()
    def set_masks(self, masks: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (mc, ms) in masks.items():
            layer = self.layers[_key(name)]
            layer.m_c.copy_(mc)
            layer.m_s.copy_(ms)

    def export(self, prune: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{module name: (down, up, alpha)} of the exact merged LoRA; layers with nothing left are dropped."""
        out = {}
        for name, layer in self.items():
            down, up = layer.export(prune)
            if down.shape[0]:
                out[name] = (down.cpu(), up.cpu(), float(down.shape[0]))
        return out


def _zero_like(lora: tuple) -> tuple:
    """A rank-1 zero LoRA of the same layer, for a layer that only one of the two LoRAs adapts."""
    down, up, _ = lora
    return torch.zeros(1, *down.shape[1:]), torch.zeros(up.shape[0], 1, *up.shape[2:]), 1.0

