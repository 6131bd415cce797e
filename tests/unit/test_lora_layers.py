"""LoRA layers: the side branch equals the merged weight, presets pick the right layers."""
import pytest
import torch
from torch import nn

from idlora.models.lora import LoraConfigError, LoraLayer, LoraNetwork, select_targets
from tiny_torch import TinyDenoiser


def _randomize_up(net: LoraNetwork, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in net.items():
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.1)


@pytest.mark.parametrize("preset,expected", [
    ("attn", {"to_q", "to_k", "to_v", "to_out.0"}),
    ("attn_ff", {"to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"}),
])
def test_presets_pick_attention_and_ff(preset, expected):
    found = select_targets(TinyDenoiser(), preset)
    suffixes = {n.split("attn1.")[-1].split("attn2.")[-1].split("ff.")[-1] for n in found}
    assert suffixes == expected
    assert len(found) == 2 * (8 if preset == "attn" else 10)  # 2 blocks x (2 attn x 4 [+ 2 ff])


def test_all_linear_conv_includes_convs_and_pattern_works():
    m = TinyDenoiser()
    lin = select_targets(m, "all_linear")
    both = select_targets(m, "all_linear_conv")
    assert all(isinstance(x, nn.Linear) for x in lin.values())
    assert {"conv_in", "conv_out"} <= set(both) and not {"conv_in", "conv_out"} & set(lin)
    assert set(select_targets(m, r"attn2\.to_(k|v)$")) == {f"blocks.{i}.attn2.to_{p}" for i in (0, 1) for p in "kv"}


def test_bad_targets_name_the_fix():
    with pytest.raises(LoraConfigError, match="matched none.*preset"):
        select_targets(TinyDenoiser(), r"no_such_layer$")
    with pytest.raises(LoraConfigError, match="neither a preset"):
        select_targets(TinyDenoiser(), "attn[")


@pytest.mark.parametrize("rank", [0, -3])
def test_bad_rank(rank):
    with pytest.raises(LoraConfigError, match=f"rank must be a whole number >= 1, got {rank}"):
        LoraLayer(nn.Linear(4, 4), rank)


def test_branch_equals_merged_weight_linear_and_conv():
    torch.manual_seed(0)
    m = TinyDenoiser()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 5.0]), torch.randn(2, 6, 16)
    net = LoraNetwork(select_targets(m, "all_linear_conv"), rank=3, alpha=6.0, seed=1)
    _randomize_up(net)
    with torch.no_grad():
        base = m(x, t, ctx)
        with net.attached():
            hooked = m(x, t, ctx)
        assert not torch.allclose(hooked, base, atol=1e-4)  # the LoRA does something
        assert torch.equal(m(x, t, ctx), base)               # and detaching removes it
        net.merge()
        merged = m(x, t, ctx)
        net.unmerge()
        restored = m(x, t, ctx)
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(restored, base, rtol=1e-5, atol=1e-6)


def test_init_b_zero_and_seeded():
    m = TinyDenoiser()
    a = LoraNetwork(select_targets(m, "attn"), rank=4, seed=7)
    b = LoraNetwork(select_targets(m, "attn"), rank=4, seed=7)
    c = LoraNetwork(select_targets(m, "attn"), rank=4, seed=8)
    for (_, la), (_, lb), (_, lc) in zip(a.items(), b.items(), c.items()):
        assert torch.equal(la.down, lb.down) and not torch.equal(la.down, lc.down)
        assert torch.count_nonzero(la.up) == 0
    assert all(torch.count_nonzero(d) == 0 for d in a.deltas().values())


def test_delta_scale_and_shape():
    conv = nn.Conv2d(5, 6, 3, padding=1)
    layer = LoraLayer(conv, rank=2, alpha=1.0)
    with torch.no_grad():
        layer.up.normal_()
    d = layer.delta()
    assert d.shape == conv.weight.shape
    expected = 0.5 * (layer.up.flatten(1) @ layer.down.flatten(1)).reshape(d.shape)
    torch.testing.assert_close(d, expected.detach())


def test_merge_refuses_non_finite():
    m = nn.Sequential(nn.Linear(4, 4))
    net = LoraNetwork({"0": m[0]}, rank=2)
    with torch.no_grad():
        net.layer("0").up.fill_(float("nan"))
    w = m[0].weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        net.merge()
    assert torch.equal(m[0].weight, w)
