"""The pure-torch TAESD decoder: the published files' state-dict layout, the forward pass, loading and errors.

No real TAESD weights exist here. The expected layout is written out by hand from the published decoder
files (an nn.Sequential saved without prefix), and the forward pass is checked against a functional
re-statement of the network that reads the same state dict.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from idlora.models.taesd import TAESD_EXTENSIONS, TAESD_FILES, TaesdDecoder, load_taesd_decoder

ROOT = Path(__file__).resolve().parents[2]

BLOCKS = (3, 4, 5, 8, 9, 10, 13, 14, 15, 18)  # Sequential indices of the residual blocks
UPSAMPLE_CONVS = (7, 12, 17)                  # 3x3 convs without bias after each 2x upsampling


def published_layout(latent_channels: int = 4) -> dict[str, tuple[int, ...]]:
    """Key -> shape of taesd_decoder.safetensors / taesdxl_decoder.safetensors (67 tensors)."""
    shapes = {"1.weight": (64, latent_channels, 3, 3), "1.bias": (64,)}
    for i in range(3, 19):  # in Sequential order; 0 (soft clamp), 2 (ReLU) and the upsamplings have no weights
        if i in BLOCKS:
            for j in (0, 2, 4):
                shapes[f"{i}.conv.{j}.weight"], shapes[f"{i}.conv.{j}.bias"] = (64, 64, 3, 3), (64,)
        elif i in UPSAMPLE_CONVS:
            shapes[f"{i}.weight"] = (64, 64, 3, 3)
    shapes["19.weight"], shapes["19.bias"] = (3, 64, 3, 3), (3,)
    return shapes


def random_state_dict(seed: int = 0, latent_channels: int = 4) -> dict[str, torch.Tensor]:
    """Seeded weights that keep activations of order 1 through the 10 residual blocks."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in published_layout(latent_channels).items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        sd[key] = torch.randn(shape, generator=g) * (0.1 if len(shape) == 1 else 0.7 / fan_in ** 0.5)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The TAESD decoder written out functionally from its state dict."""
    def conv(h, key, bias=True):
        return F.conv2d(h, sd[f"{key}.weight"], sd[f"{key}.bias"] if bias else None, padding=1)

    def block(h, i):
        r = conv(F.relu(conv(F.relu(conv(h, f"{i}.conv.0")), f"{i}.conv.2")), f"{i}.conv.4")
        return F.relu(r + h)

    h = F.relu(conv(torch.tanh(x / 3) * 3, "1"))
    for stage, up in zip(((3, 4, 5), (8, 9, 10), (13, 14, 15)), UPSAMPLE_CONVS):
        for i in stage:
            h = block(h, i)
        h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), str(up), bias=False)
    return conv(block(h, 18), "19")


def latents(b: int = 2, h: int = 5, w: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("channels", [4, 16])
def test_state_dict_layout_is_the_published_one(channels):
    sd = TaesdDecoder(channels).state_dict()
    assert list(sd) == list(published_layout(channels))
    assert {k: tuple(v.shape) for k, v in sd.items()} == published_layout(channels)


def test_forward_matches_the_functional_network_and_is_not_clamped():
    dec = TaesdDecoder()
    sd = random_state_dict()
    sd["19.bias"] = torch.tensor([1.5, -0.7, 0.4])  # pushes some pixels outside [0, 1]
    dec.load_state_dict(sd)
    x = latents()
    out = dec(x)
    assert out.shape == (2, 3, 40, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_forward(sd, x), rtol=1e-5, atol=1e-5)
    assert out.std() > 0.05, "random weights should give a non-flat image"
    assert out.max() > 1 and out.min() < 0, "the output must not be clamped to [0, 1]"


def test_gradient_reaches_the_latents():
    dec = TaesdDecoder()
    dec.load_state_dict(random_state_dict())
    dec.requires_grad_(False)
    x = latents().requires_grad_(True)
    dec(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_wrong_latent_channels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\).*\(1, 16, 4, 4\)"):
        TaesdDecoder()(torch.zeros(1, 16, 4, 4))


@pytest.mark.parametrize("ext", [".safetensors", ".pth", ".pt", ".bin"])
def test_load_from_file(tmp_path, ext):
    sd = random_state_dict(seed=3)
    path = tmp_path / f"taesd_decoder{ext}"
    if ext == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    dec = load_taesd_decoder(path)
    assert not dec.training
    assert all(not p.requires_grad for p in dec.parameters())
    for k, v in dec.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = latents()
    torch.testing.assert_close(dec(x), reference_forward(sd, x), rtol=1e-5, atol=1e-5)


def test_load_half_precision_file_gives_float32(tmp_path):
    sd = {k: v.half() for k, v in random_state_dict(seed=4).items()}
    path = tmp_path / "taesdxl_decoder.safetensors"
    save_file(sd, str(path))
    dec = load_taesd_decoder(str(path))
    assert all(p.dtype == torch.float32 for p in dec.parameters())
    assert torch.equal(dec.state_dict()["19.weight"], sd["19.weight"].float())


def test_load_16_channel_file(tmp_path):
    path = tmp_path / "taef1_decoder.safetensors"
    save_file(random_state_dict(latent_channels=16), str(path))
    dec = load_taesd_decoder(path)
    assert dec.latent_channels == 16
    assert dec(torch.zeros(1, 16, 2, 2)).shape == (1, 3, 16, 16)


def test_missing_file_names_path_and_folder(tmp_path):
    path = tmp_path / "taesd_decoder.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        load_taesd_decoder(path)
    msg = str(e.value)
    assert str(path) in msg and "vae_approx" in msg
    assert "taesd_decoder.safetensors" in msg and "taesdxl_decoder.safetensors" in msg


def test_missing_key_names_file_key_and_shape(tmp_path):
    sd = random_state_dict()
    del sd["8.conv.2.bias"]
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError) as e:
        load_taesd_decoder(path)
    msg = str(e.value)
    assert str(path) in msg and "'8.conv.2.bias'" in msg and "missing" in msg and "(64,)" in msg


def test_wrong_shape_names_file_key_and_both_shapes(tmp_path):
    sd = random_state_dict()
    sd["19.weight"] = torch.zeros(4, 64, 3, 3)
    path = tmp_path / "wrong.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        load_taesd_decoder(path)
    msg = str(e.value)
    assert str(path) in msg and "'19.weight'" in msg and "(4, 64, 3, 3)" in msg and "(3, 64, 3, 3)" in msg


def test_prefixed_or_foreign_keys_are_rejected(tmp_path):
    sd = random_state_dict()
    path = tmp_path / "full_taesd.safetensors"
    save_file({f"taesd_decoder.{k}": v for k, v in sd.items()}, str(path))
    with pytest.raises(ValueError, match=r"full_taesd\.safetensors.*'1\.weight'.*missing"):
        load_taesd_decoder(path)
    sd["20.weight"] = torch.zeros(3, 3)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"extra\.safetensors.*unexpected key '20\.weight' \(shape \(3, 3\)"):
        load_taesd_decoder(path)


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_unreadable_file_is_a_value_error_naming_it(tmp_path, ext):
    path = tmp_path / f"taesd_decoder{ext}"
    path.write_bytes(b"not a weights file at all")
    with pytest.raises(ValueError, match=f"taesd_decoder\\{ext}"):
        load_taesd_decoder(path)


def test_pickled_non_state_dict_is_rejected(tmp_path):
    path = tmp_path / "taesd_decoder.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="does not hold a state dict.*list"):
        load_taesd_decoder(path)


def test_file_table():
    assert TAESD_FILES["sd15"] == ("taesd_decoder",) and TAESD_FILES["sdxl"] == ("taesdxl_decoder",)
    assert TAESD_FILES["sd20"] == TAESD_FILES["sd15"] and TAESD_FILES["ssd1b"] == TAESD_FILES["sdxl"]
    assert TAESD_EXTENSIONS[0] == ".safetensors" and set(TAESD_EXTENSIONS) == {".safetensors", ".pth", ".pt", ".bin"}


def test_module_does_not_import_comfyui():
    code = ("import sys; sys.path.insert(0, 'tools'); from pack import import_pack; import_pack(); "
            "import idlora.models.taesd; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_tiny_diffusion_decoder_follows_the_decoder_contract():
    """The toy model's decoder (tests/tiny_torch.py), which the trainer tests use in place of a VAE/TAESD:
    decode(encode(img)) is the 8x8-average-pooled image, gradients reach the latents, nothing is trainable."""
    from tiny_torch import TinyDiffusion, images
    model = TinyDiffusion()
    dec = model.decoder("vae")
    assert model.decoder("taesd") is dec and model.decoder() is dec
    assert not any(p.requires_grad for p in dec.parameters())
    img = images(2, 32)
    lat = model.encode_images(img).requires_grad_(True)
    out = dec(lat)
    pooled = F.avg_pool2d(img.permute(0, 3, 1, 2), 8).repeat_interleave(8, 2).repeat_interleave(8, 3)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, pooled, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert torch.isfinite(lat.grad).all() and lat.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="'vea'.*'vae', 'taesd'"):
        model.decoder("vea")
