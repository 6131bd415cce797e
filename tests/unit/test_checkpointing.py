"""Gradient checkpointing of the denoiser's blocks (lora_trainer.checkpointed_blocks) on a small pure-torch U-Net
laid out like ComfyUI's: ModuleLists of nn.Sequential blocks whose layers the model walks itself, residual conv
blocks and transformer blocks made of nested Sequentials and submodules, single-conv down/up samplers."""
import collections
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from idlora.models.lora import LoraNetwork, select_targets
from idlora.training.lora_trainer import checkpointed_blocks

EMB = 16


class Res(nn.Module):
    """A residual conv block (ComfyUI's ResBlock): norm, activation, 3x3 conv, twice, plus a 1x1 skip conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(4, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(EMB, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(4, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return self.to_out(F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0])


class Transformer(nn.Module):
    """A transformer block on the feature map (ComfyUI's SpatialTransformer): 1x1 conv in and out, attention, MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(4, dim)
        self.proj_in, self.proj_out = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, emb):
        b, c, h, w = x.shape
        z = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        z = z + self.attn1(self.norm1(z))
        z = z + self.ff.net(self.norm2(z))
        return x + self.proj_out(z.transpose(1, 2).reshape(b, c, h, w))


class Down(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.op = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Up(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Seq(nn.Sequential):
    """ComfyUI's TimestepEmbedSequential: never called as a whole, the U-Net walks its layers."""


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(EMB, EMB), nn.SiLU(), nn.Linear(EMB, EMB))
        self.input_blocks = nn.ModuleList([Seq(nn.Conv2d(4, 8, 3, padding=1)), Seq(Res(8, 16), Transformer(16)),
                                           Seq(Down(16))])
        self.middle_block = Seq(Res(16, 16), Transformer(16), Res(16, 16))
        self.output_blocks = nn.ModuleList([Seq(Res(32, 16), Transformer(16), Up(16)), Seq(Res(32, 8))])
        self.out = nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))

    @staticmethod
    def _walk(seq, h, emb):
        for layer in seq:
            h = layer(h, emb) if isinstance(layer, (Res, Transformer)) else layer(h)
        return h

    def forward(self, x, t):
        emb = self.time_embed(t)
        skips, h = [], x
        for blk in self.input_blocks:
            h = self._walk(blk, h, emb)
            skips.append(h)
        h = self._walk(self.middle_block, h, emb)
        for blk in self.output_blocks:
            h = self._walk(blk, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def _model_and_lora():
    torch.manual_seed(0)
    model = UNet().requires_grad_(False)
    net = LoraNetwork(select_targets(model, "all_linear_conv"), rank=2, seed=0)
    with torch.no_grad():
        for layer in net.layers.values():  # a trained LoRA (up is zero at init, which would hide errors)
            layer.up.normal_(0.0, 0.1)
    return model, net


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, EMB, generator=g)


def _step(model, net, checkpointing: bool):
    """One training step's forward and backward: the loss and the gradients of the LoRA and of the input."""
    x, t = _inputs()
    x.requires_grad_(True)
    net.zero_grad(set_to_none=True)
    ckpt = checkpointed_blocks(model) if checkpointing else torch.autograd.graph.saved_tensors_hooks(
        lambda t: t, lambda t: t)
    with torch.enable_grad(), net.attached(), ckpt:
        loss = model(x, t).square().mean()
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}, x.grad.clone()


class _CountConvs(TorchDispatchMode):
    """The k x k (k > 1) convolutions that really run (a kept output served again is not counted)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and args[1].shape[2:].numel() > 1:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_each_layer_runs_twice_per_step_never_more():
    model, net = _model_and_lora()
    with checkpointed_blocks(model) as n:
        wrapped = [m for m in model.modules() if "forward" in vars(m)]
    # the residual and transformer blocks, each once and none inside another; the single-conv blocks (input conv,
    # Down, Up) and the layers outside the blocks (time_embed, out) are left alone
    assert n == len(wrapped) == 8 and all(isinstance(m, (Res, Transformer)) for m in wrapped)
    assert not any(a is not b and any(m is b for m in a.modules()) for a in wrapped for b in wrapped)
    inside = {m for w in wrapped for m in w.modules()}

    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    calls, lora_calls = collections.Counter(), collections.Counter()
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: calls.update([name])) for name, m in layers.items()]
    hooks += [net.layer(name).register_forward_pre_hook(lambda m, a, name=name: lora_calls.update([name]))
              for name in net.names]
    try:
        _step(model, net, checkpointing=True)
    finally:
        for h in hooks:
            h.remove()
    want = {name: 2 if m in inside else 1 for name, m in layers.items()}
    assert dict(calls) == want  # forward + the recompute in backward: not a third run
    assert dict(lora_calls) == want  # the LoRA hooks run with their layer, no more
    assert sum(v == 2 for v in want.values()) == 44 and sum(v == 1 for v in want.values()) == 6


def test_same_loss_and_gradients_as_without_checkpointing():
    model, net = _model_and_lora()
    loss, grads, x_grad = _step(model, net, checkpointing=False)
    loss_ckpt, grads_ckpt, x_grad_ckpt = _step(model, net, checkpointing=True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 2 * len(net.names)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(x_grad_ckpt, x_grad, rtol=1e-5, atol=1e-7)


def test_kxk_convolutions_are_kept_not_recomputed():
    """The residual blocks' 3x3 convolutions (and their LoRA's down convs) run once per step; everything else in a
    checkpointed block runs again in backward (the counts above)."""
    model, net = _model_and_lora()
    counts = {}
    for ckpt in (False, True):
        with _CountConvs() as c:
            _step(model, net, checkpointing=ckpt)
        counts[ckpt] = c.n
    assert counts[True] == counts[False] > 0


def test_no_grad_runs_plain_and_forward_is_restored():
    model, net = _model_and_lora()
    x, t = _inputs()
    with net.attached():
        ref = model(x, t)
    marker = model.middle_block[0].forward  # a forward the instance had already (torch.compile's, say)
    model.middle_block[0].forward = marker
    with checkpointed_blocks(model) as n, net.attached():
        assert n == 8
        with torch.no_grad():
            torch.testing.assert_close(model(x, t), ref, rtol=0, atol=0)
    assert model.middle_block[0].__dict__["forward"] is marker
    assert all("forward" not in vars(m) for m in model.modules() if m is not model.middle_block[0])


@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_variant_wraps_the_same_blocks(inplace):
    model, _ = _model_and_lora()
    with checkpointed_blocks(model, inplace=inplace):
        wrapped = [m for m in model.modules() if "forward" in vars(m)]
    assert len(wrapped) == 8 and all(isinstance(m, (Res, Transformer)) for m in wrapped)


def _resident(stream) -> int:
    """Blocks whose weights are, right now, a device copy and not their CPU master."""
    return sum(any(t.data_ptr() != stream.master[id(t)].data_ptr() for t in ts) for ts in stream.tensors.values())


@pytest.mark.parametrize("inplace", [False, True])
def test_streamed_blocks_give_the_same_gradients_and_stay_at_most_two_on_the_device(inplace):
    """BlockStream on the CPU (it copies even there, so residency can be seen): the LoRA and input gradients equal
    the unstreamed checkpointed ones, no more than two blocks are ever resident, every block is fetched twice per
    step (forward, recompute) but the two still resident when backward starts, and on exit every weight is its old value again."""
    from idlora.training.lora_trainer import BlockStream, checkpointed_block_list

    model, net = _model_and_lora()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    runs = {}
    for streamed in (False, True):
        x, t = _inputs()
        x.requires_grad_(True)
        net.zero_grad(set_to_none=True)
        blocks = checkpointed_block_list(model)
        stream = BlockStream(blocks, "cpu") if streamed else None
        seen: list[int] = []
        hooks = [m.register_forward_pre_hook(lambda *_: seen.append(_resident(stream)))
                 for b in blocks for m in b.modules()] if streamed else []
        with torch.enable_grad(), net.attached(), checkpointed_blocks(model, inplace, stream) as n, \
                stream or contextlib.nullcontext():
            model(x, t).square().mean().backward()
        for h in hooks:
            h.remove()
        runs[streamed] = torch.cat([*(p.grad.flatten() for p in net.parameters()), x.grad.flatten()])
        if streamed:
            assert n == len(blocks) >= 4
            assert stream.fetches == 2 * len(blocks) - 2  # the last two of the forward are still there for backward
            assert stream.most_resident == 2 and max(seen) == 2
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-7)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stream_blocks_needs_checkpointing_and_refuses_compile():
    from idlora.training.lora_trainer import LoraTrainConfig, TrainingInputError

    with pytest.raises(TrainingInputError, match="stream_blocks.*gradient_checkpointing on"):
        LoraTrainConfig(stream_blocks=True).validate()
    with pytest.raises(TrainingInputError, match="stream_blocks.*compile off"):
        LoraTrainConfig(stream_blocks=True, gradient_checkpointing=True, compile=True).validate()
