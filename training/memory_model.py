"""How much device memory one LoRA training step needs, counted on the meta device.

A LoRA job holds, all step long,

* ``weights``: the frozen base weights and buffers, in their storage dtype (fp8, bf16, ...);
* ``lora``, ``lora_grads``, ``adam``: the LoRA parameters (fp32), their gradients and AdamW's two moments;

and, for one forward + backward, the activations:

* ``saved``: the tensors autograd keeps for backward when the forward has finished. With gradient
  checkpointing (``lora_trainer.checkpointed_blocks``) these are the blocks' inputs plus what the layers outside
  the blocks save;
* ``recompute``: with checkpointing, backward runs each block's forward again and its own saved tensors live
  until that block's backward is done; this is the largest block's;
* the working set: tensors alive for a moment only (an op's output before the next op consumes it, the gradients
  flowing back, weights cast to the compute dtype).

Everything is counted, not estimated: the forward and backward run for real on meta tensors (shapes and dtypes,
no data), ``saved`` and ``recompute`` are the bytes of the unique storages that
``torch.autograd.graph.saved_tensors_hooks`` sees (parameters left out: they are the weights), and
``activation_peak`` is the largest sum of live storages that any aten op of the forward + backward created,
followed op by op (``_LiveBytes``). ``optimizer_peak`` is the same for an AdamW step.

What it leaves out or gets only nearly right:

* what the meta device cannot see: the allocator's rounding and fragmentation (PyTorch's CUDA caching allocator),
  scratch space kernels allocate inside themselves (cuBLAS workspace), the CUDA context, and whatever the caller
  keeps outside the step (the data set, the text encoder);
* autocast: the meta device has none, so the step runs in the inputs' dtype with the LoRA in fp32 (``LoraLayer``
  casts its input up when autocast is off). Under CUDA autocast the LoRA inputs are kept in bf16 (half) and the
  LayerNorms run in fp32 (twice): for Flux at 1024 px, whose peak comes at a single block's linear2 input
  (4608 x 15360), the count is likely high by a few hundred MiB (estimated from the tensor sizes, not measured);
* counting through a Python dispatch mode makes autograd add gradients that meet at one tensor out of place rather
  than in place: at most one gradient-sized buffer more than a plain run.

On the CPU (tests/inprocess/test_flux_memory.py: ComfyUI's Flux class, reduced) the predicted peak is within a few
percent of the measured one, with and without checkpointing.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..models.lora import LoraNetwork
from ..models.storage import is_float8, store_linear_weights
from .lora_trainer import checkpointed_block_list, checkpointed_blocks, saved_copies

GiB = 2 ** 30

# forward(compute_dtype) -> scalar loss: runs the denoiser once on inputs of that dtype, on the denoiser's device
Forward = Callable[[torch.dtype], torch.Tensor]


@dataclass
class StepMemory:
    """Bytes of one training step (see the module docstring for what each term holds)."""
    base_params: int
    lora_params: int
    weights: int
    lora: int
    lora_grads: int
    adam: int
    saved: int               # held for backward at the end of the forward
    recompute: int           # checkpointing: the largest block's own saved tensors while it is recomputed
    activation_peak: int     # the most bytes the forward + backward had alive at once (saved + recompute + transient)
    optimizer_peak: int      # AdamW's temporaries during its step
    checkpointing: bool
    streamed: int = 0        # block streaming: the weights of the blocks it streams (they stay in CPU memory) ...
    streamed_resident: int = 0  # ... and of the two largest of them (what is on the device at once, at most)

    @property
    def lora_state(self) -> int:
        return self.lora + self.lora_grads + self.adam

    @property
    def transient(self) -> int:
        return self.activation_peak - self.saved - self.recompute

    @property
    def peak(self) -> int:
        """Predicted peak of tensor bytes on the device (what ``torch.cuda.max_memory_allocated`` reports).

        The gradients count for the whole step (the trainer drops the last step's only after the forward, and
        backward makes them anew layer by layer): at most ``lora_grads`` too many."""
        return self.weights + self.lora_state + max(self.activation_peak, self.optimizer_peak)

    @property
    def peak_streamed(self) -> int:
        """``peak`` with block streaming (``LoraTrainConfig.stream_blocks``, which needs checkpointing): the streamed
        blocks' weights are on the device two at a time. The activations are the checkpointed step's."""
        return self.peak - self.streamed + self.streamed_resident


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """(identity, bytes) of the memory a tensor holds; views of one storage have the same identity."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested)
        return None
    return s._cdata, s.nbytes()


def _keys(tensors) -> set[int]:
    return {k[0] for t in tensors if isinstance(t, torch.Tensor) and (k := _storage(t))}


class _LiveBytes(TorchDispatchMode):
    """The bytes of the storages that ops create, followed until each is freed; ``peak`` is their largest sum.

    Storages that exist when it starts (``known``: the weights, the LoRA and its gradients) are not counted."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.seen, self.live, self.peak = set(known), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (k := _storage(t)) and k[0] not in self.seen:
                self.seen.add(k[0])
                self.live += k[1]
                self.peak = max(self.peak, self.live)
                # the storage's Python object lives as long as its memory (torch keeps it while C++ holds it)
                weakref.finalize(t.untyped_storage(), self._free, *k)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes


class _SavedTensors:
    """The unique storages autograd saves for backward, each with the block that saved it first."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.bytes: dict[int, int] = {}
        self.by_block: dict[int, set[int]] = {}   # block index -> storages its ops saved
        self.inputs: dict[int, set[int]] = {}     # block index -> storages of its tensor arguments
        self.block: int | None = None

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        k = _storage(t)
        if k and k[0] not in self.exclude:
            self.bytes.setdefault(*k)  # the graph holds t until backward: no identity is reused meanwhile
            if self.block is not None:
                self.by_block.setdefault(self.block, set()).add(k[0])
        return t

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def largest_block(self) -> int:
        """The most bytes one block saves beyond its own inputs (what its recompute holds)."""
        return max((sum(self.bytes[k] for k in keys - self.inputs.get(i, set()))
                    for i, keys in self.by_block.items()), default=0)

    @contextlib.contextmanager
    def tagging(self, blocks: list[nn.Module]) -> Iterator[None]:
        """Attribute what is saved to the block that runs."""
        def pre(i):
            def hook(module, args, kwargs):
                self.block = i
                self.inputs[i] = _keys(tree_leaves((args, kwargs)))
            return hook

        def post(module, args, kwargs, out):
            self.block = None
        handles = [h for i, b in enumerate(blocks) for h in (b.register_forward_pre_hook(pre(i), with_kwargs=True),
                                                              b.register_forward_hook(post, with_kwargs=True))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _run(network: LoraNetwork, denoiser: nn.Module, forward: Forward, dtype: torch.dtype, checkpointing: bool,
         *, inplace: bool, known: set[int], blocks: list[nn.Module] | None = None) -> tuple[_SavedTensors, _LiveBytes]:
    """One forward + backward in the trainer's session (``LoraTrainer.session``: the LoRA attached, checkpointing
    if asked, ``saved_copies`` for blocks that add to their inputs in place), counting what is saved and alive."""
    saved = _SavedTensors(known)
    copies = saved_copies() if inplace else None  # its pack hook runs first: what is counted is what it keeps
    pack = (lambda t: saved.pack(copies.pack_hook(t))) if copies else saved.pack
    unpack = copies.unpack_hook if copies else (lambda t: t)
    ckpt = checkpointed_blocks(denoiser, inplace) if checkpointing else contextlib.nullcontext()
    tag = saved.tagging(blocks) if blocks else contextlib.nullcontext()
    with torch.enable_grad(), network.attached(), ckpt, tag, _LiveBytes(known) as live:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            loss = forward(dtype)
        loss.backward()
        del loss
    return saved, live


def step_memory(denoiser: nn.Module, targets: dict[str, nn.Module], rank: int, forward: Forward, *,
                storage_dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float32,
                checkpointing: bool = False, inplace_blocks: bool = False) -> StepMemory:
    """The memory of one LoRA training step of ``denoiser`` (on the meta device nothing is allocated).

    ``targets``: the modules that get LoRA of ``rank`` (``models.lora.select_targets``). ``storage_dtype``: what
    the base weights are stored in, set here in place as the ComfyUI adapter does (fp8: the Linear weights become
    ``models.storage.CastLinear``, the rest the compute dtype; another dtype: the whole denoiser); None keeps them.
    ``forward(compute_dtype)`` runs the denoiser once on inputs of that dtype and returns the loss.
    ``inplace_blocks``: the blocks add to their inputs in place (ComfyUI's Flux), as ``DiffusionModel.inplace_blocks``.
    """
    if storage_dtype is not None and is_float8(storage_dtype):
        store_linear_weights(denoiser, storage_dtype, compute_dtype)
    elif storage_dtype is not None:
        denoiser.to(storage_dtype)
    for p in denoiser.parameters():
        p.requires_grad_(False)
    network = LoraNetwork(targets, rank)
    lora_p = network.trainable_parameters()
    for p in lora_p:
        p.grad = torch.zeros_like(p)  # counted in lora_grads; the backward adds into it
    known = _keys([*denoiser.parameters(), *denoiser.buffers(), *lora_p, *(p.grad for p in lora_p)])

    run = functools.partial(_run, network, denoiser, forward, compute_dtype, inplace=inplace_blocks, known=known)
    saved, live = run(checkpointing)
    # what each block saves when it runs again in backward: a forward without checkpointing, block by block
    blocks = checkpointed_block_list(denoiser)
    recompute = run(False, blocks=blocks)[0].largest_block() if checkpointing else 0

    lora = sum(p.nbytes for p in lora_p)
    block_bytes = [sum(t.nbytes for t in [*b.parameters(), *b.buffers()]) for b in blocks]
    return StepMemory(
        base_params=sum(p.numel() for p in denoiser.parameters()),
        lora_params=sum(p.numel() for p in lora_p),
        weights=sum(t.nbytes for t in [*denoiser.parameters(), *denoiser.buffers()]),
        lora=lora, lora_grads=lora, adam=2 * lora,
        saved=saved.total, recompute=recompute, activation_peak=live.peak,
        optimizer_peak=_adamw_peak(lora_p, known), checkpointing=checkpointing,
        streamed=sum(block_bytes), streamed_resident=sum(sorted(block_bytes)[-2:]))


def _adamw_peak(params: list[nn.Parameter], known: set[int]) -> int:
    """AdamW's temporaries in a step (multi-tensor, as on CUDA), its moments already there."""
    opt = torch.optim.AdamW(params, foreach=True)
    for p in params:
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    with _LiveBytes(known | _keys(v for s in opt.state.values() for v in s.values())) as live:
        opt.step()
    return live.peak


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention that saves for backward what CUDA's flash attention saves.

    On the meta device ``F.scaled_dot_product_attention`` takes the math path, which saves the (L, L) attention
    weights in fp32: far more than a GPU's flash or memory-efficient kernel holds (q, k, v, the output and the
    row log-sum-exp). The CPU flash kernel saves exactly those and has meta shapes, so meta and CPU use it."""
    if q.device.type in ("meta", "cpu"):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
