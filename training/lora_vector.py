"""A LoRA as one flat vector, in a fixed, recorded layer order (DiffLoRA, Section 3.2).

Per layer, in the layout's order: LoRA-B (``up``, m x r) flattened row-major, then LoRA-A (``down``, r x n)
transposed to n x r and flattened. Both halves therefore run along the output/input features with the rank as the
fastest axis, which keeps each feature's r numbers next to each other for the 1D convolutions of the autoencoder.
Conv LoRAs flatten their kernel into n (``down`` r x (in*kh*kw)). Alpha is not in the vector: the layout records
one alpha per layer, and every LoRA of a population must share it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from .lora_format import LoraWeight


class LayoutError(ValueError):
    """A LoRA does not fit a layout; the message names the layer and what differs."""


@dataclass(frozen=True)
class LayerSpec:
    name: str
    out_features: int           # m
    down_shape: tuple[int, ...]  # (r, in[, kh, kw])
    up_shape: tuple[int, ...]    # (m, r[, 1, 1])
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down_shape[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.down_shape[1:])

    @property
    def size(self) -> int:
        return self.rank * (self.out_features + self.in_features)


class LoraLayout:
    """The order and shapes of a population's LoRA layers; flattens and unflattens exactly."""

    def __init__(self, layers: list[LayerSpec]):
        if not layers:
            raise LayoutError("a LoRA layout needs at least one layer: the LoRA is empty")
        self.layers = list(layers)
        self.offsets = [0]
        for spec in self.layers:
            self.offsets.append(self.offsets[-1] + spec.size)

    @property
    def length(self) -> int:
        return self.offsets[-1]

    @classmethod
    def of(cls, weights: dict[str, LoraWeight]) -> "LoraLayout":
        """The layout of one LoRA, layers in sorted name order."""
        return cls([LayerSpec(n, int(w.up.shape[0]), tuple(w.down.shape), tuple(w.up.shape), w.alpha)
                    for n, w in sorted(weights.items())])

    def check(self, weights: dict[str, LoraWeight], what: str = "the LoRA") -> None:
        names = {s.name for s in self.layers}
        missing, extra = sorted(names - set(weights)), sorted(set(weights) - names)
        if missing or extra:
            raise LayoutError(f"{what} has other layers than the layout: missing {missing[:3]}, extra {extra[:3]} "
                              f"({len(missing)} / {len(extra)}); every LoRA of a population needs the same targets")
        for s in self.layers:
            w = weights[s.name]
            if tuple(w.down.shape) != s.down_shape or tuple(w.up.shape) != s.up_shape:
                raise LayoutError(f"{what}: layer {s.name} has down {tuple(w.down.shape)} / up {tuple(w.up.shape)}, "
                                  f"the layout {s.down_shape} / {s.up_shape}; train every LoRA with the same rank "
                                  f"and targets on the same base model")
            if (w.alpha is None) != (s.alpha is None) or (w.alpha is not None and abs(w.alpha - s.alpha) > 1e-6):
                raise LayoutError(f"{what}: layer {s.name} has alpha {w.alpha}, the layout {s.alpha}; train every "
                                  f"LoRA with the same alpha")

    def flatten(self, weights: dict[str, LoraWeight]) -> torch.Tensor:
        """One float32 vector of length ``self.length``."""
        self.check(weights)
        parts = []
        for s in self.layers:
            w = weights[s.name]
            parts.append(w.up.reshape(s.out_features, s.rank).float().reshape(-1))
            parts.append(w.down.reshape(s.rank, s.in_features).float().t().reshape(-1))
        return torch.cat(parts)

    def unflatten(self, vector: torch.Tensor) -> dict[str, LoraWeight]:
        if vector.ndim != 1 or vector.numel() != self.length:
            raise LayoutError(f"a vector of shape {tuple(vector.shape)} does not fit this layout of length "
                              f"{self.length}: it was made for another LoRA layout")
        out = {}
        for s, start in zip(self.layers, self.offsets):
            m, n, r = s.out_features, s.in_features, s.rank
            up = vector[start:start + m * r].reshape(m, r)
            down = vector[start + m * r:start + s.size].reshape(n, r).t()
            out[s.name] = LoraWeight(down.reshape(s.down_shape).contiguous(), up.reshape(s.up_shape).contiguous(),
                                     s.alpha)
        return out

    def to_json(self) -> str:
        return json.dumps([[s.name, s.out_features, list(s.down_shape), list(s.up_shape), s.alpha]
                           for s in self.layers])

    @classmethod
    def from_json(cls, text: str) -> "LoraLayout":
        return cls([LayerSpec(n, int(m), tuple(d), tuple(u), a) for n, m, d, u, a in json.loads(text)])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoraLayout) and self.layers == other.layers

    def __repr__(self) -> str:
        return f"LoraLayout({len(self.layers)} layers, {self.length} numbers)"
