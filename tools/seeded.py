"""Seeded random weights for tiny and full-size test models (pure torch).

Every tensor gets its own generator seeded from (seed, key), so values do not depend
on the order of keys. Init rule: matrices ~ N(0, 1/sqrt(fan_in)), token/position
embeddings ~ N(0, 0.02), norm weights = 1, biases and other 1-D tensors = 0.
Used by tools/tiny_checkpoint.py, the tests and the benchmarks.
"""
from __future__ import annotations

import math
import zlib

import torch


def tensor_seed(seed: int, key: str) -> int:
    """Generator seed for one tensor: depends on (seed, key) only, not on key order.

    torch's CPU generator (mt19937) only uses the low 32 bits of its seed, so
    (seed, crc32(key)) is mixed into 32 bits: crc32(key) XOR (seed * golden-ratio
    constant mod 2**32). For seed 0 this is just crc32(key); for a fixed key,
    distinct seeds (mod 2**32) give distinct generator seeds.
    """
    return zlib.crc32(key.encode("utf-8")) ^ ((int(seed) * 0x9E3779B1) & 0xFFFFFFFF)


def _init_kind(module: torch.nn.Module, key: str, name: str, tensor: torch.Tensor) -> str:
    lname = key.lower()
    if isinstance(module, torch.nn.Embedding) or lname.endswith(("token_embedding.weight", "position_embedding.weight")):
        return "embedding"
    if tensor.ndim >= 2:
        return "matrix"
    # Type check needed: U-Net GroupNorms such as in_layers.0 / out.0 have no 'norm' in their name.
    if name == "weight" and (
        isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or "norm" in lname or "ln_" in lname or "layer_norm" in lname
    ):
        return "norm"
    return "zero"


def seeded_tensor(key: str, shape, kind: str, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Deterministic tensor for ``key`` following the init rule of this module."""
    shape = tuple(int(s) for s in shape)
    if kind == "norm":
        return torch.ones(shape, dtype=dtype)
    if kind == "zero":
        return torch.zeros(shape, dtype=dtype)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(tensor_seed(seed, key))
    if kind == "embedding":
        std = 0.02
    else:
        std = 1.0 / math.sqrt(max(math.prod(shape[1:]), 1))
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(dtype)


def seeded_state_dict(module: torch.nn.Module, seed: int, prefix: str = "", cast: torch.dtype | None = None,
                      overrides: dict | None = None) -> dict:
    """Seeded values for every parameter/buffer of ``module`` (works on meta modules), in each tensor's own dtype.

    ``cast``: draw in float32 and store each tensor in this dtype as it is made (the float32 values of a large module
    never exist all at once). ``overrides``: key -> float32 tensor to store instead of the seeded value (same shape).
    """
    out = {}
    for mod_name, mod in module.named_modules():
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is None:
                continue
            key = prefix + (mod_name + "." if mod_name else "") + name
            if overrides and key in overrides:
                if tuple(overrides[key].shape) != tuple(t.shape):
                    raise ValueError("override {} has shape {}, the module wants {}".format(
                        key, tuple(overrides[key].shape), tuple(t.shape)))
                out[key] = overrides[key].to(cast or t.dtype)
                continue
            dtype = torch.float32 if cast is not None or not t.dtype.is_floating_point else t.dtype
            value = seeded_tensor(key, t.shape, _init_kind(mod, key, name, t), seed, dtype=dtype)
            out[key] = value if cast is None else value.to(cast)
    return out


@torch.no_grad()
def fill_seeded_(module: torch.nn.Module, seed: int, prefix: str = "") -> None:
    """Overwrite every parameter of ``module`` in place with seeded values."""
    values = seeded_state_dict(module, seed, prefix)
    for mod_name, mod in module.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            key = prefix + (mod_name + "." if mod_name else "") + name
            p.copy_(values[key].to(device=p.device, dtype=p.dtype))
