"""Meta-LoRA stage 2 from a given LoRA on ComfyUI's tiny SD1.5 U-Net: a kohya file (lora_unet_* keys) collapsed from
the same Meta-Down is resolved to the U-Net's modules and is the exact start."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


def test_kohya_file_from_the_same_meta_down_is_the_exact_start(comfy, tmp_path):
    from comfy_tiny import tiny_cond as _cond, tiny_patcher as _patcher
    from idlora.models.lora import select_targets
    from idlora.models.meta_lora import MetaLoraNetwork
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.lora_format import load_lora, save_lora
    from idlora.training.meta_lora import CropData, MetaLoraPersonalizer, MetaStage2Config, collapse_check

    patcher = _patcher("sd15")
    diffusion = ComfyDiffusion(patcher)
    net = MetaLoraNetwork(select_targets(diffusion.denoiser, "attn"), 8, 2, seed=1)
    with torch.no_grad():
        for k in net.up:
            net.up[k].normal_(std=0.1)
    weights = {n: net.meta_down[k].detach().clone() for n, k in zip(net.names, net.meta_down.keys())}
    meta = {"idlora_base_model": diffusion.name, "idlora_r1": "8", "idlora_targets": "attn"}
    save_lora(tmp_path / "given.safetensors", collapse_check(net), {}, dtype=torch.float32)
    given = load_lora(tmp_path / "given.safetensors")
    assert given.key_style != "module"
    g = torch.Generator().manual_seed(0)
    crops = CropData([torch.randn(1, 4, 8, 8, generator=g)], [_cond("sd15", patcher, 1, 2)])
    p = MetaLoraPersonalizer(diffusion, crops, MetaStage2Config(steps=1, rank=2), weights, meta, init_lora=given)
    want = {n: w.delta() for n, w in collapse_check(net).items()}
    got = {n: w.delta() for n, w in p.bundle().weights.items()}
    assert set(got) == set(want)
    assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-5
    assert p.init_report["delta_error"] < 1e-5
