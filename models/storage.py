"""Frozen base weights stored in a narrow dtype (fp8), computed in the activations' dtype.

A 12 B-parameter Flux-dev is 24 GB in bf16 and 12 GB in float8_e4m3fn. LoRA training never updates the base
weights, so they can stay in fp8 and be cast to the compute dtype one layer at a time, as ComfyUI's ``manual_cast``
layers do when it loads a model with an fp8 ``weight_dtype``. ``CastLinear`` is that layer in plain torch (no
ComfyUI): only the layer running holds a compute-dtype copy of its weight. Plain ``F.linear(x, w.to(dtype))`` would
also make autograd keep that copy of every layer until the backward pass (it needs the weight for the input's
gradient), undoing the saving; ``_LinearCast`` keeps the stored fp8 weight instead and casts it again there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in FLOAT8


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (never for the meta device, which torch's query refuses)."""
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in for input ``x``: autocast's, when autocast is on, else the input's."""
    if autocast_on(x):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class CastLinear(nn.Linear):
    """A Linear whose frozen weight (and bias) are stored in any dtype (e.g. float8_e4m3fn) and cast to the compute
    dtype on each forward. The LoRA hooks of models/lora.py see the same module, input and output as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        return _linear_cast(x.to(dtype), self.weight, self.bias, dtype)


class _LinearCast(torch.autograd.Function):
    """y = x @ cast(W).T + cast(b) with W frozen: saves only the (narrow) stored weight for the backward pass and
    casts it again there, so no compute-dtype copy of any weight outlives its layer's forward."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(ctx.dtype), None, None, None


def _linear_cast(x, weight, bias, dtype):
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
    # 2-D inside the Function: a higher-rank F.linear returns a view, and autograd forbids in-place additions to a
    # view a custom Function made (ComfyUI's Flux adds to its blocks' outputs in place)
    out = _LinearCast.apply(x.reshape(-1, x.shape[-1]), weight, bias, dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@torch.no_grad()
def store_linear_weights(module: nn.Module, dtype: torch.dtype, other_dtype: torch.dtype) -> int:
    """Store every Linear weight of ``module`` in ``dtype`` (turning the layer into a CastLinear) and every other
    parameter and floating buffer (biases, norms, embeddings: a small share) in ``other_dtype``. Returns the number
    of Linear layers converted. Layers already CastLinear keep their class."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if type(m) is not CastLinear:
                m.__class__ = CastLinear
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(other_dtype)
            n += 1
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(other_dtype)
    return n
