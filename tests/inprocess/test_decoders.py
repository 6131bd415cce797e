"""In-process ComfyUI: ComfyDiffusion.decoder() against ComfyUI's own decode paths.

"vae" must give what ComfyUI's VAE.decode gives for the same latents (before its clamp), "taesd" what
ComfyUI's TAESD gives for the same decoder weights; both must pass gradients to the latents, hold only
frozen ordinary (not inference) tensors and leave the VAE that other nodes use untouched.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.comfy


def _patcher(arch: str):
    import comfy_tiny
    return comfy_tiny.tiny_sd15(seed=0) if arch == "sd15" else comfy_tiny.tiny_sdxl(seed=0)


def _inference_vae(seed: int = 0):
    """The tiny VAE built under inference mode, as ComfyUI's loader nodes build it: inference tensors."""
    import comfy_tiny
    with torch.inference_mode():
        vae = comfy_tiny.tiny_vae(seed=seed)
    assert all(p.is_inference() for p in vae.first_stage_model.parameters())
    return vae


def _latents(b: int = 2, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 4, size, size, generator=torch.Generator().manual_seed(seed))


def _comfy_vae_decode(vae, diffusion, x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's path: LATENT-space samples (process_latent_out of the model-space x) -> VAE.decode, run
    under inference mode as in a prompt; (B, H, W, 3) clamped to [0, 1]."""
    with torch.inference_mode():
        return vae.decode(diffusion.base.process_latent_out(x)).clone()


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_vae_decoder_equals_comfyui_vae_decode(comfy, arch):
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    vae = _inference_vae()
    diffusion = ComfyDiffusion(_patcher(arch), vae=vae)
    x = _latents()
    with torch.no_grad():
        ours = diffusion.decoder("vae")(x)
    ref = _comfy_vae_decode(vae, diffusion, x)
    assert ours.shape == (2, 3, 64, 64) and ours.dtype == torch.float32
    inside = (ref > 0.01) & (ref < 0.99)
    assert inside.float().mean() > 0.5, "most pixels must be unclamped for the comparison to mean something"
    torch.testing.assert_close(ours.clamp(0, 1).movedim(1, -1), ref, rtol=1e-5, atol=1e-5)
    assert ours.min() < 0 or ours.max() > 1, "our decoder must not clamp (the tiny VAE overshoots [0, 1])"
    with torch.no_grad():  # the latent format's scale is part of the contract: unscaled latents differ
        assert (diffusion.decoder("vae")(diffusion.base.process_latent_out(x)) - ours).abs().max() > 1e-2


def test_vae_decoder_is_frozen_differentiable_and_cached(comfy):
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    diffusion = ComfyDiffusion(_patcher("sd15"), vae=_inference_vae())
    with torch.inference_mode():  # nodes run under inference mode: the decoder must still be ordinary tensors
        dec = diffusion.decoder("vae")
    assert diffusion.decoder("vae") is dec and diffusion.decoder() is dec
    params = list(dec.parameters())
    assert params and not any(p.requires_grad or p.is_inference() for p in params)
    assert all(p.device.type == diffusion.device.type and p.dtype == torch.float32 for p in params)
    assert not dec.training
    x = _latents().requires_grad_(True)
    dec(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in params)


def test_vae_decoder_leaves_the_input_vae_alone(comfy):
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    vae = _inference_vae()
    fsm = vae.first_stage_model
    before = {k: (v, v.clone(), v.data_ptr(), v.requires_grad) for k, v in fsm.state_dict(keep_vars=True).items()}
    classes = {name: type(m) for name, m in fsm.named_modules()}
    diffusion = ComfyDiffusion(_patcher("sd15"), vae=vae)
    x = _latents()
    ref = _comfy_vae_decode(vae, diffusion, x)

    dec = diffusion.decoder("vae")
    y = x.clone().requires_grad_(True)
    dec(y).mean().backward()

    after = fsm.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, (obj, value, ptr, requires_grad) in before.items():
        assert after[k] is obj and after[k].data_ptr() == ptr and torch.equal(after[k], value), k
        assert after[k].grad is None and after[k].requires_grad == requires_grad and after[k].is_inference(), k
    assert {name: type(m) for name, m in fsm.named_modules()} == classes, "ComfyUI's layer classes must stay"
    ours = {p.data_ptr() for p in dec.parameters()}
    assert not ours & {entry[2] for entry in before.values()}, "the decoder must hold a copy, not the VAE's tensors"
    n_dec, n_vae = sum(p.numel() for p in dec.parameters()), sum(p.numel() for p in fsm.parameters())
    assert n_dec < 0.75 * n_vae, f"the encoder should not be copied ({n_dec} of {n_vae} parameters)"
    torch.testing.assert_close(_comfy_vae_decode(vae, diffusion, x), ref, rtol=0, atol=0)


def test_vae_decoder_in_bfloat16(comfy):
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    diffusion = ComfyDiffusion(_patcher("sd15"), vae=_inference_vae())
    half = diffusion.decoder("vae", dtype=torch.bfloat16)
    assert half is not diffusion.decoder("vae")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    x = _latents()
    with torch.no_grad():
        out, full = half(x), diffusion.decoder("vae")(x)
    assert out.dtype == torch.float32
    assert (out - full).abs().mean() < 0.05


def test_decoder_argument_errors(comfy):
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    diffusion = ComfyDiffusion(_patcher("sd15"))
    with pytest.raises(ValueError, match="connect the VAE output of Load Checkpoint"):
        diffusion.decoder("vae")
    with pytest.raises(ValueError, match=r"'vea'.*\('vae', 'taesd'\)"):
        diffusion.decoder("vea")


# -- TAESD ------------------------------------------------------------------------

TAESD_FILE = {"sd15": "taesd_decoder.safetensors", "sdxl": "taesdxl_decoder.pth"}
TAESD_SEED = {"sd15": 11, "sdxl": 12}


def _comfy_taesd(seed: int):
    """ComfyUI's own TAESD (vae_scale 1, vae_shift 0, as its latent previews use it) with seeded weights."""
    import comfy.taesd.taesd
    from seeded import fill_seeded_
    taesd = comfy.taesd.taesd.TAESD()
    with torch.no_grad():
        fill_seeded_(taesd.taesd_decoder, seed)
    return taesd.eval()


@pytest.fixture
def vae_approx(comfy, tmp_path):
    """A vae_approx folder registered with ComfyUI holding TAESD decoders (different weights) for both
    families, written from ComfyUI's TAESD; unregistered afterwards."""
    import folder_paths
    for arch, name in TAESD_FILE.items():
        sd = {k: v.detach().clone() for k, v in _comfy_taesd(TAESD_SEED[arch]).taesd_decoder.state_dict().items()}
        if name.endswith(".safetensors"):
            save_file(sd, str(tmp_path / name))
        else:
            torch.save(sd, tmp_path / name)
    folder_paths.add_model_folder_path("vae_approx", str(tmp_path))
    yield tmp_path
    folder_paths.folder_names_and_paths["vae_approx"][0].remove(str(tmp_path))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_taesd_decoder_equals_comfyui_taesd(vae_approx, arch):
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    diffusion = ComfyDiffusion(_patcher(arch))  # no VAE needed
    dec = diffusion.decoder("taesd")
    assert diffusion.decoder("taesd") is dec
    params = list(dec.parameters())
    assert len(params) == 67 and not any(p.requires_grad or p.is_inference() for p in params)
    x = _latents(seed=2) * 2
    with torch.no_grad():
        ref = (_comfy_taesd(TAESD_SEED[arch]).decode(x) + 1) / 2  # ComfyUI's TAESD.decode gives [-1, 1]
        other = (_comfy_taesd(TAESD_SEED["sdxl" if arch == "sd15" else "sd15"]).decode(x) + 1) / 2
    assert ref.std() > 1e-3 and (ref - other).abs().max() > 1e-3, "the two families' files must differ"
    y = x.clone().requires_grad_(True)
    out = dec(y)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    out.mean().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_taef1_decoder_equals_comfyui_taesd_on_flux(comfy, tmp_path):
    """Flux.1's TAEF1 (16 latent channels): ComfyDiffusion of a Flux model finds taef1_decoder in vae_approx, and
    decodes model-space latents as ComfyUI's TAESD does (its vae_scale / vae_shift map LATENT space to model space,
    which is where IDLoRA's x0 already is)."""
    import comfy.taesd.taesd
    import comfy_tiny
    import folder_paths
    from seeded import fill_seeded_
    from idlora.nodes.comfy_adapter import ComfyDiffusion

    ref_net = comfy.taesd.taesd.TAESD(latent_channels=16).eval()
    with torch.no_grad():
        fill_seeded_(ref_net.taesd_decoder, 13)
    save_file({k: v.detach().clone() for k, v in ref_net.taesd_decoder.state_dict().items()},
              str(tmp_path / "taef1_decoder.safetensors"))
    folder_paths.add_model_folder_path("vae_approx", str(tmp_path))
    try:
        dec = ComfyDiffusion(comfy_tiny.tiny_patcher("flux")).decoder("taesd")
    finally:
        folder_paths.folder_names_and_paths["vae_approx"][0].remove(str(tmp_path))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    y = x.clone().requires_grad_(True)
    out = dec(y)
    with torch.no_grad():
        ref = (ref_net.decode(x) + 1) / 2
    assert out.shape == (1, 3, 64, 64) and ref.std() > 1e-3
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    out.mean().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_missing_taesd_file_names_folder_and_file(comfy):
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    with pytest.raises(FileNotFoundError) as e:
        ComfyDiffusion(_patcher("sd15")).decoder("taesd")
    msg = str(e.value)
    assert "vae_approx" in msg and "taesd_decoder" in msg and "never downloads" in msg


def test_taesd_file_of_the_other_family_does_not_count(comfy, tmp_path):
    import folder_paths
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    save_file(_comfy_taesd(0).taesd_decoder.state_dict(), str(tmp_path / "taesd_decoder.safetensors"))
    folder_paths.add_model_folder_path("vae_approx", str(tmp_path))
    try:
        with pytest.raises(FileNotFoundError) as e:
            ComfyDiffusion(_patcher("sdxl")).decoder("taesd")
    finally:
        folder_paths.folder_names_and_paths["vae_approx"][0].remove(str(tmp_path))
    assert "taesdxl_decoder" in str(e.value) and str(tmp_path) in str(e.value)
