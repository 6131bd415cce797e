"""training/memory_model.py: what one LoRA training step holds, counted on the meta device, against hand counts.

The check against measured memory (ComfyUI's Flux class on the CPU) is tests/inprocess/test_flux_memory.py."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idlora.models.lora import select_targets
from idlora.training.lora_trainer import checkpointed_block_list
from idlora.training.memory_model import step_memory

N, D, H, R = 32, 64, 256, 4  # tokens, width, MLP width, LoRA rank
F32 = 4


class LinearStack(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H, bias=False), nn.Linear(H, D, bias=False)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class MLPStack(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _mse(model, device="meta"):
    def forward(dtype):
        out = model(torch.zeros(N, D, device=device, dtype=dtype))
        return F.mse_loss(out.float(), torch.zeros(N, D, device=device))
    return forward


def _meta(cls, n):
    with torch.device("meta"):
        return cls(n)


def test_linear_stack_saved_bytes_are_the_hand_count():
    """Each LoRA layer saves its input (for down's gradient) and down's output (for up's); the frozen weights are
    saved too, but are parameters (the weights column); the loss saves its input and target."""
    n = 3
    model = _meta(LinearStack, n)
    m = step_memory(model, select_targets(model, r"layers"), R, _mse(model))
    assert m.saved == n * N * D * F32 + n * N * R * F32 + 2 * N * D * F32
    assert m.recompute == 0 and m.activation_peak >= m.saved
    assert m.lora_params == n * R * (D + D)
    assert (m.lora, m.lora_grads, m.adam) == (m.lora_params * F32, m.lora_params * F32, 2 * m.lora_params * F32)
    assert m.weights == n * D * D * F32 and m.base_params == n * D * D
    assert m.peak == m.weights + m.lora_state + max(m.activation_peak, m.optimizer_peak)


def test_checkpointing_keeps_block_inputs_and_recomputes_one_block():
    """Without checkpointing each block keeps its input, fc1's LoRA output, relu's output (shared with fc2's LoRA
    input) and fc2's LoRA output; with it, the blocks keep only their inputs, and backward holds one block's own."""
    n = 3
    model = _meta(MLPStack, n)
    assert checkpointed_block_list(model) == list(model.blocks)
    targets = select_targets(model, r"fc[12]$")
    plain = step_memory(model, targets, R, _mse(model))
    ckpt = step_memory(model, targets, R, _mse(model), checkpointing=True)
    own = N * H * F32 + 2 * N * R * F32
    loss = 2 * N * D * F32
    assert plain.saved == n * (N * D * F32 + own) + loss
    assert ckpt.saved == n * N * D * F32 + loss
    assert ckpt.recompute == own
    assert ckpt.saved + ckpt.recompute <= ckpt.activation_peak < plain.activation_peak
    assert ckpt.peak < plain.peak
    # block streaming: the blocks' weights leave the device but for two of them
    block = sum(p.nbytes for p in model.blocks[0].parameters())
    assert (ckpt.streamed, ckpt.streamed_resident) == (n * block, 2 * block)
    assert ckpt.peak_streamed == ckpt.peak - (n - 2) * block


class CastCopy(nn.Linear):
    """A layer that computes with a bf16 copy of its weight: autograd keeps that copy for backward."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def test_weight_copies_are_activations_and_fp8_storage_keeps_none():
    """A compute-dtype copy of a stored weight is not a parameter, so it is counted; ``storage_dtype`` fp8 makes the
    Linear layers models.storage.CastLinear, which keeps the stored fp8 weight for backward instead."""
    n = 2
    model = _meta(LinearStack, n)
    bf16 = step_memory(model, select_targets(model, r"layers"), R, _mse(model), compute_dtype=torch.bfloat16,
                       storage_dtype=torch.bfloat16)
    for layer in model.layers:
        layer.__class__ = CastCopy
    copies = step_memory(model, select_targets(model, r"layers"), R, _mse(model), compute_dtype=torch.bfloat16,
                         storage_dtype=torch.float32)
    # layer 0's input has no gradient, so only layer 1 needs (and keeps) its weight for the input's gradient
    assert copies.saved - bf16.saved == D * D * 2
    fp8 = step_memory(model, select_targets(model, r"layers"), R, _mse(model), compute_dtype=torch.bfloat16,
                      storage_dtype=torch.float8_e4m3fn)
    assert fp8.saved == bf16.saved
    assert (bf16.weights, copies.weights, fp8.weights) == (n * D * D * 2, n * D * D * 4, n * D * D)


def test_meta_counts_what_the_cpu_run_allocates():
    """The same step on real CPU tensors (the counting works on any device) gives the same numbers."""
    torch.manual_seed(0)
    cpu = MLPStack(2)
    meta = _meta(MLPStack, 2)
    for ckpt in (False, True):
        a = step_memory(meta, select_targets(meta, r"fc[12]$"), R, _mse(meta), checkpointing=ckpt)
        b = step_memory(cpu, select_targets(cpu, r"fc[12]$"), R, _mse(cpu, "cpu"), checkpointing=ckpt)
        assert (a.saved, a.recompute) == (b.saved, b.recompute)
        assert a.activation_peak == pytest.approx(b.activation_peak, rel=0.05)
